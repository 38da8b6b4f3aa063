"""The admission policy (serve_app.admission) on hand-built snapshots: pure, no Ray."""

from __future__ import annotations

import math

import pytest

from router.feedback import ReplicaFeedback
from serve_app.admission import (AdmissionPolicy, DelayHistory, InFlight, TBTHistory, default_feedback_period_s,
                                 default_max_in_flight, ingress_max_queued_requests, ingress_share,
                                 replica_max_queued_requests)
from serve_app.config import AdmissionConfig, AppConfig, ConfigError, ServingTier, load_config

NOW = 1_000_000.0
BATCH_S = 0.05  # mean batch time in the snapshots: prefill rate (512 - decodes' share) / 0.05 s
TIERS2 = [ServingTier(name="premium", tbt_slo_s=0.1, ttft_target_s=0.5, rank=0, shed_order=1),
          ServingTier(name="free", tbt_slo_s=0.5, ttft_target_s=0.5, rank=1, shed_order=0)]
TIERS3 = [ServingTier(name="gold", tbt_slo_s=0.05, ttft_target_s=0.3, rank=0, shed_order=2),
          ServingTier(name="silver", tbt_slo_s=0.1, ttft_target_s=0.5, rank=1, shed_order=1),
          ServingTier(name="bronze", tbt_slo_s=0.5, ttft_target_s=1.0, rank=2, shed_order=0)]


def snap(rid="r0", waiting=0, kv=0.1, ts=NOW, batch=BATCH_S, tiers=None, decodes=None) -> ReplicaFeedback:
    return ReplicaFeedback.from_snapshot({
        "version": 1, "replica_id": rid, "timestamp_s": ts, "waiting_prefill_tokens": waiting,
        "num_waiting": 1 if waiting else 0, "num_running": 0, "kv_usage": kv, "mean_batch_time_s": batch,
        "running_decodes_by_tier": decodes or {}, "tiers": tiers or {}})


def policy(tiers=TIERS2, max_in_flight=100, **cfg) -> AdmissionPolicy:
    return AdmissionPolicy(tiers, AdmissionConfig(**cfg), max_in_flight=max_in_flight)


RATE = 512 / BATCH_S  # one replica's prefill rate with no decodes (tokens/s)


def test_rules_follow_shed_order_and_targets():
    p = policy()
    assert p.shed_sequence == ["free", "premium"]
    free, prem = p.rules["free"], p.rules["premium"]
    # free is shed once the FCFS drain time is twice premium's 0.5 s TTFT target (f = 2)
    assert free.delay_bound_s == pytest.approx(1.0) and free.sheds_on_health and free.in_flight_bound == 50
    assert free.sustained_delay_bound_s == pytest.approx(0.25) and prem.sustained_delay_bound_s is None
    assert prem.delay_bound_s is None and not prem.sheds_on_health and prem.in_flight_bound == 100
    p3 = policy(TIERS3, max_in_flight=90, instant_delay_factor=0.5)
    assert p3.shed_sequence == ["bronze", "silver", "gold"]
    # bronze protects silver and gold: the tightest target is gold's 0.3 s; silver protects gold
    assert p3.rules["bronze"].delay_bound_s == pytest.approx(0.5 * 0.3)
    assert p3.rules["silver"].delay_bound_s == pytest.approx(0.75 * 0.3)
    assert p3.rules["gold"].delay_bound_s is None
    assert [p3.rules[t].in_flight_bound for t in ("bronze", "silver", "gold")] == [30, 60, 90]


# (case, snapshots, expected decision per tier: None = admit, else the reason)
CASES = [
    ("healthy cluster admits all", [snap("a", waiting=1000), snap("b", waiting=500)],
     {"free": None, "premium": None}),
    ("moderate queue (0.8 s to drain, under twice premium's 0.5 s target) admits all",
     [snap("a", waiting=int(0.8 * RATE)), snap("b", waiting=int(0.8 * RATE))],
     {"free": None, "premium": None}),
    ("rising queue sheds free first, premium admitted",  # 2 replicas, 1.2 s to drain > 1.0 s
     [snap("a", waiting=int(1.2 * RATE)), snap("b", waiting=int(1.2 * RATE))],
     {"free": "queue", "premium": None}),
    ("a huge queue still admits premium (only the in-flight bound refuses it)",
     [snap("a", waiting=int(30 * RATE))], {"free": "queue", "premium": None}),
    ("premium TBT over its SLO sheds free",
     [snap("a", tiers={"premium": {"tbt_p99_s": 0.15}}), snap("b")], {"free": "tbt", "premium": None}),
    ("free TBT over its own SLO does not shed anyone",
     [snap("a", tiers={"free": {"tbt_p99_s": 0.9}})], {"free": None, "premium": None}),
    ("KV nearly full sheds free", [snap("a", kv=0.97), snap("b", kv=0.99)], {"free": "kv", "premium": None}),
    ("stale snapshots are ignored", [snap("a", waiting=int(30 * RATE), ts=NOW - 60)],
     {"free": None, "premium": None}),
]


