"""Ray Serve's side of the replica autoscaling (serve_app.ray_autoscaling, replica.autoscaling_stats):
what a replica reports, how the policy reads it back from Serve's AutoscalingContext, and the
options the app and the KubeRay render give Serve.  No cluster: Serve's own config classes and
context are built by hand."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve._private.common import TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from replica.autoscaling_stats import ArrivalCounter, autoscaling_stats
from replica.policy.state import EngineState, KVCache
from replica.slo import SLOTracker
from serve_app.app import replica_count_options, replica_graceful_shutdown_timeout_s
from serve_app.config import AppConfig
from serve_app.ray_autoscaling import (POLICY_FUNCTION, TierAwareServePolicy, arrivals_from_series,
                                       feedback_from_stats, policy_config, replica_autoscaling_config)

T0 = 1_800_000_000.0
AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "startup_s": 60, "downscale_cooldown_s": 0}


def app_config(**replicas) -> AppConfig:
    return AppConfig.model_validate({"replicas": replicas})


def snapshot(rid: str = "r0", ts: float = T0, **fields) -> dict:
    snap = {"version": 1, "replica_id": rid, "timestamp_s": ts, "num_waiting": 2, "num_running": 5,
            "waiting_prefill_tokens": 1500, "running_decodes_by_tier": {"premium": 1, "free": 4},
            "kv_usage": 0.25, "mean_batch_time_s": 0.05,
            "waiting_prompt_histogram": {"edges": [0, 128, 512, 2048], "counts": [0, 1, 0, 1]},
            "tiers": {"premium": {"ttft_p99_s": 0.3, "tbt_p99_s": 0.08, "tbt_miss_frac": 0.0, "tbt_misses_total": 1,
                                  "tokens_total": 400, "ttft_misses_total": 0, "ttft_p50_s": None},
                      "free": {"tbt_p99_s": 0.2, "tbt_miss_frac": 0.01, "tokens_total": 900}}}
    snap.update(fields)
    return snap


def series(*points: tuple[float, float]) -> list[TimeStampedValue]:
    return [TimeStampedValue(t, v) for t, v in points]


def context(policy_metrics: dict, running: list[str], target: int, now: float = T0) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMReplica", app_name="default", current_num_replicas=len(running),
        target_num_replicas=target, running_replicas=running, total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={}, raw_metrics=policy_metrics, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=None)


def reported(rid: str, snap: dict, counter: ArrivalCounter, ts: float) -> dict[str, dict[str, list]]:
    """One replica's report as Serve's raw metrics hold it: metric -> {replica: one point}."""
    return {k: {rid: series((ts, v))} for k, v in autoscaling_stats(snap, counter).items()}


# ------------------------------------------------------------------------------- the report

def test_the_feedback_a_replica_reports_reads_back_as_its_snapshot():
    snap = snapshot()
    stats = autoscaling_stats(snap, ArrivalCounter())
    assert all(isinstance(v, float) for v in stats.values())  # Serve's custom metrics are floats
    fb = feedback_from_stats("r0", stats)
    assert fb is not None
    assert (fb.replica_id, fb.timestamp_s, fb.num_waiting, fb.waiting_prefill_tokens) == ("r0", T0, 2, 1500)
    assert fb.running_decodes_by_tier == {"premium": 1, "free": 4}
    assert (fb.kv_usage, fb.mean_batch_time_s) == (0.25, 0.05)
    assert fb.tiers["premium"].tbt_p99_s == 0.08 and fb.tiers["premium"].tbt_misses_total == 1
    assert fb.tiers["premium"].ttft_p50_s is None and fb.tiers["free"].tokens_total == 900
    assert fb.waiting_prompt_histogram.edges == (0, 128, 512, 2048)
    assert fb.waiting_prompt_histogram.counts == (0, 1, 0, 1)


def test_a_real_tracker_snapshot_survives_the_round_trip():
    tracker = SLOTracker({"premium": 0.1, "free": 0.5}, {"premium": 0.5, "free": 0.5})
    snap = tracker.snapshot("r7", EngineState(now_s=10.0, kv=KVCache(num_blocks=64)), 0.04, now=10.0, timestamp_s=T0)
    fb = feedback_from_stats("r7", autoscaling_stats(snap, ArrivalCounter()))
    assert fb is not None and fb.timestamp_s == T0 and fb.mean_batch_time_s == 0.04


def test_a_metric_missing_from_the_latest_report_is_not_read_from_an_older_one():
    from serve_app.ray_autoscaling import latest_values

    raw = {"feedback/timestamp_s": {"a": series((T0 - 1, T0 - 1), (T0, T0))},
           "feedback/decodes/premium": {"a": series((T0 - 1, 3.0))},  # premium had decodes a second ago
           "feedback/decodes/free": {"a": series((T0 - 1, 2.0), (T0, 5.0))}}
    fb = feedback_from_stats("a", latest_values(raw, "a"))
    assert fb.timestamp_s == T0 and fb.running_decodes_by_tier == {"free": 5}


def test_a_replica_without_a_snapshot_reports_no_feedback():
    assert feedback_from_stats("r0", {"arrived/free/requests": 3.0}) is None


def test_an_invalid_report_is_no_feedback_not_an_error():
    stats = autoscaling_stats(snapshot(), ArrivalCounter())
    stats["feedback/kv_usage"] = -1.0
    assert feedback_from_stats("r0", stats) is None


def test_the_arrival_counters_count_requests_and_prompt_tokens_per_tier():
    c = ArrivalCounter()
    for tier, n in (("free", 100), ("free", 300), ("premium", 50)):
        c.record(tier, n)
    assert c.stats() == {"arrived/free/requests": 2.0, "arrived/free/prompt_tokens": 400.0,
                         "arrived/premium/requests": 1.0, "arrived/premium/prompt_tokens": 50.0}


# ------------------------------------------------------------------------------- the rates

def test_arrival_rates_are_each_replicas_rise_over_its_span_summed():
    raw = {"arrived/free/requests": {"a": series((0, 10), (5, 20), (10, 30)), "b": series((4, 0), (8, 4))},
           "arrived/free/prompt_tokens": {"a": series((0, 0), (10, 20_000)), "b": series((4, 0), (8, 4_000))}}
    arrivals = arrivals_from_series(raw)
    free = arrivals.tiers["free"]
    assert free.rate_rps == pytest.approx(2.0 + 1.0)
    assert free.mean_prompt_tokens == pytest.approx((2_000 + 1_000) / 3.0)


def test_a_replica_with_one_report_adds_no_rate_yet():
    raw = {"arrived/free/requests": {"a": series((3, 10))}, "arrived/free/prompt_tokens": {"a": series((3, 900))}}
    free = arrivals_from_series(raw).tiers["free"]
    assert (free.rate_rps, free.mean_prompt_tokens) == (0.0, 0.0)


def test_feedback_metrics_are_not_arrivals():
    assert arrivals_from_series({"feedback/kv_usage": {"a": series((0, 0.1), (1, 0.2))}}).tiers == {}


# ------------------------------------------------------------------------------- the policy

def policy(**autoscaling) -> TierAwareServePolicy:
    return TierAwareServePolicy(**policy_config(app_config(autoscaling={**AUTOSCALING, **autoscaling})))


def test_the_policy_scales_up_on_what_the_replicas_report():
    # 2 replicas x 10 requests/s of 2,000 prompt tokens = 40k prefill tokens/s; a replica with these
    # decodes prefills ~10.2k/s (512-token batches of 50 ms), 70 % of it: 6 replicas
    raw: dict = {}
    for k, rid in enumerate(("a", "b")):
        c = ArrivalCounter()
        for _ in range(100):
            c.record("free", 2000)
        first = {key: v for key, v in c.stats().items()}
        for _ in range(100):
            c.record("free", 2000)
        for key, v in autoscaling_stats(snapshot(rid), c).items():
            raw.setdefault(key, {})[rid] = (series((T0 - 10, first[key]), (T0, v)) if key in first
                                            else series((T0, v)))
    target, state = policy(max_replicas=8)(context(raw, ["a", "b"], 2))
    assert (target, state["tiered_reason"]) == (6, "forecast")


def test_replicas_asked_for_and_not_running_count_as_starting():
    raw = reported("a", snapshot("a"), ArrivalCounter(), T0)
    target, state = policy()(context(raw, ["a"], 3))
    assert (target, state["tiered_reason"]) == (3, "hold")  # no scale-down while two start


def test_an_idle_deployment_scales_down_by_one():
    raw = {}
    for rid in ("a", "b", "c"):
        for key, v in reported(rid, snapshot(rid, waiting_prefill_tokens=0, num_waiting=0,
                                             running_decodes_by_tier={}), ArrivalCounter(), T0).items():
            raw.setdefault(key, {}).update(v)
    target, state = policy()(context(raw, ["a", "b", "c"], 3))
    assert (target, state["tiered_reason"]) == (2, "scale_down")


# ------------------------------------------------------------------------------- Serve's options

def test_serve_accepts_the_autoscaling_config_and_builds_the_policy_from_it():
    cfg = app_config(autoscaling=AUTOSCALING)
    options = replica_autoscaling_config(cfg)
    serve_cfg = AutoscalingConfig.model_validate(options)
    assert (serve_cfg.min_replicas, serve_cfg.max_replicas, serve_cfg.initial_replicas) == (1, 4, 1)
    assert (serve_cfg.upscale_delay_s, serve_cfg.downscale_delay_s) == (0.0, 0.0)  # the cooldowns are the policy's
    assert serve_cfg.policy.policy_function == POLICY_FUNCTION
    built = AutoscalingPolicy(**options["policy"]).get_policy()
    assert built is TierAwareServePolicy
    assert isinstance(built(**serve_cfg.policy.policy_kwargs), TierAwareServePolicy)


def test_without_autoscaling_the_replicas_are_a_fixed_count():
    cfg = app_config(num_replicas=3)
    assert replica_autoscaling_config(cfg) is None
    assert replica_count_options(cfg) == {"num_replicas": 3}


@pytest.mark.parametrize("replicas,initial", [
    ({"autoscaling": {"min_replicas": 2, "max_replicas": 5}}, 2),
    ({"num_replicas": 4, "autoscaling": {"min_replicas": 2, "max_replicas": 5}}, 4),
])
def test_serve_starts_num_replicas_or_else_min_replicas(replicas, initial):
    cfg = app_config(**replicas)
    assert replica_count_options(cfg)["autoscaling_config"]["initial_replicas"] == initial
    assert (cfg.replicas.min_count, cfg.replicas.max_count) == (2, 5)


def test_num_replicas_outside_the_autoscaling_bounds_is_refused():
    with pytest.raises(ValidationError, match="outside the autoscaling bounds"):
        app_config(num_replicas=6, autoscaling={"min_replicas": 2, "max_replicas": 5})


def test_a_report_period_not_under_admissions_feedback_age_is_refused():
    """The policy reads only snapshots younger than admission.max_feedback_age_s."""
    with pytest.raises(ValidationError, match="6 must be under admission.max_feedback_age_s"):
        AppConfig.model_validate({"replicas": {"autoscaling": {**AUTOSCALING, "metrics_period_s": 6.0}}})
    ok = AppConfig.model_validate({"replicas": {"autoscaling": {**AUTOSCALING, "metrics_period_s": 6.0}},
                                   "admission": {"max_feedback_age_s": 10.0}})
    assert ok.replicas.autoscaling.metrics_period_s == 6.0


def test_a_scaled_down_replica_drains_for_drain_timeout_s():
    fixed = app_config()
    scaled = app_config(autoscaling={**AUTOSCALING, "drain_timeout_s": 900})
    assert replica_graceful_shutdown_timeout_s(fixed) == fixed.http.drain_timeout_s + 5
    assert replica_graceful_shutdown_timeout_s(scaled) == 900


def test_the_policy_kwargs_hold_no_keys():
    cfg = AppConfig.model_validate({"api_keys": {"hashes": {"a" * 64: "free"}}, "replicas": {"autoscaling": AUTOSCALING}})
    assert set(policy_config(cfg)) == {"tiers", "admission", "autoscaling", "token_budget"}


def test_the_policy_decides_once_per_metrics_period_unless_the_counts_change():
    p = policy(metrics_period_s=1.0)
    calls = []
    decide = p.scaler.decide
    p.scaler.decide = lambda *a, **k: calls.append(a[0]) or decide(*a, **k)  # type: ignore[method-assign]
    raw = reported("a", snapshot("a"), ArrivalCounter(), T0)
    for dt in (0.0, 0.1, 0.5, 0.9):  # Serve's control loop calls it every 0.1 s
        p(context(raw, ["a"], 1, now=T0 + dt))
    p(context(raw, ["a"], 2, now=T0 + 0.95))  # a replica asked for elsewhere: the counts changed
    p(context(raw, ["a"], 2, now=T0 + 1.96))
    assert calls == [T0, T0 + 0.95, T0 + 1.96]
