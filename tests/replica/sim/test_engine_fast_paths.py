"""SimEngine's shortcuts give what the plain steps give: admissions that are not the waiting
queue's head, and decode stretches cut short by the KV blocks left."""

from __future__ import annotations

import pytest

from replica.cost.model import CostModel
from replica.policy import BatchPlan, Request, SchedulingPolicy, make_policy
from replica.sim.engine import SimEngine


class OneSecond(CostModel):
    def iteration_time_s(self, shape) -> float:
        return 1.0


class AdmitOnly(SchedulingPolicy):
    """Admits the waiting requests named `ids` (whole prompt in one chunk), then nothing."""

    name = "admit-only"

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def schedule(self, state) -> BatchPlan:
        plan = BatchPlan()
        for r in state.waiting:
            if r.req_id in self.ids:
                plan.admitted.append(r)
                plan.prefills.append((r, r.prompt_len))
        self.ids = []
        return plan


def _req(req_id: str, prompt_len: int, max_output_tokens: int) -> Request:
    return Request(req_id, prompt_len, 0.0, max_output_tokens=max_output_tokens)


@pytest.mark.parametrize("ids", [["a"], ["a", "b"], ["b"], ["a", "c"], ["c"]])
def test_admitted_requests_leave_the_waiting_queue_wherever_they_are(ids):
    eng = SimEngine(AdmitOnly(ids), OneSecond(), num_kv_blocks=100)
    reqs = {k: _req(k, 16, 3) for k in "abc"}
    for r in reqs.values():
        eng.add_request(r)
    eng.step(0.0)
    assert [r.req_id for r in eng.state.running] == ids
    assert [r.req_id for r in eng.state.waiting] == [k for k in "abc" if k not in ids]
    assert eng.state.kv.num_used_blocks == len(ids)


def _run(num_kv_blocks: int, fast: bool) -> tuple[list, list]:
    tokens: list[tuple[str, float]] = []

    def on_tokens(reqs, t):
        tokens.extend((r.req_id, t) for r in reqs)

    def on_repeated_tokens(reqs, ends):
        tokens.extend((r.req_id, t) for t in ends for r in reqs)

    eng = SimEngine(make_policy("sarathi-fcfs"), OneSecond(), num_kv_blocks=num_kv_blocks, block_size=16,
                    kv_watermark=0.0, on_tokens=on_tokens, on_repeated_tokens=on_repeated_tokens if fast else None)
    # prompts ending on and off block boundaries; long outputs, so the decodes outgrow the cache
    reqs = [_req(str(i), p, 60) for i, p in enumerate((16, 31, 40, 47))]
    for r in reqs:
        eng.add_request(r)
    now, blocks = 0.0, []
    while (stepped := eng.step(now)) is not None:
        now = stepped[1]
        blocks.append((now, eng.state.kv.num_used_blocks, [r.num_blocks for r in reqs]))
    states = [(r.req_id, r.num_output_tokens, r.num_preemptions, r.last_token_s, r.first_token_s) for r in reqs]
    return sorted(tokens), states + [eng.num_iterations, eng.num_preemptions, now], blocks


@pytest.mark.parametrize("num_kv_blocks", [14, 16, 20, 40])
def test_a_stretch_cut_short_by_free_blocks_is_the_same_as_stepping(num_kv_blocks):
    fast_tokens, fast_state, fast_blocks = _run(num_kv_blocks, fast=True)
    slow_tokens, slow_state, slow_blocks = _run(num_kv_blocks, fast=False)
    assert fast_tokens == slow_tokens
    assert fast_state == slow_state
    # the fast run's block counts at its (fewer) step ends are the slow run's at those times
    slow_at = {t: (used, per) for t, used, per in slow_blocks}
    assert all(slow_at[t] == (used, per) for t, used, per in fast_blocks)
    assert len(fast_blocks) < len(slow_blocks)
