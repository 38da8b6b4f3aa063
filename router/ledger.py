"""The router's in-flight ledger: what it sent to each replica since that replica's last snapshot.

Feedback snapshots are seconds old. Between two snapshots a router would otherwise see the same
(stale) load on every replica and send everything to the one that looked best (herding, worse
with many routers). So it records each request it routes (request id, tier, prompt length, time
sent) and policies add those entries to the replica's snapshot:

* `on_snapshot(replica, t)` drops the entries sent before the snapshot's timestamp `t` (minus an
  optional margin): they are already in the snapshot's queue;
* `on_done(replica, request_id)` drops a finished (or failed) request;
* `pending(replica)` sums what is left: prefill tokens and, per tier, the decodes they will become;
* `retain(replicas)` / `forget(replica)` drop all that is known about replicas that are gone (the
  Serve router calls them when Serve updates its replica set or reports a replica dead), so the
  ledger holds only live replicas however many come and go.

Times: `clock` (default `time.time`, the clock replica snapshots are stamped with) is injectable
for tests and the virtual-time simulator. The two clocks live on different machines: a margin
(`snapshot_margin_s`) keeps entries sent just before a snapshot that may not have reached the
replica's queue when it was taken. Not thread-safe: one ledger per router, used from its event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class RoutedRequest(Protocol):
    """What the ledger needs of a routed request (`router.policies.base.RoutingRequest` fits)."""

    request_id: str
    tier: str
    prompt_len: int


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    request_id: str
    tier: str
    prompt_len: int
    sent_s: float


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """Load a replica has but its last snapshot does not show."""

    num_requests: int = 0
    prefill_tokens: int = 0
    decodes_by_tier: dict[str, int] = field(default_factory=dict)


def summarize(entries: Iterable[LedgerEntry]) -> PendingLoad:
    n = tokens = 0
    decodes: dict[str, int] = {}
    for e in entries:
        n += 1
        tokens += e.prompt_len
        decodes[e.tier] = decodes.get(e.tier, 0) + 1
    return PendingLoad(n, tokens, decodes)


class InFlightLedger:
    def __init__(self, clock: Callable[[], float] = time.time, snapshot_margin_s: float = 0.0) -> None:
        if snapshot_margin_s < 0:
            raise ValueError(f"snapshot_margin_s must be >= 0, got {snapshot_margin_s}")
        self.clock = clock
        self.snapshot_margin_s = snapshot_margin_s
        self._entries: dict[str, dict[str, LedgerEntry]] = {}
        self._snapshot_s: dict[str, float] = {}

    def record(self, replica_id: str, request: RoutedRequest) -> LedgerEntry:
        """`request` was sent to `replica_id` now (recording a request id again replaces it)."""
        entry = LedgerEntry(request.request_id, request.tier, int(request.prompt_len), self.clock())
        per = self._entries.setdefault(replica_id, {})
        per.pop(entry.request_id, None)
        per[entry.request_id] = entry
        return entry

    def on_snapshot(self, replica_id: str, snapshot_time_s: float) -> int:
        """A snapshot of `replica_id` taken at `snapshot_time_s` arrived: drop the entries it
        already counts. An older snapshot than one already seen changes nothing. Returns the
        number of entries dropped."""
        last = self._snapshot_s.get(replica_id)
        if last is not None and snapshot_time_s <= last:
            return 0
        self._snapshot_s[replica_id] = snapshot_time_s
        per = self._entries.get(replica_id)
        if not per:
            return 0
        cutoff = snapshot_time_s - self.snapshot_margin_s
        stale = [rid for rid, e in per.items() if e.sent_s < cutoff]
        for rid in stale:
            del per[rid]
        return len(stale)

    def on_done(self, replica_id: str, request_id: str) -> bool:
        """`request_id` finished or failed on `replica_id`; True if it was still in the ledger."""
        per = self._entries.get(replica_id)
        return bool(per) and per.pop(request_id, None) is not None

    def forget(self, replica_id: str) -> None:
        """The replica is gone: drop all that is known about it."""
        self._entries.pop(replica_id, None)
        self._snapshot_s.pop(replica_id, None)

    def retain(self, replica_ids: Iterable[str]) -> list[str]:
        """Only ``replica_ids`` are left (the live replica set): forget every other replica.
        Returns the replicas forgotten."""
        live = set(replica_ids)
        gone = [rid for rid in self.known() if rid not in live]
        for rid in gone:
            self.forget(rid)
        return gone

    def known(self) -> set[str]:
        """Every replica the ledger holds something about (entries or a snapshot time)."""
        return set(self._entries) | set(self._snapshot_s)

    def entries(self, replica_id: str) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries.get(replica_id, {}).values())

    def pending(self, replica_id: str) -> PendingLoad:
        """Prefill tokens and decodes per tier that `replica_id`'s last snapshot does not know yet."""
        return summarize(self._entries.get(replica_id, {}).values())

    def replica_ids(self) -> list[str]:
        return [rid for rid, per in self._entries.items() if per]

    def __len__(self) -> int:
        return sum(len(per) for per in self._entries.values())
