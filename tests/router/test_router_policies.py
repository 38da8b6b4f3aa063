"""Routing policies, table-driven over hand-built snapshots (routing_testkit.snap)."""

from collections import Counter

import pytest

from router.feedback import ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.base import queue_length
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.registry import available_router_policies, make_router_policy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.slo import SLOPolicy
from routing_testkit import req, snap, view


# --- every policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", available_router_policies())
@pytest.mark.parametrize("tier", ["premium", "free"])
def test_every_policy_ranks_each_replica_exactly_once(name, tier):
    policy = make_router_policy(name)
    views = [view("c", waiting=[900]), view("a", no_feedback=True, ledger=[("free", 50)]),
             view("b", kv=0.99, p99={"premium": 0.3})]
    for _ in range(5):
        assert sorted(policy.rank(req(tier), views)) == ["a", "b", "c"]
    assert policy.rank(req(tier), []) == []
    assert policy.rank(req(tier), views[:1]) == ["c"]


# --- round robin --------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, firsts", [
    ([["b", "a", "c"]] * 4, ["a", "b", "c", "a"]),
    ([["a", "b"]] * 3, ["a", "b", "a"]),
    ([["a", "b", "c"], ["a", "b", "c"], ["a", "c", "d"], ["a", "c", "d"]], ["a", "b", "c", "d"]),  # b left, d joined
    ([["x"]] * 2, ["x", "x"]),
])
def test_round_robin_cycles(sets, firsts):
    rr = RoundRobinPolicy()
    got = []
    for ids in sets:
        order = rr.rank(req(), [view(i, waiting=[10_000] if i == "a" else []) for i in ids])  # load is ignored
        assert order == order[:1] + [i for i in sorted(ids) if i > order[0]] + [i for i in sorted(ids) if i < order[0]]
        got.append(order[0])
    assert got == firsts


# --- power of two choices -----------------------------------------------------------------------

def _pow2_views():
    return [view("a", waiting=[10] * 5), view("b", waiting=[10] * 2, ledger=[("free", 10)]),
            view("c", waiting=[10] * 9), view("d", no_feedback=True, ledger=[("free", 10)] * 4)]


def test_pow2_puts_the_shorter_of_the_two_sampled_first_deterministically_with_a_seed():
    views = _pow2_views()
    qlen = {v.replica_id: queue_length(v) for v in views}
    assert qlen == {"a": 5, "b": 3, "c": 9, "d": 4}
    runs = []
    for _ in range(2):
        p = PowerOfTwoPolicy(seed=7)
        runs.append([p.rank(req(), views) for _ in range(40)])
    assert runs[0] == runs[1]
    for order in runs[0]:
        assert qlen[order[0]] <= qlen[order[1]]
        assert [qlen[i] for i in order[2:]] == sorted(qlen[i] for i in order[2:])
    firsts = Counter(order[0] for order in runs[0])
    assert "c" not in firsts  # the longest queue loses every comparison
    assert firsts["b"] > firsts["a"]  # b wins whenever sampled; a only against c


@pytest.mark.parametrize("waiting_a, ledger_a, waiting_b, ledger_b, first", [
    (2, 0, 2, 3, "a"),   # same snapshot: the ledger decides
    (2, 3, 2, 0, "b"),
    (0, 5, 3, 0, "b"),   # 0 + 5 in flight > 3 + 0
    (0, 2, 3, 0, "a"),
])
def test_pow2_counts_the_ledger(waiting_a, ledger_a, waiting_b, ledger_b, first):
    views = [view("a", waiting=[10] * waiting_a, ledger=[("free", 10)] * ledger_a),
             view("b", waiting=[10] * waiting_b, ledger=[("free", 10)] * ledger_b)]
    p = PowerOfTwoPolicy(seed=0)
    assert {p.rank(req(), views)[0] for _ in range(10)} == {first}


# --- SLO-aware ----------------------------------------------------------------------------------

# Replica "a" is the one with the shorter queue, so it wins unless its overload rules it out.
HEALTHY = dict(waiting=[400] * 8, kv=0.5, batch=0.04)


@pytest.mark.parametrize("overload, premium_first, free_first", [
    ({}, "a", "a"),
    ({"p99": {"premium": 0.15}}, "b", "a"),              # premium p99 TBT above 100 ms
    ({"p99": {"premium": 0.099}}, "a", "a"),
    ({"kv": 0.96}, "b", "a"),                           # KV use at SLAI's high-offset threshold
    ({"kv": 0.995}, "b", "a"),
    ({"kv": 0.95}, "a", "a"),
    ({"batch": 0.12}, "b", "a"),                        # batches slower than the premium SLO
    ({"p99": {"free": 0.7}}, "a", "b"),                 # the free tier's own tail
    ({"decodes": {"premium": 128}}, "b", "a"),          # no room for more premium decodes
])
def test_an_overloaded_replica_gets_no_premium_request_while_another_is_feasible(overload, premium_first, free_first):
    a = view("a", **{"waiting": [], "kv": 0.5, "batch": 0.04, **overload})
    b = view("b", **HEALTHY)
    policy = SLOPolicy()
    for views in ([a, b], [b, a]):
        assert policy.rank(req("premium", 300), views)[0] == premium_first
        assert policy.rank(req("free", 300), views)[0] == free_first


