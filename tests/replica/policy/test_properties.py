"""Property tests: every registered scheduler, driven by the simulated engine in virtual time on
random small workloads, keeps its limits and serves every request exactly once."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from replica.cost.model import CostModel
from replica.policy import Request, available_schedulers, make_policy
from replica.sim.engine import SchedulerStalled, SimEngine

BS = 16
MAX_STEPS = 200_000
# The paper's tiers are paying (TBT 100 ms, rank 0) and free (500 ms, rank 1); a tighter paying SLO
# (a few iterations of this cost model) makes SLAI decodes critical, so its step 1 runs too.
PAID_TBT_S = [0.002, 0.010, 0.100]
FREE_TBT_S = 0.500

PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("POLICY_PROPERTY_EXAMPLES", 50)),
    deadline=None,
    database=None,  # write nothing outside the test folders
    suppress_health_check=[HealthCheck.too_slow],
)


class LinearCost(CostModel):
    def iteration_time_s(self, shape) -> float:
        return 1e-3 + 1e-5 * shape.num_tokens


class TokenLog:
    """Token times per request, from the engine's callbacks (per-token or per-iteration API)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.finished: list[str] = []

    def _one(self, r: Request, t: float) -> None:
        self.times[r.req_id].append(t)

    def on_tokens(self, reqs: list[Request], t: float) -> None:
        for r in reqs:
            self._one(r, t)

    def on_finish(self, r: Request) -> None:
        self.finished.append(r.req_id)

    def engine_kwargs(self) -> dict:
        return {"on_finish": self.on_finish, "on_tokens": self.on_tokens}


@dataclass(frozen=True)
class Workload:
    requests: tuple[tuple[int, int, float, int], ...]  # (prompt, output, arrival_s, tier rank)
    paid_tbt_s: float
    token_budget: int
    max_active: int
    max_decodes: int
    kv_blocks: int
    tile: int
    max_prefill_tokens: int