@pytest.mark.parametrize("case,snaps,want", CASES, ids=[c[0] for c in CASES])
def test_decisions(case, snaps, want):
    p = policy()
    load = p.assess(snaps, InFlight(), now_s=NOW)
    for tier, reason in want.items():
        d = p.decide(tier, load)
        assert d.admit == (reason is None), (case, tier, d)
        assert d.reason == reason, (case, tier, d)
        if reason is not None:
            assert d.retry_after_s >= 1 and tier in d.message


def test_hard_in_flight_bound_refuses_premium_too():
    p = policy(max_in_flight=10)
    inf = InFlight()
    for i in range(4):
        inf.add(f"p{i}", "premium", 100, NOW)
    load = p.assess([snap("a")], inf, now_s=NOW)
    assert p.decide("free", load).admit and p.decide("premium", load).admit
    inf.add("f0", "free", 100, NOW)  # 5 in flight: free's bound (10 * 1/2)
    load = p.assess([snap("a")], inf, now_s=NOW)
    assert p.decide("free", load).reason == "in_flight" and p.decide("premium", load).admit
    for i in range(5):
        inf.add(f"q{i}", "premium", 100, NOW)
    load = p.assess([snap("a")], inf, now_s=NOW)
    d = p.decide("premium", load)
    assert not d.admit and d.reason == "in_flight" and d.retry_after_s >= 1
    inf.done("q0")
    assert p.decide("premium", p.assess([snap("a")], inf, now_s=NOW)).admit


@pytest.mark.parametrize("drain_s,want", [(0.0, 1), (0.3, 1), (1.0, 1), (1.01, 2), (2.5, 3), (500.0, 60)])
def test_retry_after_is_the_drain_time(drain_s, want):
    p = policy()
    load = p.assess([snap("a", waiting=int(drain_s * RATE))], InFlight(), now_s=NOW)
    assert load.queue_delay_s == pytest.approx(drain_s, abs=1e-3)
    assert p.retry_after_s(load) == want
    d = p.decide("free", load)
    if drain_s > 1.0:
        assert d.retry_after_s == want


def test_retry_after_bounds_are_configurable():
    p = policy(min_retry_after_s=2, max_retry_after_s=5)
    assert p.retry_after_s(p.assess([snap(waiting=0)], now_s=NOW)) == 2
    assert p.retry_after_s(p.assess([snap(waiting=int(100 * RATE))], now_s=NOW)) == 5


def test_three_tiers_shed_in_order():
    p = policy(TIERS3, instant_delay_factor=0.5)
    # the bounds: bronze 0.15 s, silver 0.225 s, gold never
    for delay, want in [(0.1, {"bronze": True, "silver": True, "gold": True}),
                        (0.2, {"bronze": False, "silver": True, "gold": True}),
                        (0.3, {"bronze": False, "silver": False, "gold": True}),
                        (30.0, {"bronze": False, "silver": False, "gold": True})]:
        load = p.assess([snap("a", waiting=int(delay * RATE))], now_s=NOW)
        got = {t: p.decide(t, load).admit for t in want}
        assert got == want, (delay, got)
    # health sheds the first tier only
    load = p.assess([snap("a", tiers={"gold": {"tbt_p99_s": 0.2}})], now_s=NOW)
    assert {t: p.decide(t, load).reason for t in ("bronze", "silver", "gold")} == \
        {"bronze": "tbt", "silver": None, "gold": None}


