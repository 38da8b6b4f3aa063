"""The in-flight ledger: what a router sent since each replica's last snapshot."""

import pytest

from router.ledger import InFlightLedger, PendingLoad
from routing_testkit import req


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _ledger(sends, margin=0.0):
    """sends: (time, replica, request id, tier, prompt_len)."""
    clock = Clock()
    ledger = InFlightLedger(clock=clock, snapshot_margin_s=margin)
    for t, replica, rid, tier, n in sends:
        clock.t = t
        ledger.record(replica, req(tier, n, rid))
    return ledger, clock


SENDS = [(1.0, "a", "r1", "free", 100), (2.0, "a", "r2", "premium", 30),
         (3.0, "a", "r3", "free", 500), (2.5, "b", "r4", "free", 7)]


def test_pending_sums_prefill_tokens_and_future_decodes_per_tier():
    ledger, _ = _ledger(SENDS)
    assert ledger.pending("a") == PendingLoad(3, 630, {"free": 2, "premium": 1})
    assert ledger.pending("b") == PendingLoad(1, 7, {"free": 1})
    assert ledger.pending("nobody") == PendingLoad()
    assert [e.sent_s for e in ledger.entries("a")] == [1.0, 2.0, 3.0] and len(ledger) == 4


@pytest.mark.parametrize("snapshots, margin, left_a, left_b", [
    ([], 0.0, ["r1", "r2", "r3"], ["r4"]),
    ([("a", 2.0)], 0.0, ["r2", "r3"], ["r4"]),          # sent before the snapshot: in it already
    ([("a", 2.5)], 0.0, ["r3"], ["r4"]),
    ([("a", 9.0)], 0.0, [], ["r4"]),                     # other replicas are not touched
    ([("a", 2.5)], 1.0, ["r2", "r3"], ["r4"]),          # margin keeps sends just before it
    ([("a", 2.5), ("a", 1.5)], 0.0, ["r3"], ["r4"]),     # an older snapshot changes nothing
    ([("a", 2.5), ("a", 3.5)], 0.0, [], ["r4"]),
    ([("b", 2.5)], 0.0, ["r1", "r2", "r3"], ["r4"]),     # sent at the snapshot's time: kept
])
def test_entries_older_than_the_snapshot_are_dropped(snapshots, margin, left_a, left_b):
    ledger, _ = _ledger(SENDS, margin)
    for replica, t in snapshots:
        ledger.on_snapshot(replica, t)
    assert [e.request_id for e in ledger.entries("a")] == left_a
    assert [e.request_id for e in ledger.entries("b")] == left_b


def test_done_requests_leave_the_ledger():
    ledger, _ = _ledger(SENDS)
    assert ledger.on_done("a", "r2") is True
    assert ledger.on_done("a", "r2") is False and ledger.on_done("b", "r1") is False
    assert ledger.on_done("zzz", "r1") is False
    assert ledger.pending("a") == PendingLoad(2, 600, {"free": 2})


def test_recording_again_replaces_and_forget_drops_a_replica():
    ledger, clock = _ledger(SENDS)
    clock.t = 4.0
    ledger.record("a", req("free", 100, "r1"))
    assert [(e.request_id, e.sent_s) for e in ledger.entries("a")][-1] == ("r1", 4.0)
    assert ledger.pending("a").num_requests == 3
    ledger.forget("a")
    assert ledger.entries("a") == () and ledger.replica_ids() == ["b"]


def test_retain_forgets_every_replica_that_is_gone():
    ledger, _ = _ledger(SENDS + [(2.0, "c", "r5", "premium", 9)])
    ledger.on_snapshot("d", 1.5)  # a snapshot time only, no entries
    assert ledger.known() == {"a", "b", "c", "d"}
    assert sorted(ledger.retain(["b", "new"])) == ["a", "c", "d"]
    assert ledger.known() == {"b"} and ledger.replica_ids() == ["b"] and len(ledger) == 1
    assert ledger.pending("a") == PendingLoad() and ledger.pending("b") == PendingLoad(1, 7, {"free": 1})
    assert ledger.on_snapshot("d", 1.0) == 0 and ledger.known() == {"b", "d"}  # "d" back: starts afresh
    assert sorted(ledger.retain([])) == ["b", "d"] and ledger.known() == set()


def test_replicas_coming_and_going_do_not_grow_the_ledger():
    clock = Clock()
    ledger = InFlightLedger(clock=clock)
    for gen in range(1000):  # each round: two new replicas replace the last two
        live = [f"r{gen}-a", f"r{gen}-b"]
        for rid in live:
            clock.t += 0.01
            ledger.record(rid, req("free", 10, f"q{gen}"))
            ledger.on_snapshot(rid, clock.t - 1)
        ledger.retain(live)
    assert ledger.known() == {"r999-a", "r999-b"} and len(ledger) == 2


def test_a_negative_margin_is_rejected():
    with pytest.raises(ValueError, match="snapshot_margin_s"):
        InFlightLedger(snapshot_margin_s=-1)
