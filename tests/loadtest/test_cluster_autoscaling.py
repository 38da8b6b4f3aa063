"""Autoscaling in the cluster simulator (loadtest.simulate.cluster with a scaler) and the policies
of loadtest.simulate.autoscale: start-up, draining, GPU-hours, ours on a load step, Ray's default."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.arrivals import poisson_arrival_times
from loadtest.simulate.autoscale import RayDefaultScaler, TierAwareScaler, attainment, occupancy
from loadtest.simulate.cluster import ClusterConfig, ReplicaSpan, ScaleStep, ScalingView, gpu_hours, run_cluster
from loadtest.simulate.replica import Workload
from replica.tiers import paper_tiers
from replica.traces import load_trace, sample_requests
from serve_app.config import ReplicaAutoscalingConfig


@pytest.fixture(scope="module")
def trace():
    return load_trace("paper")


def _workload(trace, phases, seed=5, max_output=64):
    """Poisson arrivals in phases of (duration_s, qps), paper prompts, outputs capped (fast runs)."""
    parts, t0 = [], 0.0
    for k, (duration, qps) in enumerate(phases):
        t = poisson_arrival_times(int(duration * qps), qps, seed=seed + k)
        parts.append(t0 + t[t < duration])
        t0 += duration
    arrival = np.concatenate(parts)
    n = len(arrival)
    prompts, outputs = sample_requests(trace, n, seed=seed)
    tiers = paper_tiers()
    return Workload(arrival_s=arrival, prompt_lens=np.asarray(prompts, dtype=np.int64),
                    output_lens=np.minimum(np.asarray(outputs, dtype=np.int64), max_output),
                    tier_idx=tiers.assign(n, seed=seed), tiers=tiers, qps=n / t0)


class Script:
    """A scaler that asks for ``steps`` = [(time, target), ...] and records what it saw."""

    def __init__(self, steps, startup_s=30.0, period_s=1.0):
        self.steps, self.startup_s, self.period_s, self.arrival_window_s = steps, startup_s, period_s, 30.0
        self.views: list[ScalingView] = []

    def decide(self, view):
        self.views.append(view)
        target = view.running + view.starting
        for t, n in self.steps:
            if view.now_s >= t:
                target = n
        return ScaleStep(target, "script")


def test_a_replica_added_serves_only_after_startup_s(trace):
    wl = _workload(trace, [(200, 1.5)])
    run = run_cluster(wl, ClusterConfig(num_replicas=1), scaler=Script([(10, 2)], startup_s=50))
    new = run.replica_spans[1]
    assert (new.requested_s, new.ready_s) == (10.0, 60.0)
    to_new = wl.arrival_s[run.replica_of == 1]
    assert len(to_new) > 0 and to_new.min() >= 60.0  # routed to only once it serves
    assert run.unfinished == 0


def test_a_drained_replica_gets_no_new_requests_and_finishes_what_it_holds(trace):
    wl = _workload(trace, [(120, 3.0)], max_output=400)
    run = run_cluster(wl, ClusterConfig(num_replicas=2), scaler=Script([(40, 1)]))
    drained = [s for s in run.replica_spans if s.drained_s is not None]
    assert len(drained) == 1 and drained[0].drained_s == 40.0
    k = run.replica_ids.index(drained[0].replica_id)
    mine = run.replica_of == k
    assert wl.arrival_s[mine].max() <= 40.0  # nothing new after the drain
    assert run.unfinished == 0 and np.isfinite(run.finish_s).all()  # nothing lost
    assert sum(w.sum() for w in run.tbt_weight.values()) == (wl.output_lens - 1).sum()  # nothing cut
    held_past_drain = run.finish_s[mine].max()
    assert held_past_drain > 40.0 and drained[0].gone_s == pytest.approx(held_past_drain)  # gone once done


def test_a_starting_replica_is_cancelled_before_a_running_one_is_drained(trace):
    wl = _workload(trace, [(100, 1.0)])
    run = run_cluster(wl, ClusterConfig(num_replicas=1), scaler=Script([(5, 2), (20, 1)], startup_s=60))
    new = run.replica_spans[1]
    assert (new.requested_s, new.ready_s, new.gone_s) == (5.0, None, 20.0)
    assert run.replica_spans[0].drained_s is None and (run.replica_of == 0).all()


@pytest.mark.parametrize(("spans", "end_s", "hours"), [
    ([ReplicaSpan("a", 0.0, 0.0, None, None)], 7200.0, 2.0),  # runs to the end
    ([ReplicaSpan("a", 0.0, 0.0, None, None), ReplicaSpan("b", 1800.0, 1920.0, 3600.0, 5400.0)], 7200.0, 3.0),
    ([ReplicaSpan("b", 3600.0, None, None, 3780.0)], 7200.0, 0.05),  # cancelled while starting: start-up counts
    ([ReplicaSpan("c", 0.0, 0.0, 100.0, None)], 3600.0, 1.0),  # draining until the end
])
def test_gpu_hours_of_a_hand_made_schedule(spans, end_s, hours):
    assert gpu_hours(spans, end_s) == pytest.approx(hours)


def test_gpu_hours_of_a_run_count_startup_and_drain(trace):
    wl = _workload(trace, [(120, 2.0)], max_output=200)
    fixed = run_cluster(wl, ClusterConfig(num_replicas=2))
    assert fixed.gpu_hours == pytest.approx(2 * fixed.makespan_s / 3600)
    run = run_cluster(wl, ClusterConfig(num_replicas=1), scaler=Script([(10, 2), (60, 1)], startup_s=20))
    (drained,) = [s for s in run.replica_spans if s.drained_s is not None]
    assert drained.drained_s == 60.0 and drained.gone_s >= 60.0
    # one replica from 0 to the end, one from its request at 10 s (start-up included) until the
    # drained one is gone: whichever was drained, that is end + gone - 10
    assert run.gpu_hours == pytest.approx((run.makespan_s + drained.gone_s - 10.0) / 3600)
    assert occupancy([(0.0, 60.0), (30.0, 90.0)], 120.0, 60.0) == [1.5, 0.5]


def test_tier_aware_scales_up_on_a_load_step_and_back_down_after_it_within_bounds(trace):
    wl = _workload(trace, [(200, 0.5), (300, 5.0), (700, 0.3)])
    cfg = ReplicaAutoscalingConfig(min_replicas=1, max_replicas=3, startup_s=20.0)
    run = run_cluster(wl, ClusterConfig(num_replicas=1), scaler=TierAwareScaler(wl.tiers, cfg))
    def target_at(t):
        return next((e.to_replicas for e in reversed(run.scale_events) if e.time_s <= t), 1)

    during = [e.to_replicas for e in run.scale_events if 200.0 <= e.time_s <= 500.0]
    assert during and max(during) > target_at(199.0)  # more replicas for the step
    assert all(1 <= e.to_replicas <= 3 for e in run.scale_events)  # within the bounds
    assert target_at(run.makespan_s) < max(during)  # and fewer after it
    assert any(e.reason == "scale_down" and e.time_s > 500.0 for e in run.scale_events)
    assert run.unfinished == 0


def _ray_reference(config, now_s, running, target, total_num_requests, state):
    """Serve's controller on this context: the wrapped default policy with the wall clock at
    ``now_s``, then the bounds (AutoscalingState.get_decision_num_replicas)."""
    import math
    from unittest import mock

    from ray.serve import autoscaling_policy as rp
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    ctx = AutoscalingContext(
        deployment_id=DeploymentID(name="x", app_name="y"), deployment_name="x", app_name="y",
        current_num_replicas=running, target_num_replicas=target, running_replicas=[],
        total_num_requests=total_num_requests, total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state), last_scale_up_time=None, last_scale_down_time=None, current_time=now_s,
        config=config)
    with mock.patch.object(rp.time, "time", return_value=now_s):
        decision, state = rp._apply_autoscaling_config(rp.replica_queue_length_autoscaling_policy)(ctx)
    if isinstance(decision, float):
        decision = math.ceil(decision)
    return max(config.min_replicas, min(config.max_replicas, decision)), state


def test_the_ray_default_model_matches_rays_own_policy():
    # (time, running, target, ongoing averaged): a rise held for upscale_delay_s, a dip, a long fall
    steps = [(0, 2, 2, 4.0), (10, 2, 2, 9.0), (20, 2, 2, 9.5), (40, 2, 2, 9.0), (45, 2, 5, 9.0), (60, 5, 5, 30.0),
             (61, 5, 5, 3.0), (200, 5, 5, 3.0), (700, 5, 5, 3.0), (801, 5, 5, 3.0), (802, 2, 2, 0.0), (1500, 2, 2, 0.0)]
    ours = RayDefaultScaler(min_replicas=1, max_replicas=8, startup_s=60.0, target_ongoing_requests=2.0,
                            downscale_delay_s=600.0, upscale_delay_s=30.0)
    state: dict = {}
    decisions = []
    for now, running, target, ongoing in steps:
        expected, state = _ray_reference(ours.config, float(now), running, target, ongoing, state)
        got = ours.decide_on(float(now), running, target, ongoing)
        decisions.append(got)
        assert got == expected, (now, got, expected)
    assert decisions[:4] == [2, 2, 2, 5] and decisions[-1] == 1  # it did scale both ways


def test_results_are_deterministic_for_a_seed(trace):
    wl = _workload(trace, [(100, 0.5), (150, 4.0)], max_output=100)
    cfg = ReplicaAutoscalingConfig(min_replicas=1, max_replicas=3, startup_s=15.0)
    runs = [run_cluster(wl, ClusterConfig(num_replicas=1, seed=3), scaler=TierAwareScaler(wl.tiers, cfg))
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].ttft_s, runs[1].ttft_s)
    np.testing.assert_array_equal(runs[0].replica_of, runs[1].replica_of)
    assert runs[0].replica_spans == runs[1].replica_spans and runs[0].scale_events == runs[1].scale_events
    assert attainment(runs[0]) == attainment(runs[1])
