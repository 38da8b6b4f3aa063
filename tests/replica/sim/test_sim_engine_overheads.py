"""SimEngine with a profile's engine overheads (`CostProfile.overheads`): what each iteration pays
beside its batch shape. Every batch costs 1 s, so what is left over is the overheads."""

from __future__ import annotations

import math

import pytest

from replica.cost.model import CostModel
from replica.cost.profile import EngineOverheads
from replica.policy import Request, make_policy
from replica.sim.engine import SimEngine

OVERHEADS = EngineOverheads(intake_ms=100.0, prefill_chunk_ms=50.0, wake_ms_per_e_fold=200.0,
                            wake_after_idle_s=1.0, wake_tail_ratio=0.5)


class OneSecondWithOverheads(CostModel):
    def __init__(self, overheads: EngineOverheads | None) -> None:
        self.overheads = overheads

    def iteration_time_s(self, shape) -> float:
        return 1.0


def request(req_id: str, prompt_len: int = 16, max_output_tokens: int = 40) -> Request:
    return Request(req_id, prompt_len, 0.0, max_output_tokens=max_output_tokens)


def engine(overheads: EngineOverheads | None = OVERHEADS) -> SimEngine:
    return SimEngine(make_policy("sarathi-fcfs"), OneSecondWithOverheads(overheads), num_kv_blocks=1000)


def run_to_end(eng: SimEngine, now: float) -> list[float]:
    """Iteration durations (one step at a time) until the engine is empty."""
    durations = []
    while (stepped := eng.step(now)) is not None:
        durations.append(stepped[1] - now)
        now = stepped[1]
    return durations


def test_the_first_iteration_pays_the_intake_of_every_request_taken_in_and_each_prefill_chunk():
    eng = engine()
    eng.add_request(request("a"))
    eng.add_request(request("b"))
    plan, end = eng.step(0.0)
    assert len(plan.prefills) == 2
    assert end == pytest.approx(1.0 + 2 * 0.1 + 2 * 0.05)


def test_a_busy_engine_pays_nothing_beside_its_decodes():
    eng = engine()
    eng.add_request(request("a", max_output_tokens=4))
    _, now = eng.step(0.0)  # the prefill (and its first token)
    assert sum(run_to_end(eng, now)) == pytest.approx(3.0, abs=1e-12)  # three decodes, back to back


def test_after_an_idle_gap_the_first_iteration_pays_the_wake_and_the_next_ones_its_tail():
    eng = engine()
    eng.add_request(request("a", max_output_tokens=1))
    _, end = eng.step(0.0)
    assert not eng.has_work
    idle_s = 1.0 * math.e ** 2  # two e-folds above wake_after_idle_s
    eng.add_request(request("b", max_output_tokens=4))
    durations = run_to_end(eng, end + idle_s)
    wake = 0.2 * 2
    assert durations[0] == pytest.approx(1.0 + 0.1 + 0.05 + wake)
    assert durations[1:] == pytest.approx([1.0 + wake * 0.5, 1.0 + wake * 0.25, 1.0 + wake * 0.125])


def test_a_gap_shorter_than_the_wake_threshold_costs_no_wake():
    eng = engine()
    eng.add_request(request("a", max_output_tokens=1))
    _, end = eng.step(0.0)
    eng.add_request(request("b", max_output_tokens=1))
    _, end2 = eng.step(end + 0.5)
    assert end2 - (end + 0.5) == pytest.approx(1.0 + 0.1 + 0.05)


def test_decode_stretches_are_not_fast_forwarded_past_a_wake_tail():
    """While a tail is owed the engine steps one iteration at a time: the run ends when stepping
    every iteration ends it, and that is the batches plus the overheads, tail included."""
    def last_end(fast_forward: bool) -> float:
        eng = SimEngine(make_policy("sarathi-fcfs"), OneSecondWithOverheads(OVERHEADS), num_kv_blocks=1000,
                        on_tokens=lambda reqs, t: None,
                        on_repeated_tokens=(lambda reqs, ts: None) if fast_forward else None)
        eng.add_request(request("a", max_output_tokens=30))
        now = 5.0
        while (stepped := eng.step(now)) is not None:
            now = stepped[1]
        return now

    wake = 0.2 * math.log(5.0 / 1.0)
    expected = 5.0 + 30 * 1.0 + 0.1 + 0.05 + wake * 2  # the tail: wake * (1/2 + 1/4 + ...)
    assert last_end(True) == pytest.approx(last_end(False), abs=1e-9)
    assert last_end(True) == pytest.approx(expected, abs=1e-5)


def test_without_overheads_an_iteration_costs_its_shape_alone():
    eng = engine(None)
    eng.add_request(request("a"))
    eng.add_request(request("b"))
    _, end = eng.step(0.0)
    assert end == 1.0
