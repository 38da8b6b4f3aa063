"""The sweep's process runner (loadtest.simulate.sweep.Runner): chains of rounds driven side by
side, each seeing only its own results, none waiting for another's round."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loadtest.simulate.sweep import Runner


def _echo(setup, key, qps):
    return {"key": key, "qps": qps}


def _rounds(key, qps_rounds, seen):
    for batch in qps_rounds:
        results = yield [(key, q) for q in batch]
        seen.append(sorted((r["key"], r["qps"]) for r in results))


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_chain_is_sent_its_own_batchs_results_round_after_round(jobs):
    seen_a, seen_b = [], []
    with Runner(None, jobs=jobs, progress=False, point_fn=_echo, key_field="key") as runner:
        runner.run_chains([_rounds("a", [[1.0, 2.0], [1.5], [1.25, 1.75]], seen_a),
                           _rounds("b", [[3.0], [], [4.0, 5.0]], seen_b)])
    assert seen_a == [[("a", 1.0), ("a", 2.0)], [("a", 1.5)], [("a", 1.25), ("a", 1.75)]]
    assert seen_b == [[("b", 3.0)], [], [("b", 4.0), ("b", 5.0)]]  # an empty round is sent no results


def _gated(setup, key, qps):
    """Chain "slow" waits (at most 30 s) for the file that chain "fast"'s third round writes."""
    gate = Path(setup) / "gate"
    if key == "slow":
        deadline = time.monotonic() + 30.0
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"key": key, "qps": qps, "released": gate.exists()}
    if qps == 3.0:
        gate.touch()
    return {"key": key, "qps": qps}


def test_a_chains_next_round_does_not_wait_for_another_chains_round(tmp_path):
    """With two workers, one chain's single task blocks until another chain's third round has
    run: that happens only if the other chain's rounds go on without it."""
    slow, seen_fast = [], []

    def slow_chain():
        slow.extend((yield [("slow", 9.0)]))

    with Runner(str(tmp_path), jobs=2, progress=False, point_fn=_gated, key_field="key") as runner:
        runner.run_chains([slow_chain(), _rounds("fast", [[1.0], [2.0], [3.0]], seen_fast)])
    assert seen_fast == [[("fast", 1.0)], [("fast", 2.0)], [("fast", 3.0)]]
    assert [r["released"] for r in slow] == [True]


def _fails(setup, key, qps):
    if qps == 2.0:
        raise RuntimeError("run 2.0 failed")
    return {"key": key, "qps": qps}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_stops_the_sweep_with_its_error(jobs):
    with Runner(None, jobs=jobs, progress=False, point_fn=_fails, key_field="key") as runner:
        with pytest.raises(RuntimeError, match="run 2.0 failed"):
            runner.run([("a", 1.0), ("a", 2.0)])


def test_run_returns_every_tasks_result():
    with Runner(None, jobs=2, progress=False, point_fn=_echo, key_field="key") as runner:
        out = runner.run([("a", 1.0), ("b", 2.0), ("a", 3.0)])
    assert sorted((r["key"], r["qps"]) for r in out) == [("a", 1.0), ("a", 3.0), ("b", 2.0)]


def _fails_first(setup, key, qps):
    if qps == 9.0:
        raise RuntimeError("run 9.0 failed")
    (Path(setup) / f"started-{qps}").touch()
    time.sleep(0.5)
    return {"key": key, "qps": qps}


def test_a_failed_run_stops_the_runs_still_queued(tmp_path):
    """The failing run goes first (heaviest first); the eight after it take 0.5 s each on the
    other worker: leaving the runner on the error stops them instead of waiting for them all."""
    with pytest.raises(RuntimeError, match="run 9.0 failed"):
        with Runner(str(tmp_path), jobs=2, progress=False, point_fn=_fails_first, key_field="key") as runner:
            runner.run([("a", float(q)) for q in range(1, 10)])
    assert len(list(tmp_path.glob("started-*"))) < 8
