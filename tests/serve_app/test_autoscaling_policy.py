"""The replica autoscaling policy (serve_app.autoscaling_policy) on hand-built snapshots: pure, no Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from router.feedback import ReplicaFeedback
from router.policies import RoutingContext
from router.policies.slo import SLOPolicy
from serve_app.autoscaling_policy import ArrivalStats, ReplicaAutoscalingConfig, TierAwareAutoscaler
from serve_app.config import AdmissionConfig, ServingTier

T0 = 1_000_000.0
BATCH_S = 0.05
RATE = 512 / BATCH_S  # one replica's prefill rate with no decodes (tokens/s)
PROMPT = 1000  # mean prompt tokens of the arrivals
TIERS = [ServingTier(name="premium", tbt_slo_s=0.1, ttft_target_s=0.5, rank=0, shed_order=1),
         ServingTier(name="free", tbt_slo_s=0.5, ttft_target_s=0.5, rank=1, shed_order=0)]
# the delay trigger: half of admission's sustained factor (0.5) x the 0.5 s TTFT target = 0.125 s
TRIGGER_S = 0.125


def snap(rid="r0", ts=T0, waiting=0, kv=0.1, batch=BATCH_S, tiers=None, decodes=None,
         histogram=None) -> ReplicaFeedback:
    """``histogram``: the waiting prompts' (edges, counts), as `replica.slo` reports them."""
    s = {"version": 1, "replica_id": rid, "timestamp_s": ts, "waiting_prefill_tokens": waiting,
         "num_waiting": 1 if waiting else 0, "num_running": 0, "kv_usage": kv, "mean_batch_time_s": batch,
         "running_decodes_by_tier": decodes or {}, "tiers": tiers or {}}
    if histogram is not None:
        s["waiting_prompt_histogram"] = {"edges": histogram[0], "counts": histogram[1]}
    return ReplicaFeedback.from_snapshot(s)


def fleet(n, ts=T0, **kw) -> list[ReplicaFeedback]:
    return [snap(f"r{i}", ts, **kw) for i in range(n)]


def load(tokens_per_s: float) -> ArrivalStats:
    """Arrivals of the free tier bringing ``tokens_per_s`` prefill tokens/s."""
    return ArrivalStats.of({"free": tokens_per_s / PROMPT}, PROMPT)


def scaler(**cfg) -> TierAwareAutoscaler:
    cfg = {"min_replicas": 1, "max_replicas": 10, **cfg}
    return TierAwareAutoscaler(TIERS, ReplicaAutoscalingConfig(**cfg))


def premium_at_risk(n, ts=T0) -> list[ReplicaFeedback]:
    return [snap("r0", ts, tiers={"premium": {"tbt_p99_s": 0.15}})] + fleet(n, ts)[1:]


# ------------------------------------------------------------------------------------- rule 1

def test_holds_when_demand_fits_and_one_fewer_would_not():
    d = scaler().decide(T0, fleet(2), load(0.6 * 2 * RATE), 2)
    assert (d.target_replicas, d.reason) == (2, "hold")
    assert "headroom" in d.details["scale_down_blocked"]


def test_forecast_demand_sizes_the_replicas_at_target_utilization():
    # 3.5 replicas' worth at 70 %: 4 needed, 2 running
    d = scaler().decide(T0, fleet(2), load(3.5 * RATE * 0.7), 2)
    assert (d.target_replicas, d.reason) == (4, "forecast")
    assert d.details["need_forecast"] == 4


def test_rising_trend_scales_up_before_the_current_rate_needs_it():
    # free arrivals rise 6 -> 12 req/s over a minute (1000-token prompts); 2 replicas hold 14.3 req/s
    # at 70 %, so the current rate never needs more, but in 120 s (start-up) it will be ~24 req/s
    s = scaler()
    first_up = None
    for k in range(61):
        d = s.decide(T0 + k, fleet(2, T0 + k), load((6 + 0.1 * k) * PROMPT), 2)
        if d.target_replicas > 2:
            first_up = d
            break
    assert first_up is not None and first_up.reason == "forecast"
    assert first_up.details["demand_tps"] < 2 * RATE * 0.7 < first_up.details["forecast_tps"]
    # without the rise, the same final rate keeps 2 replicas
    flat = scaler()
    for k in range(61):
        d = flat.decide(T0 + k, fleet(2, T0 + k), load(12 * PROMPT), 2)
    assert (d.target_replicas, d.reason) == (2, "hold")