def test_a_burst_passes_but_sustained_queueing_sheds_free():
    """A moment at 0.4 s of queueing (under premium's 0.5 s target) admits free; the same delay
    held over the window (mean > 0.25 s) sheds it; premium is admitted throughout."""
    p = policy()
    delays = DelayHistory(window_s=10.0)
    for i in range(20):  # quiet: 0.05 s of queueing for 10 s
        load = p.assess([snap("a", waiting=int(0.05 * RATE), ts=NOW + i * 0.5)], now_s=NOW + i * 0.5,
                        delays=delays)
        assert p.decide("free", load).admit
    burst = p.assess([snap("a", waiting=int(0.4 * RATE), ts=NOW + 10)], now_s=NOW + 10, delays=delays)
    assert burst.queue_delay_mean_s < 0.25 and p.decide("free", burst).admit
    shed_at = None
    for i in range(1, 40):  # the 0.4 s queue persists
        t = NOW + 10 + i * 0.5
        load = p.assess([snap("a", waiting=int(0.4 * RATE), ts=t)], now_s=t, delays=delays)
        assert p.decide("premium", load).admit
        if not p.decide("free", load).admit:
            shed_at = t - NOW - 10
            d = p.decide("free", load)
            assert d.reason == "queue" and "on average" in d.message
            break
    # the mean passes 0.25 s once more than 4/7 of the window's samples are at 0.4 s
    assert shed_at is not None and 5.0 <= shed_at <= 6.5, shed_at


def test_delay_history_forgets_samples_older_than_the_window():
    h = DelayHistory(window_s=2.0)
    assert h.mean(NOW) is None
    h.add(NOW, 1.0)
    h.add(NOW + 1, 0.0)
    assert h.mean(NOW + 1) == pytest.approx(0.5)
    assert h.mean(NOW + 2.5) == pytest.approx(0.0) and len(h) == 1
    assert h.mean(NOW + 10) is None


def test_shed_order_not_rank_decides():
    tiers = [ServingTier(name="premium", tbt_slo_s=0.1, ttft_target_s=0.5, rank=0, shed_order=0),
             ServingTier(name="free", tbt_slo_s=0.5, ttft_target_s=0.5, rank=1, shed_order=1)]
    p = policy(tiers)
    load = p.assess([snap("a", waiting=int(1.5 * RATE))], now_s=NOW)
    assert not p.decide("premium", load).admit and p.decide("free", load).admit


def test_unreported_work_counts_requests_admitted_after_the_snapshot():
    p = policy()
    inf = InFlight()
    inf.add("old", "free", 5000, NOW - 1)  # before the snapshot: the snapshot shows it
    inf.add("new1", "free", int(0.8 * RATE), NOW + 0.1)
    inf.add("new2", "premium", int(0.4 * RATE), NOW + 0.2)
    inf.add("started", "free", 9999, NOW + 0.2)
    inf.first_token("started")  # prefilled: no longer queued work
    load = p.assess([snap("a", waiting=0)], inf, now_s=NOW + 0.3)
    assert load.unreported_tokens == int(0.8 * RATE) + int(0.4 * RATE)
    assert load.queue_delay_s == pytest.approx(1.2, abs=1e-3)
    assert p.decide("free", load).reason == "queue" and p.decide("premium", load).admit
    assert inf.count() == 4 and inf.counts == {"free": 3, "premium": 1}
    for rid in ("old", "new1", "new2", "started", "started"):
        inf.done(rid)
    assert inf.count() == 0 and inf.counts == {}


def test_prefill_rate_sums_the_replicas_and_counts_silent_ones_at_the_median():
    p = policy()
    one = p.assess([snap("a", waiting=int(RATE))], now_s=NOW)
    assert one.prefill_rate_tps == pytest.approx(RATE) and one.queue_delay_s == pytest.approx(1.0, abs=1e-3)
    three = p.assess([snap("a", waiting=int(RATE))], now_s=NOW, num_replicas=3)
    assert three.prefill_rate_tps == pytest.approx(3 * RATE)
    # decodes take part of each batch: a slower prefill rate
    busy = p.assess([snap("a", decodes={"premium": 100})], now_s=NOW)
    assert busy.prefill_rate_tps < RATE
    # no feedback at all: the router's default rate, and what this ingress sent
    inf = InFlight()
    inf.add("x", "free", 5120, NOW)
    none = p.assess([], inf, now_s=NOW)
    assert none.replicas == 0 and none.queue_delay_s == pytest.approx(5120 / RATE)


