"""The least-work policy, table-driven over hand-built snapshots (routing_testkit.snap)."""

from collections import Counter

import pytest

from router.feedback import ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.least_work import LeastWorkPolicy, LeastWorkPolicyConfig
from routing_testkit import req, snap, view


@pytest.mark.parametrize("snap_kw, ledger, weight, prefill, decodes", [
    ({}, [], 4.0, 0, 0),
    ({"waiting": [300, 200]}, [], 4.0, 500, 0),
    ({"decodes": {"premium": 3, "free": 7}}, [], 4.0, 0, 10),
    ({"waiting": [300], "decodes": {"free": 5}}, [("free", 100), ("premium", 50)], 4.0, 450, 7),
    ({"waiting": [300], "decodes": {"free": 5}}, [("free", 100)], 0.0, 400, 6),
    ({"waiting": [300], "decodes": {"free": 5}}, [("free", 100)], 100.0, 400, 6),
    ({"no_feedback": True}, [("free", 100), ("free", 700)], 4.0, 800, 2),  # the ledger only
    ({"no_feedback": True}, [], 4.0, 0, 0),
])
def test_work_is_prefill_tokens_plus_weighted_decodes(snap_kw, ledger, weight, prefill, decodes):
    est = LeastWorkPolicy(decode_token_weight=weight).estimate(view("a", ledger=ledger, **snap_kw))
    assert (est.prefill_tokens, est.num_decodes) == (prefill, decodes)
    assert est.work_tokens == pytest.approx(prefill + weight * decodes)
    assert est.num_in_flight == len(ledger)


# a: 2000 waiting prefill tokens; b: 100 decodes; c: 1000 tokens + 100 decodes; d: 600 tokens + 50 decodes
VIEWS = {"a": {"waiting": [1000, 1000]}, "b": {"decodes": {"free": 100}},
         "c": {"waiting": [1000], "decodes": {"free": 100}}, "d": {"waiting": [600], "decodes": {"premium": 50}}}


@pytest.mark.parametrize("weight, order", [
    (4.0, ["b", "d", "c", "a"]),   # a 2000, b 400, c 1400, d 800
    (0.0, ["b", "d", "c", "a"]),   # prefill only: a 2000, b 0, c 1000, d 600
    (30.0, ["a", "d", "b", "c"]),  # a 2000, b 3000, c 4000, d 2100
])
def test_replicas_rank_by_work(weight, order):
    views = [view(rid, **kw) for rid, kw in VIEWS.items()]
    for vs in (views, views[::-1]):
        assert LeastWorkPolicy(decode_token_weight=weight).rank(req(), vs) == order


def test_the_request_itself_does_not_change_the_order():
    views = [view(rid, **kw) for rid, kw in VIEWS.items()]
    policy = LeastWorkPolicy()
    assert {tuple(policy.rank(req(tier, prompt), views))
            for tier in ("premium", "free") for prompt in (1, 500, 8000)} == {("b", "d", "c", "a")}


@pytest.mark.parametrize("ledger_a, ledger_b, first", [
    ([], [], "a"),                                   # same snapshot (800 tokens each): the id decides
    ([], [("free", 10)], "a"),                       # b: 10 + 4 more
    ([("free", 10)], [], "b"),
    ([("free", 400)], [("free", 100)] * 3, "b"),     # (800 +) a 400 + 4 vs b 300 + 12: tokens decide
    ([("free", 100)] * 3, [("free", 300)], "b"),     # (800 +) a 300 + 12 vs b 300 + 4: decodes decide
])
def test_the_ledger_counts_as_prefill_tokens_and_decodes(ledger_a, ledger_b, first):
    views = [view("a", waiting=[400, 400], ledger=ledger_a), view("b", waiting=[400, 400], ledger=ledger_b)]
    assert LeastWorkPolicy().rank(req(), views)[0] == first


def test_replicas_without_feedback_count_only_their_ledger():
    views = [view("a", no_feedback=True, ledger=[("free", 500)] * 2),   # 1000 + 8
             view("b", no_feedback=True, ledger=[("free", 100)]),       # 100 + 4
             view("c", no_feedback=True),                               # 0
             view("d", waiting=[50]),                                   # 50
             view("e", waiting=[300], decodes={"free": 10})]            # 340
    assert LeastWorkPolicy().rank(req(), views) == ["c", "d", "b", "e", "a"]


@pytest.mark.parametrize("views, order", [
    # equal work: fewer ledger entries first, then id
    ([view("b"), view("a")], ["a", "b"]),
    ([view("a", ledger=[("free", 200)]), view("b", waiting=[200], decodes={"free": 1})], ["b", "a"]),
    ([view("c", ledger=[("free", 98)] * 2), view("b", ledger=[("free", 200)]),
      view("a", waiting=[100], ledger=[("free", 100)])], ["a", "b", "c"]),  # 204 each, 2 vs 1 vs 1 entries
])
def test_ties_go_to_fewer_in_flight_then_to_the_lower_id(views, order):
    assert LeastWorkPolicy().rank(req(), views) == order


def test_every_replica_once_and_empty_input():
    views = [view(rid, **kw) for rid, kw in VIEWS.items()] + [view("e", no_feedback=True)]
    assert sorted(LeastWorkPolicy().rank(req(), views)) == ["a", "b", "c", "d", "e"]
    assert LeastWorkPolicy().rank(req(), []) == []


def test_stale_feedback_can_be_ignored():
    views = [view("a", now=100.0, waiting=[400] * 20), view("b", now=5.0, waiting=[400] * 5)]
    assert LeastWorkPolicy().rank(req(), views)[0] == "b"  # by default feedback is trusted however old
    assert LeastWorkPolicy(max_feedback_age_s=30).rank(req(), views)[0] == "a"  # a's counts as unknown


@pytest.mark.parametrize("kw", [{"decode_token_weight": -1.0}, {"max_feedback_age_s": 0}, {"weight": 1}])
def test_config_is_validated(kw):
    with pytest.raises(ValueError):
        LeastWorkPolicy(**kw)


def test_config_object_and_overrides():
    cfg = LeastWorkPolicyConfig(decode_token_weight=8)
    assert LeastWorkPolicy(cfg).config.decode_token_weight == 8
    assert LeastWorkPolicy(cfg, decode_token_weight=2).config.decode_token_weight == 2
    assert LeastWorkPolicy().config.decode_token_weight == 4.0


def test_the_ledger_prevents_herding_on_stale_identical_snapshots():
    snapshots = {rid: ReplicaFeedback.from_snapshot(snap(rid, t=0.0, waiting=[400] * 5, decodes={"free": 10}))
                 for rid in ("r0", "r1", "r2")}
    policy = LeastWorkPolicy()
    ledger = InFlightLedger(clock=lambda: 2.0)
    sent = Counter()
    for i in range(12):
        request = req("free", 250, f"q{i}")
        choice = policy.rank(request, build_views(sorted(snapshots), snapshots, ledger, now_s=2.0))[0]
        ledger.record(choice, request)
        sent[choice] += 1
    assert sent == {"r0": 4, "r1": 4, "r2": 4}  # equal prompts: strict rotation