def test_with_no_feasible_replica_the_least_predicted_ttft_comes_first():
    views = [view("a", waiting=[400] * 9, kv=0.99), view("b", waiting=[400] * 2, p99={"premium": 0.2}),
             view("c", waiting=[400] * 5, batch=0.2)]
    # TTFTs (s): a (3600 + 600) / 12800, b (800 + 600) / 12800, c (2000 + 600) / (512 / 0.2)
    assert SLOPolicy().rank(req("premium", 600), views) == ["b", "a", "c"]
    # ... and a feasible replica, however loaded, beats them all
    views.append(view("d", waiting=[400] * 30))
    assert SLOPolicy().rank(req("premium", 600), views) == ["d", "b", "a", "c"]
    ests = {e.replica_id: e for e in SLOPolicy().estimate(req("premium", 600), views)}
    assert ests["b"].predicted_ttft_s == pytest.approx(1400 / 12800)
    assert ests["a"].reasons == ("kv",) and ests["b"].reasons == ("tbt_p99",) and ests["c"].reasons == ("batch_time",)
    assert ests["d"].feasible and ests["d"].reasons == ()


# "a" holds two long prompts (12,000 tokens), "b" twenty short ones (6,000 tokens).
@pytest.mark.parametrize("prompt_len, first", [
    (200, "a"),    # under SPF nothing in a's queue is ahead of a short prompt
    (1000, "a"),   # b's 300s are all ahead of it, a's 6000s are not
    (5000, "a"),
    (7000, "b"),   # a long prompt waits behind both 6000s at a, behind 6000 tokens at b
])
def test_a_short_prompt_goes_where_few_shorter_prompts_wait(prompt_len, first):
    views = [view("a", waiting=[6000, 6000]), view("b", waiting=[300] * 20)]
    assert views[0].feedback.waiting_prefill_tokens > views[1].feedback.waiting_prefill_tokens
    assert SLOPolicy().rank(req("free", prompt_len), views)[0] == first


def test_ttft_is_tokens_ahead_over_the_prefill_rate():
    policy = SLOPolicy(tier_tbt_slo_s={"premium": 0.1, "free": 0.5})
    a = view("a", waiting=[300] * 4, batch=0.05, decodes={"premium": 12, "free": 40}, ledger=[("free", 100)])
    (est,) = policy.estimate(req("free", 700), [a])
    # premium decodes run every batch (0.1 - 5 * 0.05 < b): 12 tokens; free: 40 * 0.05 / 0.25 = 8
    assert est.prefill_rate_tps == pytest.approx((512 - 12 - 8) / 0.05)
    assert est.tokens_ahead == pytest.approx(1200 + 100 + 700)
    assert est.predicted_ttft_s == pytest.approx(2000 / est.prefill_rate_tps)


@pytest.mark.parametrize("kw, snap_kw, rate", [
    ({}, {"batch": 0.05}, 512 / 0.05),
    ({}, {"batch": None}, 512 / 0.05),                           # no measurement: the default batch time
    ({"default_batch_time_s": 0.1}, {"batch": 0.0}, 512 / 0.1),
    ({"token_budget": 256}, {"batch": 0.02}, 256 / 0.02),
    ({}, {"batch": 0.05, "decodes": {"free": 12}}, 500 / 0.05),  # SLO unknown: a token per decode per batch
    ({"tier_tbt_slo_s": {"free": 0.5}}, {"batch": 0.05, "decodes": {"free": 10}}, (512 - 2) / 0.05),
    ({}, {"batch": 0.05, "decodes": {"free": 600}}, 51.2 / 0.05),  # floored at 10 % of the budget
])
def test_prefill_rate_model_table(kw, snap_kw, rate):
    fb = ReplicaFeedback.from_snapshot(snap("r", **snap_kw))
    assert SLOPolicy(**kw).prefill_rate_tps(fb) == pytest.approx(rate)


def test_replicas_without_feedback_rank_by_ledger_load():
    views = [view("a", no_feedback=True, ledger=[("free", 500)] * 2),
             view("b", no_feedback=True, ledger=[("free", 100)]),
             view("c", no_feedback=True),
             view("d", no_feedback=True, ledger=[("free", 100)] * 3)]
    assert SLOPolicy().rank(req("premium"), views) == ["c", "b", "d", "a"]
    # among replicas with feedback, a fresh one competes as an empty queue at the median rate
    views.append(view("e", waiting=[400] * 3))
    # tokens ahead of a 600-token prompt: a 1600, b 700, c 600, d 900, e 1200 + 600
    assert SLOPolicy().rank(req("free", 600), views) == ["c", "b", "d", "a", "e"]