def test_recent_tbt_misses_from_the_counters_history():
    p = policy(tbt_window_s=10.0)
    h = TBTHistory(10.0)

    def s(t, misses, tokens, p99=None):
        return snap("a", ts=t, tiers={"premium": {"tbt_misses_total": misses, "tokens_total": tokens,
                                                  "tbt_p99_s": p99}})

    # the window P99 (60 s on the replica) still says "over the SLO", but the last 10 s were clean
    for i, (m, n) in enumerate([(50, 1000), (50, 1500), (50, 2000), (50, 2500)]):
        h.add([s(NOW - 15 + 5 * i, m, n, p99=0.2)])
    load = p.assess([s(NOW, 50, 2500, p99=0.2)], now_s=NOW, history=h)
    assert "premium" not in load.at_risk and p.decide("free", load).admit
    # misses in the window: 2 % > 1 %
    h.add([s(NOW + 5, 70, 3500, p99=0.2)])
    load = p.assess([s(NOW + 5, 70, 3500, p99=0.2)], now_s=NOW + 5, history=h)
    assert load.at_risk.get("premium") == "tbt" and p.decide("free", load).reason == "tbt"
    # too few tokens in the window: the snapshot's P99 decides
    h2 = TBTHistory(10.0)
    h2.add([s(NOW - 5, 0, 10, p99=0.05)])
    h2.add([s(NOW, 1, 20, p99=0.05)])
    assert "premium" not in p.assess([s(NOW, 1, 20, p99=0.05)], now_s=NOW, history=h2).at_risk
    # a restarted replica (counters went down) starts a new history
    h2.add([s(NOW + 1, 0, 5)])
    assert h2.misses("premium") == (0, 0)


def test_disabled_admits_everything():
    p = policy(enabled=False, max_in_flight=1)
    inf = InFlight()
    inf.add("a", "free", 10, NOW)
    load = p.assess([snap("a", waiting=int(100 * RATE), kv=1.0)], inf, now_s=NOW)
    assert p.decide("free", load).admit and p.decide("premium", load).admit


def test_unknown_tier_is_an_error():
    with pytest.raises(KeyError, match="unknown tier"):
        policy().decide("gold", policy().assess([], now_s=NOW))


# ------------------------------------------------------------------------------------ the config

def test_config_defaults_are_derived_from_the_deployment():
    app = AppConfig.model_validate({"replicas": {"num_replicas": 3, "max_ongoing_requests": 64},
                                    "http": {"max_ongoing_requests": 256}})
    assert app.admission.enabled
    assert default_max_in_flight(app) == 192  # 3 replicas x 64
    assert replica_max_queued_requests(app) == 64 and ingress_max_queued_requests(app) == 256
    assert default_feedback_period_s(app) == pytest.approx(min(t.ttft_target_s for t in app.tiers) / 2)
    app2 = AppConfig.model_validate({"replicas": {"num_replicas": 4}, "http": {"max_ongoing_requests": 100}})
    assert default_max_in_flight(app2) == 100  # never over what the ingress takes at once
    p = AdmissionPolicy.from_app_config(app)
    assert p.max_in_flight == 192 and p.shed_sequence == app.shed_sequence
    # round trip through JSON, as build_app passes the config to the ingress
    assert AppConfig.model_validate(app.model_dump(mode="json")).admission == app.admission


def test_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("http: {max_ongoing_requests: 10}\nadmission:\n  max_in_flight: 20\n")
    with pytest.raises(ConfigError, match=r"admission\.max_in_flight.*over http\.max_ongoing_requests"):
        load_config(path)
    path.write_text("admission:\n  min_retry_after_s: 5\n  max_retry_after_s: 2\n")
    with pytest.raises(ConfigError, match=r"admission\.max_retry_after_s"):
        load_config(path)
    path.write_text("admission:\n  replica_max_queued_requests: 0\n")
    with pytest.raises(ConfigError, match=r"admission\.replica_max_queued_requests"):
        load_config(path)
    path.write_text("admission:\n  shed_fraction: 0.5\n")
    with pytest.raises(ConfigError, match=r"admission\.shed_fraction: unknown field"):
        load_config(path)
    path.write_text("admission:\n  enabled: false\n  instant_delay_factor: 0.25\n")
    cfg = load_config(path)
    assert not cfg.admission.enabled and math.isclose(cfg.admission.instant_delay_factor, 0.25)


