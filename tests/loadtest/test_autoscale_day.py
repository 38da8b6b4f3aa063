"""The autoscaling benchmark's workloads, results and command (loadtest.simulate.autoscale), and
the arrivals its scalers see in the cluster simulator."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from loadtest.arrivals import diurnal_arrival_times, poisson_arrival_times
from loadtest.simulate.__main__ import main
from loadtest.simulate.autoscale import attainment_by_period, day_workload, recorded_workload
from loadtest.simulate.cluster import ClusterConfig, ScaleStep, run_cluster
from loadtest.simulate.replica import Workload
from replica.tiers import paper_tiers
from replica.traces import Trace, load_trace, sample_requests

CURVE = [(0.0, 1.0), (6.0, 0.25), (12.0, 2.0), (18.0, 1.0)]


@pytest.fixture(scope="module")
def paper():
    return load_trace("paper")


def test_a_day_draws_its_arrivals_from_the_curve_and_its_requests_as_the_paper_sweep_does(paper):
    tiers = paper_tiers()
    wl = day_workload(paper, CURVE, peak_qps=2.0, tiers=tiers, duration_s=7200.0, seed=3, start_hour=11.0)
    arrival = diurnal_arrival_times(CURVE, 2.0, 7200.0, 3, 11.0)
    n = len(arrival)
    prompts, outputs = sample_requests(paper, n, seed=3)
    np.testing.assert_array_equal(wl.arrival_s, arrival)
    np.testing.assert_array_equal(wl.prompt_lens, prompts)
    np.testing.assert_array_equal(wl.output_lens, outputs)
    np.testing.assert_array_equal(wl.tier_idx, tiers.assign(n, seed=3))
    assert wl.qps == n / 7200.0 and wl.prefix_hashes is None


def _timestamped(n=6, prefixes=True):
    return Trace(prompt_lens=np.arange(100, 100 + n), output_lens=np.full(n, 8), source="hand-made.jsonl",
                 arrival_s=np.array([0.0, 0.5, 0.5, 2.0, 3.5, 4.0][:n]),
                 prefix_hashes=tuple((i, i + 1) for i in range(n)) if prefixes else None, hash_block_tokens=32)


def test_a_recorded_trace_is_replayed_in_order_at_its_own_pace_times_the_stretch():
    trace = _timestamped()
    wl = recorded_workload(trace, paper_tiers(), stretch=3.0, seed=1, max_requests=5)
    np.testing.assert_array_equal(wl.arrival_s, [0.0, 1.5, 1.5, 6.0, 10.5])
    np.testing.assert_array_equal(wl.prompt_lens, [100, 101, 102, 103, 104])
    assert wl.prefix_hashes == trace.prefix_hashes[:5] and wl.hash_block_tokens == 32
    assert wl.qps == 4 / 10.5


@pytest.mark.parametrize("kwargs, trace, message", [
    ({"stretch": 0.0}, _timestamped(), "stretch must be > 0"),
    ({}, _timestamped(prefixes=False), "no prefix hashes"),
])
def test_a_recording_that_cannot_be_replayed_is_refused(kwargs, trace, message):
    with pytest.raises(ValueError, match=message):
        recorded_workload(trace, paper_tiers(), **kwargs)


def test_a_trace_without_timestamps_is_refused(paper):
    with pytest.raises(ValueError, match="no timestamps"):
        recorded_workload(paper, paper_tiers())


@pytest.mark.parametrize("arrival_s, arrivals, message", [
    ([0.0, 1.0], "poisson", "3 non-decreasing"),
    ([0.0, 2.0, 1.0], "poisson", "non-decreasing"),
    ([-1.0, 0.0, 1.0], "poisson", "from 0"),
    ([0.0, 1.0, 2.0], "replay", "not both"),
])
def test_workload_build_refuses_arrival_times_it_cannot_use(paper, arrival_s, arrivals, message):
    with pytest.raises(ValueError, match=message):
        Workload.build(paper, 3, 1.0, paper_tiers(), arrivals=arrivals, arrival_s=np.array(arrival_s))


def _hand_run(tier_idx, arrival_s, ttft_s, tbt_miss_frac):
    tiers = paper_tiers()
    n = len(tier_idx)
    wl = Workload(arrival_s=np.array(arrival_s, dtype=float), prompt_lens=np.full(n, 10), output_lens=np.full(n, 10),
                  tier_idx=np.array(tier_idx), tiers=tiers, qps=1.0)
    return SimpleNamespace(workload=wl, ttft_s=np.array(ttft_s, dtype=float), tbt_miss_frac=np.array(tbt_miss_frac))


def test_attainment_by_period_counts_each_request_in_the_period_it_arrived():
    # tier 0 = premium, 1 = free (the paper's); periods of 10 s; the last arrival at 25 s: 3 periods
    run = _hand_run(tier_idx=[0, 0, 1, 1, 1, 0],
                    arrival_s=[1.0, 9.0, 12.0, 15.0, 19.0, 25.0],
                    ttft_s=[0.1, 0.9, 0.2, 0.2, 0.1, 0.3],  # premium's second misses the 0.5 s target
                    tbt_miss_frac=[0.0, 0.0, 0.02, 0.0, 0.0, 0.0])  # free's first misses its TBT SLO
    assert attainment_by_period(run, 10.0) == {"premium": [0.5, None, 1.0], "free": [None, round(2 / 3, 5), None]}


class _Recorder:
    """A scaler that holds the count and keeps every view it gets."""

    period_s, startup_s, arrival_window_s = 1.0, 5.0, 7.0

    def __init__(self):
        self.views = []

    def decide(self, view):
        self.views.append(view)
        return ScaleStep(view.running + view.starting, "hold")


def test_a_scaler_sees_the_arrivals_of_its_window_per_tier_and_each_replicas_held_requests(paper):
    tiers = paper_tiers()
    n = 120
    arrival = poisson_arrival_times(n, 2.0, seed=4)
    prompts, outputs = sample_requests(paper, n, seed=4)
    wl = Workload(arrival_s=arrival, prompt_lens=np.asarray(prompts), output_lens=np.minimum(outputs, 32),
                  tier_idx=tiers.assign(n, seed=4), tiers=tiers, qps=2.0)
    scaler = _Recorder()
    run = run_cluster(wl, ClusterConfig(num_replicas=2, seed=1), scaler=scaler)
    assert len(scaler.views) > 30
    for view in scaler.views:
        now, window = view.now_s, scaler.arrival_window_s
        span = max(min(window, now), scaler.period_s)
        seen = (arrival >= now - window) & (arrival <= now)  # arrivals at `now` are routed before the decision
        for k, tier in enumerate(tiers.tiers):
            mine = seen & (wl.tier_idx == k)
            assert view.arrival_rates_rps[tier.name] == int(mine.sum()) / span
            expected_mean = float(wl.prompt_lens[mine].sum()) / int(mine.sum()) if mine.any() else 0.0
            assert view.mean_prompt_tokens[tier.name] == pytest.approx(expected_mean, rel=1e-12)
        assert view.running == 2 and view.starting == 0 and set(view.ongoing) == {"replica-000", "replica-001"}
        # held: arrived and not finished (finishes and arrivals at `now` come before the decision)
        assert sum(view.ongoing.values()) == int((arrival <= now).sum()) - int((run.finish_s <= now).sum())
    assert any(sum(v.ongoing.values()) > 1 for v in scaler.views)


def test_the_command_writes_a_results_json_whose_numbers_agree(tmp_path, capsys):
    out = tmp_path / "day.json"
    rc = main(["autoscale", "--policy", "tier-aware", "--peak-qps", "1.5", "--duration-s", "900",
               "--start-hour", "12", "--min-replicas", "1", "--max-replicas", "3", "--startup-s", "60",
               "--bucket-s", "300", "--json", str(out)])
    assert rc == 0
    brief = json.loads(capsys.readouterr().out)
    res = json.loads(out.read_text())
    assert brief["gpu_hours"] == res["gpu_hours"] and brief["requests"] == res["requests"] > 0
    assert res["unfinished"] == 0 and res["setup"]["policy"] == "tier-aware"
    assert res["mean_replicas"] == pytest.approx(res["gpu_hours"] * 3600 / res["makespan_s"])
    assert 1 <= res["max_replicas"] <= 3 and res["replicas_created"] >= 1
    series = res["replicas_series"]
    assert len(series["gpu"]) == len(series["serving"]) == -(-int(res["makespan_s"]) // 300)
    assert res["scale_ups"] == sum(1 for e in res["scale_events"] if e["to"] > e["from"])
    assert set(res["attainment"]) == set(res["attainment_by_hour"]) == {"premium", "free"}


@pytest.mark.parametrize("args, message", [
    (["--policy", "fixed"], "--policy fixed needs --replicas"),
    ([], "--policy is required"),
    (["--policy", "fixed", "--replicas", "1", "--workload", "mooncake", "--stretch", "0"], "stretch must be > 0"),
])
def test_the_command_refuses_what_it_cannot_run(args, message, capsys):
    assert main(["autoscale", *args]) == 2
    assert message in capsys.readouterr().err
