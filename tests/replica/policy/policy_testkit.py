"""Builders for hand-made engine states (policies are pure: a state in, a plan out).

Requests are built in the exact shape the mechanism (replica/sim/engine.py) leaves them in:

* waiting: no KV, nothing computed;
* started prefill: KV reserved for the whole prompt, `computed` prompt tokens done, no output;
* decoding: the prompt and all but the newest output token computed, KV covering the computed
  tokens; the next step needs a new block exactly when the computed tokens fill their blocks.
"""

from __future__ import annotations

import dataclasses
import math

from replica.policy import EngineState, KVCache, Request

BS = 16  # KV block size used throughout
INF = math.inf


def blocks(tokens: int) -> int:
    return -(-tokens // BS)


def waiting(req_id: str, prompt_len: int, arrival_s: float = 0.0, **kw) -> Request:
    return Request(req_id, prompt_len, arrival_s, **kw)


def started(req_id: str, prompt_len: int, computed: int, arrival_s: float = 0.0, **kw) -> Request:
    assert 0 < computed < prompt_len
    return Request(
        req_id, prompt_len, arrival_s, num_computed_tokens=computed, num_blocks=blocks(prompt_len), **kw
    )


def decoding(
    req_id: str,
    lst_s: float = INF,
    arrival_s: float = 0.0,
    *,
    prompt_len: int = 20,
    outputs: int = 1,
    needs_block: bool = False,
    **kw,
) -> Request:
    """A decode-ready request. `needs_block=True` puts it on a block boundary (prompt 32, one
    output: 32 computed tokens in 2 full blocks, the next step needs a 3rd block)."""
    if needs_block:
        prompt_len, outputs = 32, 1
    computed = prompt_len + outputs - 1
    r = Request(
        req_id,
        prompt_len,
        arrival_s,
        num_output_tokens=outputs,
        num_computed_tokens=computed,
        num_blocks=blocks(computed),
        lst_s=lst_s,
        **kw,
    )
    assert not r.is_prefill
    # be explicit about KV pressure: on a block boundary iff asked for
    assert (computed % BS == 0) == needs_block, (req_id, computed)
    return r


def state(
    now_s: float = 0.0,
    *,
    running: tuple | list = (),
    waiting: tuple | list = (),
    kv_blocks: int = 1000,
    used: int | None = None,
    extra_used: int = 0,
) -> EngineState:
    """An engine state; the KV in use is what `running` holds plus `extra_used` (or exactly
    `used` blocks, e.g. `used=kv_blocks` for a full cache)."""
    kv = KVCache(kv_blocks, BS)
    held = sum(r.num_blocks for r in running)
    kv.num_used_blocks = held + extra_used if used is None else used
    assert held <= kv.num_used_blocks <= kv_blocks
    return EngineState(now_s=now_s, kv=kv, waiting=list(waiting), running=list(running))


def ids(reqs) -> list[str]:
    return [r.req_id for r in reqs]


def chunks(plan) -> list[tuple[str, int]]:
    return [(r.req_id, n) for r, n in plan.prefills]


def snapshot(st: EngineState):
    """Everything a policy could mutate: the queues (identity and order), every request field,
    the KV accounting and the clock."""
    reqs = list(st.waiting) + list(st.running)
    return (
        st.now_s,
        [id(r) for r in st.waiting],
        [id(r) for r in st.running],
        [dataclasses.astuple(r) for r in reqs],
        dataclasses.astuple(st.kv),
    )