def test_dotted_overrides_reach_a_section_missing_from_the_file(tmp_path):
    # sim.yaml has no admission section: `admission.enabled=false` on the command line must still act
    path = tmp_path / "c.yaml"
    path.write_text("model_name: m\n")
    cfg = load_config(path, overrides={"admission.enabled": False, "admission.max_in_flight": 5})
    assert not cfg.admission.enabled and cfg.admission.max_in_flight == 5


# --- fairness between the keys of one tier ----------------------------------------------------------


def _fill(in_flight: InFlight, tier: str, key: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        in_flight.add(f"{key}-{i}", tier, 0, now_s=NOW, key_id=key)


def test_a_heavy_key_is_stopped_before_the_tier_is_full_and_its_neighbours_keep_the_reserve():
    p = policy()  # free's bound 50, the last 10 % (5) kept for keys under their fair share
    assert p.rules["free"].fair_share_from == 45
    fl = InFlight()
    _fill(fl, "free", "heavy", 45)
    heavy = p.admit("free", [snap()], fl, now_s=NOW, key_id="heavy")
    assert not heavy.admit and heavy.reason == "fair_share" and "fair share" in heavy.message
    light = p.admit("free", [snap()], fl, now_s=NOW, key_id="light")
    assert light.admit  # a second key of the tier is served: 0 < 50 / 2
    _fill(fl, "free", "light", 5)
    assert not p.admit("free", [snap()], fl, now_s=NOW, key_id="third").admit  # the bound itself still holds


def test_below_the_reserve_a_key_may_use_most_of_the_tier():
    p = policy()
    fl = InFlight()
    _fill(fl, "free", "only", 44)
    assert p.admit("free", [snap()], fl, now_s=NOW, key_id="only").admit


def test_in_the_reserve_only_keys_under_the_bound_over_the_others_plus_two_get_in():
    p = policy()
    fl = InFlight()
    _fill(fl, "free", "a", 30)
    _fill(fl, "free", "b", 15)  # 45 in flight: the reserve is in force; fair share 50 / (1 + 2)
    assert p.fair_share(p.rules["free"], 15, 2) == pytest.approx(50 / 3)
    assert p.admit("free", [snap()], fl, now_s=NOW, key_id="b").admit  # 15 < 16.7
    assert p.admit("free", [snap()], fl, now_s=NOW, key_id="a").reason == "fair_share"  # 30 >= 16.7
    assert p.admit("free", [snap()], fl, now_s=NOW, key_id="c").admit  # a new key: 0 < 50 / 4


def test_in_flight_counts_keys_per_tier_and_forgets_them():
    fl = InFlight()
    fl.add("r1", "free", 0, now_s=NOW, key_id="a")
    fl.add("r2", "free", 0, now_s=NOW, key_id="a")
    fl.add("r3", "premium", 0, now_s=NOW, key_id="a")
    assert (fl.key_count("free", "a"), fl.num_keys("free"), fl.num_keys("premium")) == (2, 1, 1)
    fl.set_prompt_len("r1", 300)
    assert fl.unreported_prefill_tokens(None) == 300
    for r in ("r1", "r2", "r3", "r3"):
        fl.done(r)
    assert (fl.key_count("free", "a"), fl.num_keys("free"), len(fl)) == (0, 0, 0)


def test_retry_after_is_spread_by_jitter():
    p = policy(min_retry_after_s=2)
    load = p.assess([snap()], InFlight(), now_s=NOW)
    assert p.retry_after_s(load, 0.0) == 2 and p.retry_after_s(load, 0.99) == 3


def test_a_decision_can_leave_the_delay_history_to_the_caller():
    p = policy()
    hist = DelayHistory(10.0)
    p.admit("free", [snap("a", waiting=int(0.4 * RATE))], InFlight(), now_s=NOW, delays=hist, record_delay=False)
    assert len(hist) == 0  # a request refused later (invalid) never counts
    p.admit("free", [snap("a", waiting=int(0.4 * RATE))], InFlight(), now_s=NOW, delays=hist)
    assert len(hist) == 1


# --- several ingress replicas share the bound -----------------------------------------------------

# (bound, ingress replicas, each one's share)
SHARES = [(100, 1, 100), (100, 2, 50), (100, 3, 34), (5, 2, 3), (1, 4, 1), (7, 7, 1), (8, 3, 3)]


@pytest.mark.parametrize("bound,k,share", SHARES)
def test_each_ingress_gets_the_bound_over_the_replicas_rounded_up(bound, k, share):
    assert ingress_share(bound, k) == share
    assert share * k >= bound and (share == 1 or (share - 1) * k < bound)  # the smallest share that covers it
    assert share * k < bound + k  # together the ingresses exceed the bound by less than one request each


def test_ingress_share_needs_an_ingress():
    with pytest.raises(ValueError, match="ingress_replicas"):
        ingress_share(10, 0)


def test_the_tier_bounds_are_taken_from_this_ingress_s_share_and_follow_the_count():
    p = AdmissionPolicy(TIERS2, AdmissionConfig(), max_in_flight=100, ingress_replicas=2)
    assert p.max_in_flight == 100 and p.ingress_max_in_flight == 50
    assert (p.rules["free"].in_flight_bound, p.rules["premium"].in_flight_bound) == (25, 50)
    p.set_ingress_replicas(3)  # Serve started a third ingress
    assert p.ingress_max_in_flight == 34 and (p.rules["free"].in_flight_bound, p.rules["premium"].in_flight_bound) \
        == (17, 34)
    p.set_ingress_replicas(1)
    assert (p.rules["free"].in_flight_bound, p.rules["premium"].in_flight_bound) == (50, 100)


def test_a_refusal_at_the_share_says_so():
    p = AdmissionPolicy(TIERS2, AdmissionConfig(), max_in_flight=10, ingress_replicas=2)
    d = p.decide("premium", p.assess([snap()], InFlight(), now_s=NOW), in_flight=5)
    assert not d.admit and d.reason == "in_flight"
    assert "bound for this tier: 5" in d.message and "share of 10 over 2 ingress replicas" in d.message


def _offer(policies: list[AdmissionPolicy], route, arrivals: int, tier: str = "premium") -> list[int]:
    """``arrivals`` requests of ``tier`` (none finishing), the i-th to ingress ``route(i)``; each
    ingress decides on its own in-flight state.  Returns how many each admitted."""
    states = [InFlight() for _ in policies]
    for i in range(arrivals):
        j = route(i)
        load = policies[j].assess([snap()], states[j], now_s=NOW)
        if policies[j].decide(tier, load, key_share=None).admit:
            states[j].add(f"r{i}", tier, 0, now_s=NOW, key_id=f"k{i}")
    return [len(st) for st in states]


# (case, bound, ingress replicas, route of the i-th request, admitted per ingress)
ROUTES = [
    ("balanced over 2", 10, 2, lambda i: i % 2, [5, 5]),
    ("balanced over 3, bound not divisible", 10, 3, lambda i: i % 3, [4, 4, 4]),
    ("all to one of 2: refused at its share while the other is idle", 10, 2, lambda i: 0, [5, 0]),
    ("two thirds to one of 2", 12, 2, lambda i: 0 if i % 3 else 1, [6, 6]),
    ("one ingress", 10, 1, lambda i: 0, [10]),
]


@pytest.mark.parametrize("case,bound,k,route,want", ROUTES, ids=[c[0] for c in ROUTES])
def test_together_the_ingresses_hold_the_bound_up_to_rounding(case, bound, k, route, want):
    policies = [AdmissionPolicy(TIERS2, AdmissionConfig(), max_in_flight=bound, ingress_replicas=k)
                for _ in range(k)]
    admitted = _offer(policies, route, arrivals=4 * bound)
    assert admitted == want
    assert sum(admitted) <= bound + k - 1


def test_the_default_bound_counts_what_every_ingress_replica_takes():
    base = {"replicas": {"num_replicas": 3, "max_ongoing_requests": 64}, "http": {"max_ongoing_requests": 100}}
    assert default_max_in_flight(AppConfig.model_validate(base)) == 100  # one ingress takes 100 at once
    two = AppConfig.model_validate({**base, "ingress": {"num_replicas": 2}})
    assert default_max_in_flight(two) == 192  # two take 200: the replicas' 3 x 64 binds
    p = AdmissionPolicy.from_app_config(two)
    assert (p.max_in_flight, p.ingress_replicas, p.ingress_max_in_flight) == (192, 2, 96)
    scaling = AppConfig.model_validate({**base, "ingress": {"max_replicas": 4}})
    assert default_max_in_flight(scaling) == 192 and AdmissionPolicy.from_app_config(scaling).ingress_replicas == 1
