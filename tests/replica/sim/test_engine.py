"""SimEngine mechanics: what it does with a plan (KV reservation and release, preemption by
recompute, prefill progress, token emission), independent of which policy made the plan.

A scripted policy hands the engine exact plans where the mechanism is under test; a real policy
(Sarathi) takes over where ordinary scheduling is enough. Every iteration costs 1 s, so times
are iteration counts."""

from __future__ import annotations

from collections import defaultdict

import pytest

from replica.cost.model import CostModel
from replica.policy import BatchPlan, Request, SchedulingPolicy, make_policy
from replica.sim.engine import SimEngine

BS = 16


class OneSecond(CostModel):
    def iteration_time_s(self, shape) -> float:
        return 1.0


class Scripted(SchedulingPolicy):
    """Returns `steps[k](state)` at its k-th call, then defers to `then` (a real policy)."""

    name = "scripted"

    def __init__(self, *steps, then=None) -> None:
        self.steps = list(steps)
        self.then = then
        self.batches: list[tuple[float, float]] = []

    def schedule(self, state) -> BatchPlan:
        if self.steps:
            return self.steps.pop(0)(state)
        return self.then.schedule(state) if self.then is not None else BatchPlan()

    def on_batch_end(self, state, plan, start_s, end_s) -> None:
        self.batches.append((start_s, end_s))
        if self.then is not None:
            self.then.on_batch_end(state, plan, start_s, end_s)