def test_falling_trend_is_not_extrapolated():
    s = scaler()
    for k in range(61):
        d = s.decide(T0 + k, fleet(2, T0 + k), load((12 - 0.1 * k) * PROMPT), 2)
    assert s.trend_rps_per_s("free") < 0
    assert d.details["forecast_tps"] == pytest.approx(d.details["demand_tps"])


def test_capacity_is_the_slo_routers_prefill_rate():
    fb = snap(decodes={"premium": 100, "free": 300}, batch=0.04)
    router = SLOPolicy(**SLOPolicy.context_options(RoutingContext(tier_tbt_slo_s={"premium": 0.1, "free": 0.5})))
    s = scaler()
    assert s.replica_capacity_tps(1, 0.04, {"premium": 100, "free": 300}) == pytest.approx(router.prefill_rate_tps(fb))


def test_scale_down_counts_the_decodes_moving_to_the_remaining_replicas():
    # premium decodes cost a token per batch each: 150 per replica leave (512 - 150) / 0.05 = 7240 tokens/s;
    # on one replica all 300 leave 4240.  3000 tokens/s fit 7240 x 50 % but not 4240 x 50 %.
    s = scaler(downscale_cooldown_s=0)
    d = s.decide(T0, fleet(2, decodes={"premium": 150}), load(3000), 2)
    assert (d.target_replicas, d.reason) == (2, "hold")
    assert d.details["scale_down_blocked"] == ["headroom"]


# ------------------------------------------------------------------------------------- rule 2

def test_strict_tier_tbt_at_risk_adds_a_replica():
    d = scaler().decide(T0, premium_at_risk(2), load(0.1 * RATE), 2)
    assert (d.target_replicas, d.reason) == (3, "at_risk")


def test_kv_at_its_limit_adds_a_replica():
    d = scaler().decide(T0, fleet(2, kv=0.97), load(0.1 * RATE), 2)
    assert (d.target_replicas, d.reason) == (3, "at_risk")
    assert d.details["at_risk"]["premium"] == "kv"


def test_sustained_queue_delay_adds_a_replica():
    s = scaler()
    waiting = int(0.2 * RATE)  # D = 0.2 s on each of the 2 replicas, over the 0.125 s trigger
    for k in range(5):
        d = s.decide(T0 + k, fleet(2, T0 + k, waiting=waiting), load(0.1 * RATE), 2)
        if d.target_replicas > 2:
            break
    assert (d.target_replicas, d.reason) == (3, "queue_delay")


EDGES = [0, 256, 1024, 4096]


@pytest.mark.parametrize("histogram,scales", [
    (([*EDGES], [0, 0, 0, 1]), False),  # one long prompt alone: it waits behind no one, its own prefill
    (([*EDGES], [0, 8, 0, 0]), True),  # prompts of 256-1,023 tokens: a new one of the mean length queues behind them
    (None, True),  # no histogram: every waiting token counts as ahead
], ids=["one-long-prompt", "prompts-like-the-arrivals", "no-histogram"])
def test_the_queue_delay_counts_the_prompts_a_new_request_waits_behind(histogram, scales):
    # shortest prompt first: a new request of the arrivals' mean prompt (1,000 tokens) waits only
    # for the waiting prompts no longer than it
    s = scaler()
    waiting = int(0.2 * RATE)  # all waiting tokens: D = 0.2 s on each of the 2 replicas, over the trigger
    for k in range(5):
        d = s.decide(T0 + k, fleet(2, T0 + k, waiting=waiting, histogram=histogram), load(0.1 * RATE), 2)
        if d.target_replicas > 2:
            break
    assert (d.reason == "queue_delay") == scales, d.details


def test_momentary_queue_burst_does_not_add_a_replica():
    s = scaler()
    for k in range(9):
        s.decide(T0 + k, fleet(2, T0 + k), load(0.1 * RATE), 2)
    d = s.decide(T0 + 9, fleet(2, T0 + 9, waiting=int(0.5 * RATE)), load(0.1 * RATE), 2)
    assert d.details["queue_delay_s"] > TRIGGER_S > d.details["queue_delay_mean_s"]
    assert (d.target_replicas, d.reason) == (2, "hold")


def test_starting_replicas_count_as_arriving_capacity_for_the_forecast():
    d = scaler().decide(T0, fleet(2), load(3.5 * RATE * 0.7), 2, starting_replicas=2)
    assert (d.target_replicas, d.reason) == (4, "hold")