@st.composite
def workloads(draw) -> Workload:
    # "pressure": a burst of short prompts with long outputs in a KV cache that barely holds the
    # largest request, so decodes run out of blocks and preemption paths are exercised.
    mode = draw(st.sampled_from(["spread", "burst", "pressure"]))
    pressure = mode == "pressure"
    n = draw(st.integers(1, 10))
    max_gap_ms = 30 if mode == "spread" else 1
    prompts = st.integers(1, 100) if pressure else st.integers(1, 600)
    outputs = st.integers(16, 40) if pressure else st.integers(1, 40)
    reqs = []
    t_ms = 0
    for _ in range(n):
        t_ms += draw(st.integers(0, max_gap_ms))
        reqs.append((draw(prompts), draw(outputs), t_ms / 1000, draw(st.integers(0, 1))))
    budget = draw(st.integers(16, 256))
    # KV from tight (just the largest request, prompt + output) to ample; watermark kept free
    need = max(-(-(p + o) // BS) for p, o, _, _ in reqs)
    kv = need + draw(st.integers(0, 4) if pressure else st.one_of(st.integers(0, 12), st.integers(0, 300)))
    while kv - int(0.01 * kv) < need:
        kv += 1
    return Workload(
        requests=tuple(reqs),
        paid_tbt_s=draw(st.sampled_from(PAID_TBT_S)),
        token_budget=budget,
        max_active=draw(st.integers(4 if pressure else 1, 16)),
        max_decodes=draw(st.integers(1, 16)),
        kv_blocks=kv,
        tile=draw(st.sampled_from([t for t in (16, 32, 64) if t <= budget])),
        max_prefill_tokens=draw(st.integers(640, 2048)),  # >= any request's prompt + output
    )


def make(name: str, wl: Workload):
    return make_policy(
        name,
        token_budget=wl.token_budget,
        max_active_requests=wl.max_active,
        max_decodes=wl.max_decodes,
        tile_tokens=wl.tile,
        max_batch_tokens=wl.token_budget,
        max_prefill_tokens=wl.max_prefill_tokens,
        max_token_budget=4 * wl.token_budget,
    )


@dataclass
class Before:
    """The engine as the policy saw it when planning."""

    now: float
    running: list[Request]
    uncomputed: dict[int, int]  # running request id -> uncomputed tokens (1 for a decode)
    is_prefill: dict[int, bool]
    computed: dict[int, int]
    lst: dict[int, float]
    waiting_tokens: dict[int, int]  # waiting request id -> tokens it knows

    @classmethod
    def of(cls, eng: SimEngine, now: float) -> "Before":
        run = list(eng.state.running)  # the engine mutates its list in place
        return cls(
            now,
            run,
            {id(r): r.num_uncomputed_tokens for r in run},
            {id(r): r.is_prefill for r in run},
            {id(r): r.num_computed_tokens for r in run},
            {id(r): r.lst_s for r in run},
            {id(r): r.num_tokens for r in eng.state.waiting},
        )


def ids(reqs) -> list[str]:
    return [r.req_id for r in reqs]


def check_plan(pol, plan, b: Before) -> None:
    cfg = pol.config
    n_dec = len(plan.decodes)
    # -- token budget per scheduler kind
    if cfg.kind in ("slai", "sarathi"):
        assert plan.num_tokens <= cfg.token_budget
    elif cfg.kind in ("slai-plus", "slai-next"):  # the budget it chose: the base one, or tiles up to the maximum
        assert plan.num_tokens <= pol.last_budget <= cfg.max_token_budget
        assert pol.last_budget == cfg.token_budget or pol.last_budget % cfg.tile_tokens == 0
    elif cfg.kind == "vllm":
        assert plan.num_prefill_tokens <= cfg.max_prefill_tokens
        assert not (plan.prefills and plan.decodes), "vLLM-style: a prefill iteration has no decodes"
        assert all(n == b.waiting_tokens.get(id(r)) for r, n in plan.prefills), "vLLM-style: whole prompts"
    else:  # rad
        aligned = cfg.max_batch_tokens // cfg.tile_tokens * cfg.tile_tokens
        assert plan.num_tokens <= max(aligned, -(-n_dec // cfg.tile_tokens) * cfg.tile_tokens)
    # -- decode cap
    if cfg.kind in ("slai", "rad"):
        assert n_dec <= cfg.max_decodes
    # -- active cap: requests holding KV after the plan's preemptions and admissions
    assert len(b.running) - len(plan.preempted) + len(plan.admitted) <= cfg.max_active_requests
    # -- well-formed: each request at most once, a preempted one does not also run
    ran = [id(r) for r in plan.decodes] + [id(r) for r, _ in plan.prefills]
    assert len(ran) == len(set(ran))
    preempted = set(map(id, plan.preempted))
    assert not set(ran) & preempted
    assert preempted <= set(b.computed)
    for r in plan.decodes:
        assert not b.is_prefill[id(r)], f"{r.req_id} decoded but was not decode-ready"
    admitted = set(map(id, plan.admitted))
    for r, n in plan.prefills:
        assert n > 0
        if id(r) in admitted:
            assert n <= b.waiting_tokens[id(r)]
        else:
            assert b.is_prefill[id(r)] and n <= b.uncomputed[id(r)]
    # -- started prefills come before new ones: nothing is admitted while one is cut short
    # (slai-next may leave a started prefill out of the step: vLLM then sets it aside)
    if plan.admitted and cfg.kind != "vllm":
        chunk = {id(r): n for r, n in plan.prefills}
        for r in b.running:
            if b.is_prefill[id(r)] and id(r) not in preempted and (cfg.kind != "slai-next" or id(r) in chunk):
                assert chunk.get(id(r)) == b.uncomputed[id(r)], f"{r.req_id} cut short by an admission"
    # -- baselines run every running decode (RAD: up to its decode cap; vLLM: when not prefilling)
    if cfg.kind in ("sarathi", "rad") or (cfg.kind == "vllm" and not plan.prefills):
        decoded = set(map(id, plan.decodes))
        missing = [r for r in b.running if not b.is_prefill[id(r)] and id(r) not in decoded | preempted]
        assert not missing or (cfg.kind == "rad" and n_dec == cfg.max_decodes), f"{ids(missing)} skipped"
    if cfg.kind == "slai":
        check_slai_order(cfg, plan, b)


def check_slai_order(cfg, plan, b: Before) -> None:
    """Critical decodes (now >= LST) first, then non-critical ones, each earliest LST first (ties
    by arrival); a critical decode is only left out once the budget or the decode cap is spent."""
    k = plan.num_critical_decodes
    if k:
        event("SLAI ran critical decodes")
    key = [(b.lst[id(r)], r.arrival_s) for r in plan.decodes]
    assert all(b.now >= lst for lst, _ in key[:k]) and all(b.now < lst for lst, _ in key[k:])
    assert key[:k] == sorted(key[:k]) and key[k:] == sorted(key[k:])
    taken = set(map(id, plan.decodes)) | set(map(id, plan.preempted))
    left_out = [
        r for r in b.running if not b.is_prefill[id(r)] and b.now >= b.lst[id(r)] and id(r) not in taken
    ]
    if left_out:
        event("SLAI left a critical decode out")
        assert k == len(plan.decodes)  # no non-critical decode instead
        # the decode cap is reached, or the budget went to critical decodes alone
        assert k == cfg.max_decodes or (k == cfg.token_budget and plan.prefills == [])


def run_workload(name: str, wl: Workload):
    pol = make(name, wl)
    log = TokenLog()
    eng = SimEngine(pol, LinearCost(), num_kv_blocks=wl.kv_blocks, block_size=BS, **log.engine_kwargs())
    tiers = [("paid", wl.paid_tbt_s), ("free", FREE_TBT_S)]
    reqs = [
        Request(f"r{i}", p, arr, tier=tiers[t][0], tbt_slo_s=tiers[t][1], tier_rank=t, max_output_tokens=o)
        for i, (p, o, arr, t) in enumerate(wl.requests)
    ]
    processed: dict[int, int] = defaultdict(int)
    wasted: dict[int, int] = defaultdict(int)
    kv = eng.state.kv
    i, now = 0, 0.0
    for _ in range(MAX_STEPS):
        while i < len(reqs) and reqs[i].arrival_s <= now:
            eng.add_request(reqs[i])
            i += 1
        if i == len(reqs) and not eng.has_work:
            break
        before = Before.of(eng, now)
        stepped = eng.step(now)
        if stepped is None:
            assert i < len(reqs), f"{name}: empty plan with {len(eng.state.running)} running, no arrivals left"
            now = max(now, reqs[i].arrival_s)
            continue
        plan, end = stepped
        assert end > now
        check_plan(pol, plan, before)
        for r in plan.preempted:
            wasted[id(r)] += before.computed[id(r)]
        for r, n in plan.prefills:
            processed[id(r)] += n
        for r in plan.decodes:
            processed[id(r)] += 1
        # KV: never over capacity, and the accounting matches what requests hold
        assert 0 <= kv.num_used_blocks <= kv.num_blocks
        assert kv.num_used_blocks == sum(r.num_blocks for r in eng.state.running)
        assert all(r.num_blocks == 0 and r.num_computed_tokens == 0 for r in eng.state.waiting)
        now = end
    else:
        pytest.fail(f"{name}: no termination after {MAX_STEPS} steps")
    event("preemptions" if eng.num_preemptions else "no preemption")  # --hypothesis-show-statistics
    return reqs, log, processed, wasted


@pytest.mark.parametrize("name", available_schedulers())
@PROPERTY_SETTINGS
@given(wl=workloads())
def test_every_scheduler_serves_every_request_exactly_once_within_its_limits(name, wl):
    reqs, log, processed, wasted = run_workload(name, wl)
    assert sorted(log.finished) == sorted(r.req_id for r in reqs), "each request finishes exactly once"
    for r in reqs:
        out = r.max_output_tokens
        assert r.is_finished and r.num_blocks == 0
        assert r.num_output_tokens == out
        # every known token but the last sampled one was computed, recompute excluded
        assert r.num_computed_tokens == r.prompt_len + out - 1
        assert processed[id(r)] - wasted[id(r)] == r.prompt_len + out - 1
        times = log.times[r.req_id]
        assert len(times) == out, f"{r.req_id}: {len(times)} tokens emitted, {out} expected"
        assert all(a < b for a, b in zip(times, times[1:])), "token times increase (one per iteration)"
        assert r.first_token_s == times[0] and r.last_token_s == times[-1]
        assert r.first_token_s - r.arrival_s >= 0  # TTFT
        assert math.isfinite(r.last_token_s)


@pytest.mark.parametrize("name", available_schedulers())
def test_engine_reports_a_request_that_can_never_fit(name):
    # 10 blocks of 16 tokens = 160 tokens of KV; the prompt alone needs 32 blocks.
    eng = SimEngine(make_policy(name), LinearCost(), num_kv_blocks=10, block_size=BS)
    eng.add_request(Request("too-long", 500, 0.0, max_output_tokens=1))
    with pytest.raises(SchedulerStalled) as err:
        eng.step(0.0)
    msg = str(err.value)
    assert name in msg and "too-long" in msg and "cannot fit" in msg, msg
