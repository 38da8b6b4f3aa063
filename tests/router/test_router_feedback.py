"""The feedback snapshot schema: a real SLOTracker snapshot parses; bad snapshots are rejected."""

import json

import pytest

from replica.policy.state import EngineState, KVCache, Request
from replica.slo import SLOTracker
from router.feedback import (FeedbackError, PromptHistogram, ReplicaFeedback, UnsupportedSnapshotVersion,
                             build_views)
from router.ledger import InFlightLedger
from routing_testkit import req, snap


def _real_snapshot() -> dict:
    tracker = SLOTracker({"premium": 0.1, "free": 0.5}, {"premium": 0.5, "free": 2.0})
    p = Request("p", prompt_len=50, arrival_s=0.0, tier="premium", tbt_slo_s=0.1, tier_rank=0,
                num_computed_tokens=50, num_output_tokens=1)
    f = Request("f", prompt_len=80, arrival_s=0.0, tier="free", tbt_slo_s=0.5, tier_rank=1,
                num_computed_tokens=82, num_output_tokens=3)
    for t in (0.3, 0.35, 0.5):  # premium: ttft 0.3, gaps 0.05 and 0.15 (a miss)
        tracker.on_tokens([p, f], t)
        p.last_token_s = f.last_token_s = t
    kv = KVCache(200)
    kv.num_used_blocks = 50
    waiting = [Request("w1", 300, 0.4, "free", 0.5), Request("w2", 5000, 0.45, "premium", 0.1)]
    started = Request("s", 1000, 0.2, "free", 0.5, num_computed_tokens=400)
    state = EngineState(0.6, kv, waiting, [p, f, started])
    snapshot = tracker.snapshot("replica-7", state, mean_batch_time_s=0.042, now=0.6)
    return json.loads(json.dumps(snapshot))  # as it travels: JSON only


def test_a_real_tracker_snapshot_parses():
    fb = ReplicaFeedback.from_snapshot(_real_snapshot())
    assert (fb.replica_id, fb.timestamp_s, fb.version) == ("replica-7", 0.6, 1)
    assert fb.num_waiting == 2 and fb.num_running == 3
    assert fb.waiting_prefill_tokens == 300 + 5000 + 600
    assert fb.waiting_prompt_histogram.counts == (1, 1, 0, 0, 1, 0)
    assert fb.running_decodes_by_tier == {"premium": 1, "free": 1} and fb.total_running_decodes == 2
    assert fb.kv_usage == 0.25 and fb.mean_batch_time_s == 0.042
    prem = fb.tier("premium")
    assert prem.ttft_p50_s == pytest.approx(0.3) and prem.tbt_p99_s == pytest.approx(0.15, abs=0.01)
    assert prem.tbt_misses_total == 1 and fb.tier("nope") is None
    # SPF view of the queue: a 700-token prompt has the 300 and the 600 left of `s` ahead, roughly
    assert fb.waiting_tokens_at_most(10_000) == 5900
    assert 0 < fb.waiting_tokens_at_most(700) < 5900


def test_missing_optional_fields_take_neutral_defaults_and_extras_are_ignored():
    fb = ReplicaFeedback.from_snapshot({"version": 1, "replica_id": "r", "timestamp_s": 3.0, "future_field": [1]})
    assert fb.num_waiting == 0 and fb.waiting_prefill_tokens == 0 and fb.waiting_prompt_histogram is None
    assert fb.running_decodes_by_tier == {} and fb.kv_usage == 0.0 and fb.mean_batch_time_s is None
    assert fb.tiers == {} and fb.waiting_tokens_at_most(100) == 0