def test_starting_replica_covers_a_strict_tier_at_risk():
    d = scaler().decide(T0, premium_at_risk(2), load(0.1 * RATE), 2, starting_replicas=1)
    assert (d.target_replicas, d.reason) == (3, "hold")
    assert d.details["urgent"] == "at_risk" and d.details["capacity_arriving"]


def test_no_second_replica_for_a_risk_until_the_cooldown_after_the_first_is_ready():
    s = scaler(upscale_cooldown_s=30)
    assert s.decide(T0, premium_at_risk(2), load(0.1 * RATE), 2).target_replicas == 3
    assert s.decide(T0 + 60, premium_at_risk(2, T0 + 60), load(0.1 * RATE), 2, 1).target_replicas == 3
    # ready at T0 + 120, still at risk: its effect has not had time to show
    d = s.decide(T0 + 120, premium_at_risk(3, T0 + 120), load(0.1 * RATE), 3, 0)
    assert (d.target_replicas, d.reason) == (3, "hold")
    d = s.decide(T0 + 145, premium_at_risk(3, T0 + 145), load(0.1 * RATE), 3, 0)
    assert (d.target_replicas, d.reason) == (3, "hold")
    d = s.decide(T0 + 151, premium_at_risk(3, T0 + 151), load(0.1 * RATE), 3, 0)
    assert (d.target_replicas, d.reason) == (4, "at_risk")


def test_capped_step_waits_for_the_upscale_cooldown():
    s = scaler(max_step_up=1, upscale_cooldown_s=30)
    demand = load(4.5 * RATE * 0.7)  # 5 replicas needed
    assert s.decide(T0, fleet(2), demand, 2).target_replicas == 3
    d = s.decide(T0 + 10, fleet(2, T0 + 10), demand, 2, 1)
    assert (d.target_replicas, d.reason) == (3, "upscale_cooldown")
    d = s.decide(T0 + 31, fleet(2, T0 + 31), demand, 2, 1)
    assert (d.target_replicas, d.reason) == (4, "forecast")


def test_growing_deficit_scales_up_within_the_cooldown():
    s = scaler(max_step_up=1, upscale_cooldown_s=30)
    assert s.decide(T0, fleet(2), load(4.5 * RATE * 0.7), 2).target_replicas == 3
    d = s.decide(T0 + 10, fleet(2, T0 + 10), load(6.5 * RATE * 0.7), 2, 1)  # 7 needed now, 5 before
    assert (d.target_replicas, d.reason) == (4, "forecast")


# ------------------------------------------------------------------------------------- rule 3

def test_scale_down_one_at_a_time_after_the_cooldown():
    s = scaler(downscale_cooldown_s=300)
    idle = load(0.05 * RATE)
    d = s.decide(T0, fleet(4), idle, 4)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (4, ["downscale_cooldown"])
    d = s.decide(T0 + 300, fleet(4, T0 + 300), idle, 4)
    assert (d.target_replicas, d.reason) == (3, "scale_down")
    d = s.decide(T0 + 301, fleet(3, T0 + 301), idle, 3)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (3, ["downscale_cooldown"])
    d = s.decide(T0 + 600, fleet(3, T0 + 600), idle, 3)
    assert (d.target_replicas, d.reason) == (2, "scale_down")


def test_no_scale_down_within_the_cooldown_of_a_scale_up():
    s = scaler(downscale_cooldown_s=300)
    s._first_s = T0 - 1000  # long watched
    assert s.decide(T0, premium_at_risk(4), load(0.05 * RATE), 4).target_replicas == 5
    d = s.decide(T0 + 200, fleet(5, T0 + 200), load(0.05 * RATE), 5)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (5, ["downscale_cooldown"])


def test_no_scale_down_while_a_replica_starts():
    d = scaler(downscale_cooldown_s=0).decide(T0, fleet(4), load(0.05 * RATE), 4, starting_replicas=1)
    assert d.target_replicas == 5 and d.details["scale_down_blocked"] == ["starting"]


def test_no_scale_down_while_a_tier_is_at_risk():
    # a replica became ready 20 s ago: the risk adds none yet (upscale cooldown), nor may one go
    s = scaler(downscale_cooldown_s=10, upscale_cooldown_s=60)
    s.decide(T0 - 30, fleet(3, T0 - 30), load(0.05 * RATE), 3, 1)
    s.decide(T0 - 20, fleet(4, T0 - 20), load(0.05 * RATE), 4, 0)  # ready
    s._first_s = T0 - 1000
    d = s.decide(T0, premium_at_risk(4), load(0.05 * RATE), 4, 0)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (4, ["at_risk"])