@pytest.mark.parametrize("tier", ["premium", "free"])
def test_a_replica_that_has_run_no_batch_yet_runs_at_its_measured_peers_median_rate(tier):
    # a has measured fast batches (512 / 0.004 s = 128k tokens/s, far above the 0.05 s default); b
    # has just started: its snapshot says idle, with no batch time.  At the default batch time b
    # would look 12x slower than a forever, never be picked and never measure one
    # would look 12x slower than a forever, never be picked and never measure one.  a has one
    # request in flight (its ledger): the idle new replica is the better place for the next one
    views = [view("a", batch=0.004, kv=0.0, ledger=[(tier, 100)]), view("b", batch=None, kv=0.0)]
    policy = SLOPolicy(tier_tbt_slo_s={"premium": 0.1, "free": 0.5})
    est = {e.replica_id: e for e in policy.estimate(req(tier, 200), views)}
    assert est["b"].prefill_rate_tps == pytest.approx(est["a"].prefill_rate_tps) == pytest.approx(512 / 0.004)
    assert policy.rank(req(tier, 200), views)[0] == "b"
    # its snapshot still counts: shorter prompts queued on b rank it by that queue, at the same rate
    views[1] = view("b", batch=None, kv=0.0, waiting=[300] * 4)
    (b,) = [e for e in policy.estimate(req(tier, 700), views) if e.replica_id == "b"]
    assert b.tokens_ahead == pytest.approx(1200 + 700) and b.prefill_rate_tps == pytest.approx(512 / 0.004)
    assert policy.rank(req(tier, 700), views)[0] == "a"


def test_stale_feedback_can_be_ignored():
    views = [view("a", now=100.0, waiting=[400] * 20), view("b", now=5.0, waiting=[400] * 5)]
    assert SLOPolicy().rank(req(), views)[0] == "b"  # by default feedback is trusted however old
    # with a limit, a's 100 s old snapshot counts as unknown (empty but for its ledger)
    assert SLOPolicy(max_feedback_age_s=30).rank(req(), views)[0] == "a"


def test_a_replica_that_stopped_reporting_ranks_after_every_replica_that_reports():
    # a's snapshot is 8 s old (it stopped answering polls), and shows it idle; b is busy but reports
    views = [view("a", now=8.0), view("b", now=8.0, waiting=[400] * 20, t=7.5), view("c", no_feedback=True)]
    trusting = SLOPolicy().rank(req("premium"), views)
    assert trusting.index("a") < trusting.index("b")  # without a limit the idle-looking one is preferred
    policy = SLOPolicy(stale_feedback_s=5.0)
    ranked = policy.rank(req("premium"), views)
    assert ranked[-1] == "a" and set(ranked[:2]) == {"b", "c"}  # a new replica (no feedback yet) is not stale
    assert "stale" in next(e for e in policy.estimate(req(), views) if e.replica_id == "a").reasons


@pytest.mark.parametrize("policy_name, tier", [("slo", "premium"), ("slo", "free"), ("pow2", "free")])
def test_the_ledger_prevents_herding_on_stale_identical_snapshots(policy_name, tier):
    snapshots = {rid: ReplicaFeedback.from_snapshot(snap(rid, t=0.0, waiting=[400] * 5, decodes={"free": 10}))
                 for rid in ("r0", "r1", "r2")}
    policy = make_router_policy(policy_name, **({"seed": 3} if policy_name == "pow2" else {}))
    ledger = InFlightLedger(clock=lambda: 2.0)
    sent = Counter()
    for i in range(10):
        request = req(tier, 250, f"q{i}")
        views = build_views(sorted(snapshots), snapshots, ledger, now_s=2.0)
        choice = policy.rank(request, views)[0]
        ledger.record(choice, request)
        sent[choice] += 1
    assert set(sent) == {"r0", "r1", "r2"} and max(sent.values()) <= 5
    if policy_name == "slo":
        assert sorted(sent.values()) == [3, 3, 4]
    # without a ledger every request goes to the same replica
    herd = Counter(SLOPolicy().rank(req(tier, 250), build_views(sorted(snapshots), snapshots, None, 2.0))[0]
                   for _ in range(10))
    assert len(herd) == 1


def test_ledger_entries_older_than_the_snapshot_stop_counting():
    clock = [1.0]
    ledger = InFlightLedger(clock=lambda: clock[0])
    for i in range(6):
        ledger.record("a", req("free", 400, f"old{i}"))
    feedback = {rid: ReplicaFeedback.from_snapshot(snap(rid, t=0.5, waiting=[400])) for rid in ("a", "b")}
    views = build_views(["a", "b"], feedback, ledger, now_s=1.5)
    assert SLOPolicy().rank(req(), views)[0] == "b"  # a has 6 unreported prompts
    # a's next snapshot (t=2) shows the six in its queue, so their ledger entries go
    clock[0] = 1.8
    ledger.record("a", req("free", 400, "new"))
    ledger.on_snapshot("a", 2.0)
    assert [e.request_id for e in ledger.entries("a")] == []
    feedback["a"] = ReplicaFeedback.from_snapshot(snap("a", t=2.0, waiting=[400] * 7))
    views = build_views(["a", "b"], feedback, ledger, now_s=2.5)
    assert views[0].pending.num_requests == 0
    assert SLOPolicy().rank(req(), views)[0] == "b"  # counted once, from the snapshot