def test_a_partial_tier_entry_parses():
    fb = ReplicaFeedback.from_snapshot({"version": 1, "replica_id": "r", "timestamp_s": 0,
                                        "tiers": {"premium": {"tbt_p99_s": 0.2}}})
    assert fb.tier("premium").tbt_p99_s == 0.2 and fb.tier("premium").tokens_total == 0


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.5])
def test_an_unknown_version_is_rejected_clearly(version):
    bad = {**snap("r"), "version": version}
    with pytest.raises(UnsupportedSnapshotVersion, match=r"version .* not supported.*reads version 1"):
        ReplicaFeedback.from_snapshot(bad)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("version"), "no 'version'"),
    (lambda s: s.pop("replica_id"), "replica_id"),
    (lambda s: s.pop("timestamp_s"), "timestamp_s"),
    (lambda s: s.update(kv_usage=-0.1), "kv_usage"),
    (lambda s: s.update(waiting_prefill_tokens="lots"), "waiting_prefill_tokens"),
    (lambda s: s["waiting_prompt_histogram"].update(counts=[1, 2]), "6 edges but 2 counts"),
    (lambda s: s["waiting_prompt_histogram"].update(edges=[0, 512, 512, 2048, 4096, 8192]), "increasing"),
    (lambda s: s.update(running_decodes_by_tier={"free": -1}), "non-negative"),
])
def test_invalid_snapshots_are_rejected(mutate, match):
    bad = snap("r", waiting=[10])
    mutate(bad)
    with pytest.raises(FeedbackError, match=match):
        ReplicaFeedback.from_snapshot(bad)


def test_a_non_mapping_is_rejected():
    with pytest.raises(FeedbackError, match="mapping"):
        ReplicaFeedback.from_snapshot([1, 2])


EDGES = (0, 512, 1024, 2048, 4096, 8192)


@pytest.mark.parametrize("counts, total, prompt_len, expected", [
    ((0, 0, 0, 0, 0, 0), 0, 100, 0.0),                  # empty queue
    ((3, 0, 0, 0, 0, 0), 900, 600, 900.0),              # every waiting prompt is shorter: all ahead
    ((3, 0, 0, 0, 0, 0), 900, 10_000, 900.0),
    ((0, 0, 0, 0, 2, 0), 12_000, 100, 0.0),             # every waiting prompt is longer: none ahead
    ((0, 0, 0, 0, 0, 1), 9_000, 8191, 0.0),             # open last bin, prompt below it
    ((0, 0, 0, 0, 0, 0), 700, 100, 700.0),              # counts say nothing: all ahead
    ((2, 0, 0, 0, 2, 0), 12_800, 600, 512.0),           # by bin midpoints: 2*256 of 2*256 + 2*6144
    ((2, 0, 0, 0, 2, 0), 25_600, 600, 1024.0),          # ... scaled to the reported total
    ((2, 0, 0, 0, 0, 0), 512, 255, 127.5),             # half of a uniform bin: a quarter of its tokens
])
def test_histogram_tokens_at_most_table(counts, total, prompt_len, expected):
    h = PromptHistogram(edges=EDGES, counts=counts)
    assert h.tokens_at_most(prompt_len, total) == pytest.approx(expected, rel=1e-3)


def test_histogram_estimate_grows_with_prompt_len_and_is_bounded():
    h = PromptHistogram(edges=EDGES, counts=(4, 3, 2, 1, 1, 1))
    values = [h.tokens_at_most(n, 30_000) for n in range(0, 20_000, 97)]
    assert values == sorted(values) and values[0] >= 0 and values[-1] == 30_000


def test_build_views_ages_feedback_and_attaches_the_ledger():
    ledger = InFlightLedger(clock=lambda: 5.0)
    ledger.record("a", req(rid="x", prompt=42))
    fb = ReplicaFeedback.from_snapshot(snap("a", t=3.0))
    a, b = build_views(["a", "b"], {"a": fb}, ledger, now_s=4.5)
    assert (a.replica_id, a.feedback_age_s, [e.request_id for e in a.in_flight]) == ("a", 1.5, ["x"])
    assert a.pending.prefill_tokens == 42 and a.pending.decodes_by_tier == {"free": 1}
    assert (b.feedback, b.feedback_age_s, b.in_flight) == (None, None, ())