def test_no_scale_down_with_a_queue():
    # D = 0.1 s: under the 0.125 s trigger, over the 0.025 s scale-down bound
    d = scaler(downscale_cooldown_s=0).decide(T0, fleet(4, waiting=int(0.1 * RATE)), load(0.05 * RATE), 4)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (4, ["queue_delay"])


def test_no_scale_down_without_fresh_feedback_from_every_replica():
    fbs = fleet(3) + [snap("r3", ts=T0 - 60)]
    d = scaler(downscale_cooldown_s=0).decide(T0, fbs, load(0.05 * RATE), 4)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (4, ["stale_feedback"])


def test_no_scale_down_when_the_kv_cache_would_fill():
    # 0.52 on 4 replicas is 0.69 on 3: over 70 % of the 0.96 limit (0.67)
    d = scaler(downscale_cooldown_s=0).decide(T0, fleet(4, kv=0.52), load(0.05 * RATE), 4)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (4, ["kv_headroom"])


@pytest.mark.parametrize("swell_age_s,scales_down", [(200, False), (301, True)])
def test_a_kv_swell_within_the_cooldown_keeps_the_replica(swell_age_s, scales_down):
    # KV use at 0.6 on 4 replicas (0.8 on 3) swell_age_s ago, 0.3 (0.4 on 3) since
    s = scaler(downscale_cooldown_s=300)
    t_swell = T0 - swell_age_s
    s.decide(t_swell - 400, fleet(4, t_swell - 400, kv=0.3), load(0.05 * RATE), 4)  # the first decision
    s.decide(t_swell, fleet(4, t_swell, kv=0.6), load(0.05 * RATE), 4)
    d = s.decide(T0, fleet(4, T0, kv=0.3), load(0.05 * RATE), 4)
    assert d.details["kv_usage"] == 0.3
    assert (d.reason == "scale_down") == scales_down, d.details["scale_down_blocked"]


# ------------------------------------------------------------------------------------- rule 4

def test_scale_up_is_clamped_to_max_replicas():
    d = scaler(max_replicas=3).decide(T0, fleet(2), load(5.5 * RATE * 0.7), 2)
    assert (d.target_replicas, d.reason, d.details["rule"]) == (3, "max_replicas", "forecast")


def test_target_is_raised_to_min_replicas():
    d = scaler(min_replicas=2).decide(T0, [], load(0.0), 0)
    assert (d.target_replicas, d.reason) == (2, "min_replicas")


def test_no_scale_down_below_min_replicas():
    d = scaler(min_replicas=2, downscale_cooldown_s=0).decide(T0, fleet(2), load(0.0), 2)
    assert (d.target_replicas, d.details["scale_down_blocked"]) == (2, ["min_replicas"])


# ------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("cfg,match", [
    ({"min_replicas": 3, "max_replicas": 2}, "is over max_replicas"),
    ({"metrics_period_s": 2.0, "arrival_window_s": 2.0}, "must be over metrics_period_s"),
    ({"metrics_period_s": 0}, "greater than 0"),
    ({"target_utilization": 0.6, "scale_down_utilization": 0.6}, "must be below target_utilization"),
    ({"target_utilization": 1.2}, "less than or equal to 1"),
    ({"scale_down_utilization": 0}, "greater than 0"),
    ({"delay_trigger_fraction": 0.1, "scale_down_delay_fraction": 0.2}, "must be below delay_trigger_fraction"),
    ({"startup_s": 0}, "greater than 0"),
    ({"max_step_up": 0}, "greater than or equal to 1"),
    ({"max_replica": 4}, "Extra inputs are not permitted"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_config_validation_errors(cfg, match):
    with pytest.raises(ValidationError, match=match):
        ReplicaAutoscalingConfig(**cfg)


def test_config_defaults():
    cfg = ReplicaAutoscalingConfig(min_replicas=2, max_replicas=8)
    assert (cfg.startup_s, cfg.target_utilization, cfg.drain_timeout_s) == (120.0, 0.7, 600.0)


def test_scale_down_delay_bound_must_be_below_the_derived_trigger():
    with pytest.raises(ValueError, match="must be below the delay trigger"):
        TierAwareAutoscaler(TIERS, ReplicaAutoscalingConfig(scale_down_delay_fraction=0.3),
                            AdmissionConfig(sustained_delay_factor=0.5))


def test_imports_neither_ray_nor_vllm():
    code = ("import sys, serve_app.autoscaling_policy; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