class TokenLog:
    """Per request: (time, previous last_token_s) for every token, as the callbacks see them."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
        self.finished: list[str] = []

    def _one(self, r: Request, t: float) -> None:
        self.tokens[r.req_id].append((t, r.last_token_s))

    def _many(self, reqs, t: float) -> None:
        for r in reqs:
            self._one(r, t)

    def on_finish(self, r: Request) -> None:
        self.finished.append(r.req_id)

    def times(self, req_id: str) -> list[float]:
        return [t for t, _ in self.tokens[req_id]]

    def gaps(self, req_id: str) -> list[float]:
        return [t - prev for t, prev in self.tokens[req_id] if prev is not None]

    def engine_kwargs(self) -> dict:
        return {"on_finish": self.on_finish, "on_tokens": self._many}  # one call per iteration


def engine(policy, num_kv_blocks: int = 100, log: TokenLog | None = None) -> SimEngine:
    return SimEngine(policy, OneSecond(), num_kv_blocks=num_kv_blocks, block_size=BS, **(log or TokenLog()).engine_kwargs())


def req(req_id: str, prompt_len: int, max_output_tokens: int, arrival_s: float = 0.0) -> Request:
    return Request(req_id, prompt_len, arrival_s, max_output_tokens=max_output_tokens)


def run_until_idle(eng: SimEngine, now: float, max_steps: int = 1000) -> float:
    for _ in range(max_steps):
        stepped = eng.step(now)
        if stepped is None:
            return now
        now = stepped[1]
    raise AssertionError("engine did not go idle")


# --- admission of requests ---------------------------------------------------------------------


@pytest.mark.parametrize("max_output_tokens", [None, 0, -1])
def test_add_request_rejects_fewer_than_one_output_token(max_output_tokens):
    eng = engine(make_policy("sarathi-fcfs"))
    with pytest.raises(ValueError, match="r0.*max_output_tokens"):
        eng.add_request(req("r0", 10, max_output_tokens))
    assert not eng.has_work


def test_an_idle_engine_steps_to_none():
    eng = engine(make_policy("slai-spf-dynamic"))
    assert eng.step(0.0) is None
    assert eng.num_iterations == 0


# --- prefill and the first token ------------------------------------------------------------------


def test_the_first_token_comes_out_of_the_last_prefill_chunk():
    log = TokenLog()
    eng = engine(make_policy("sarathi-fcfs", token_budget=16), log=log)
    r = req("r", 40, 2, arrival_s=0.5)
    eng.add_request(r)
    plans = []
    now = 0.5
    for _ in range(3):  # chunks of 16, 16, 8
        plan, now = eng.step(now)
        plans.append([(x.req_id, n) for x, n in plan.prefills])
    assert plans == [[("r", 16)], [("r", 16)], [("r", 8)]]
    assert log.times("r") == [3.5]
    assert r.first_token_s == 3.5  # TTFT = prefill completion - arrival = 3 s
    assert r.num_output_tokens == 1 and not r.is_prefill


def test_a_prefill_reserves_kv_for_the_whole_prompt_at_admission():
    eng = engine(make_policy("sarathi-fcfs", token_budget=16))
    r = req("r", 100, 1)
    eng.add_request(r)
    eng.step(0.0)
    assert r.num_computed_tokens == 16
    assert r.num_blocks == 7 and eng.state.kv.num_used_blocks == 7  # ceil(100 / 16)


def test_a_decode_on_a_block_boundary_takes_one_more_block():
    eng = engine(make_policy("sarathi-fcfs"))
    r = req("r", 32, 3)  # 32 prompt tokens fill 2 blocks
    eng.add_request(r)
    eng.step(0.0)  # prefill, token 1
    assert r.num_blocks == 2
    eng.step(1.0)  # decode computes token 33: a third block
    assert r.num_blocks == 3 and eng.state.kv.num_used_blocks == 3


def test_a_plan_that_overcommits_kv_is_refused():
    d = req("d", 32, 5)
    eng = engine(Scripted(then=make_policy("sarathi-fcfs")), num_kv_blocks=2)
    eng.add_request(d)
    eng.step(0.0)  # d holds both blocks and needs a third to decode
    eng.policy.steps.append(lambda st: BatchPlan(decodes=[d]))  # no preemption: cannot fit
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        eng.step(1.0)


# --- finishing and aborting --------------------------------------------------------------------------


def test_finished_requests_free_their_kv_and_are_reported_once():
    log = TokenLog()
    eng = engine(make_policy("sarathi-fcfs"), log=log)
    a, b = req("a", 20, 1), req("b", 40, 3)
    eng.add_request(a)
    eng.add_request(b)
    eng.step(0.0)  # both prefilled; a is done after its first token
    assert a.is_finished and a.num_blocks == 0
    assert eng.state.running == [b] and eng.state.kv.num_used_blocks == b.num_blocks == 3
    run_until_idle(eng, 1.0)
    assert log.finished == ["a", "b"]
    assert eng.state.kv.num_used_blocks == 0 and eng.state.running == []
    assert [len(log.times(x)) for x in "ab"] == [1, 3]


def test_abort_frees_kv_of_a_running_request():
    eng = engine(make_policy("sarathi-fcfs"))
    a, b = req("a", 40, 10), req("b", 20, 10)
    eng.add_request(a)
    eng.add_request(b)
    eng.step(0.0)
    eng.abort(a)
    assert a.is_finished and a.num_blocks == 0
    assert eng.state.running == [b]
    assert eng.state.kv.num_used_blocks == b.num_blocks
    plan, _ = eng.step(1.0)
    assert a not in plan.decodes


def test_abort_removes_a_waiting_request():
    eng = engine(make_policy("sarathi-fcfs"))
    w = req("w", 20, 1)
    eng.add_request(w)
    eng.abort(w)
    assert w.is_finished and not eng.has_work and eng.state.kv.num_used_blocks == 0


# --- preemption by recompute ---------------------------------------------------------------------------


def preempted_b(budget: int = 512):
    """a and b (20-token prompts) decode; at t=1 a scripted plan preempts b while a decodes and
    w waits; afterwards Sarathi (token budget `budget`) schedules."""
    log = TokenLog()
    a, b, w = req("a", 20, 10), req("b", 20, 10, arrival_s=0.1), req("w", 2000, 1, arrival_s=0.5)
    pol = Scripted(
        lambda st: make_policy("sarathi-fcfs").schedule(st),  # t=0: admit and prefill a, b
        lambda st: BatchPlan(decodes=[a], preempted=[b]),  # t=1
        then=make_policy("sarathi-fcfs", token_budget=budget),
    )
    eng = engine(pol, num_kv_blocks=100, log=log)
    eng.add_request(a)
    eng.add_request(b)
    _, now = eng.step(0.0)
    eng.add_request(w)  # 2000 tokens = 125 blocks: never admitted here, stays waiting
    assert b.num_computed_tokens == 20 and b.num_blocks == 2
    _, now = eng.step(now)
    return eng, log, a, b, w, now


def test_a_preempted_request_goes_to_the_front_of_waiting_with_its_kv_freed():
    eng, _, a, b, w, _ = preempted_b()
    assert eng.state.waiting == [b, w]
    assert eng.state.running == [a]
    assert b.num_computed_tokens == 0 and b.num_blocks == 0
    assert eng.state.kv.num_used_blocks == a.num_blocks
    assert b.num_output_tokens == 1  # its sampled tokens are kept
    assert b.num_preemptions == 1 and eng.num_preemptions == 1


def test_several_victims_go_to_the_front_the_last_one_first():
    x, y, z = req("x", 20, 5), req("y", 20, 5), req("z", 20, 5)
    pol = Scripted(
        lambda st: make_policy("sarathi-fcfs").schedule(st),
        lambda st: BatchPlan(decodes=[x], preempted=[z, y]),  # lowest priority first
    )
    eng = engine(pol)
    for r in (x, y, z):
        eng.add_request(r)
    _, now = eng.step(0.0)
    late = req("late", 10, 1, arrival_s=now)
    eng.add_request(late)
    eng.step(now)
    assert eng.state.waiting == [y, z, late]


def test_a_preempted_request_resumes_by_reprefilling_prompt_and_outputs():
    eng, log, a, b, w, now = preempted_b(budget=9)  # a's decode + 8-token chunks
    first_token = b.first_token_s
    resumed = []
    for _ in range(3):
        plan, now = eng.step(now)
        resumed.append([(r.req_id, n) for r, n in plan.prefills])
    # 20 prompt tokens + 1 output token to recompute: chunks 8, 8, 5; the last emits token 2
    assert resumed == [[("b", 8)], [("b", 8)], [("b", 5)]]
    assert b.num_blocks == 2  # reserved for prompt + outputs (21 tokens) at readmission
    assert len(log.times("b")) == 2 and b.num_output_tokens == 2
    assert b.num_computed_tokens == 21 and not b.is_prefill
    assert b.first_token_s == first_token  # recompute does not move the first token


def test_the_token_after_a_preemption_has_a_gap_that_includes_the_stall():
    eng, log, a, b, w, now = preempted_b(budget=9)
    for _ in range(3):
        _, now = eng.step(now)
    # b's first token at t=1; preempted in [1, 2); re-prefilled in [2, 5): its next token at t=5
    assert log.times("b") == [1.0, 5.0]
    assert log.gaps("b") == [4.0]
    assert all(g == 1.0 for g in log.gaps("a"))  # a decoded every iteration


def test_preempted_requests_still_finish_with_all_their_tokens():
    eng, log, a, b, w, now = preempted_b()
    eng.abort(w)
    run_until_idle(eng, now)
    assert sorted(log.finished) == ["a", "b"]
    assert len(log.times("a")) == len(log.times("b")) == 10
    assert eng.state.kv.num_used_blocks == 0


# --- bookkeeping -----------------------------------------------------------------------------------------


def test_the_policy_learns_each_iterations_start_and_end():
    pol = Scripted(then=make_policy("sarathi-fcfs", token_budget=16))
    eng = engine(pol)
    eng.add_request(req("r", 40, 2))
    end = run_until_idle(eng, 10.0)
    assert pol.batches == [(10.0, 11.0), (11.0, 12.0), (12.0, 13.0), (13.0, 14.0)]
    assert end == 14.0 and eng.num_iterations == 4 and eng.busy_s == 4.0


def test_engine_keeps_the_waiting_queue_in_spf_order_with_preempted_in_front_of_equals():
    from replica.cost.shape import BatchShape  # noqa: F401  (the engine's cost contract)
    from replica.policy import Request, make_policy
    from replica.sim.engine import SimEngine

    class Zero(CostModel):
        def iteration_time_s(self, shape):
            return 0.0

    eng = SimEngine(make_policy("slai-spf-dynamic"), Zero(), num_kv_blocks=100)
    for i, n in enumerate([50, 10, 30, 10, 70]):
        eng.add_request(Request(req_id=f"r{i}", prompt_len=n, arrival_s=0.0, max_output_tokens=1))
    assert [r.req_id for r in eng.state.waiting] == ["r1", "r3", "r2", "r0", "r4"]
    assert eng.state.waiting_sorted_by == "spf"
    # the policy uses the kept order as it is, and it equals sorting an arrival-ordered queue
    unsorted = sorted(eng.state.waiting, key=lambda r: int(r.req_id[1:]))
    from replica.policy.base import AdmissionOrder, order_waiting
    from replica.policy.state import EngineState

    fresh = EngineState(now_s=0.0, kv=eng.state.kv, waiting=unsorted)
    assert list(order_waiting(fresh, AdmissionOrder.SPF)) == eng.state.waiting


# --- observing the policy ------------------------------------------------------------------------


def test_on_plan_sees_each_plan_before_the_engine_carries_it_out():
    seen = []  # (plan, the state's running ids, the prefills' progress) as on_plan saw them
    eng = SimEngine(make_policy("sarathi-fcfs"), OneSecond(), num_kv_blocks=100, block_size=BS,
                    on_plan=lambda st, plan: seen.append(
                        (plan, [r.req_id for r in st.running], [r.num_computed_tokens for r, _ in plan.prefills])))
    eng.add_request(req("a", 3 * BS, 2))
    ran = []
    now = 0.0
    while (stepped := eng.step(now)) is not None:
        ran.append(stepped[0])
        now = stepped[1]
    # every plan that ran, the same objects, then the empty plan that found nothing to run
    assert len(seen) == len(ran) + 1 and all(p is r for (p, _, _), r in zip(seen, ran))
    assert seen[-1][0].is_empty
    assert seen[0][1] == [] and seen[0][2] == [0]  # before admission and before the chunk ran
