"""The P99-TTFT-bounded capacity of the paper sweep (loadtest/simulate/sweep.py, report.py)."""

from __future__ import annotations

import pytest

from loadtest.metrics import p99_ttft_ok
from loadtest.simulate.sweep import Runner, sweep_with_capacity

# a fake replica: SLOs met up to 2.0 QPS, stable up to 1.8, P99 TTFT 4 s x QPS (over 10 s above 2.5)
def _point(setup, scheduler, qps):
    return {"scheduler": scheduler, "qps": qps, "slo_met": qps <= 2.0, "stable_slo_met": qps <= 1.8,
            "ttft_p99_s": 4.0 * qps}


def _sweep(bound):
    with Runner(None, jobs=1, progress=False, point_fn=_point) as runner:
        return sweep_with_capacity(runner, ["a"], [0.5, 1.0, 1.5, 2.0, 2.5], refine_steps=3,
                                   p99_ttft_bound_s=bound)["a"]


def test_point_over_the_bound_fails():
    assert p99_ttft_ok({"stable_slo_met": True, "ttft_p99_s": 9.9}, 10.0)
    assert not p99_ttft_ok({"stable_slo_met": True, "ttft_p99_s": 10.1}, 10.0)
    assert not p99_ttft_ok({"stable_slo_met": False, "ttft_p99_s": 1.0}, 10.0)
    assert not p99_ttft_ok({"stable_slo_met": True, "ttft_p99_s": float("nan")}, 10.0)


def test_p99_ttft_capacity_bisects_to_the_bound():
    r = _sweep(5.0)  # P99 TTFT <= 5 s up to 1.25 QPS
    assert r["p99_ttft_capacity_qps"] == pytest.approx(1.25)
    assert r["p99_ttft_bound_s"] == 5.0 and all(p["qps"] < r["stable_capacity_qps"] for p in r["p99_ttft_points"])


def test_p99_ttft_capacity_is_at_most_the_stable_capacity():
    r = _sweep(1000.0)  # the bound never binds: the stable capacity, not refined past it
    assert r["p99_ttft_capacity_qps"] == r["stable_capacity_qps"] and r["p99_ttft_points"] == []


def test_other_capacities_and_points_unchanged():
    with_bound, without = _sweep(5.0), _sweep(None)
    for key in ("capacity_qps", "stable_capacity_qps"):
        assert with_bound[key] == without[key]
    assert [p["qps"] for p in with_bound["points"]] == [p["qps"] for p in without["points"]]
    assert "p99_ttft_capacity_qps" not in without
