"""The Ray Serve adapter: a RequestRouter that delegates to a pure routing policy.

Configure a replica deployment with

    RequestRouterConfig(request_router_class="router.ray_router.TierAwareRouter",
                        request_router_kwargs={"policy": "slo", "context": RoutingContext(...).as_dict(),
                                               "options": {...}},
                        request_routing_stats_period_s=1.0)

(``context`` and ``options``: see `router.policies.registry.make_router_policy`.)  For every
request it reads the routing metadata (`RoutingRequest.of`) of the `replica.contract.GenerateRequest`
the ingress passes to `generate`, every candidate replica's
`routing_stats` (the feedback snapshot its `record_routing_stats()` returned, replica/slo.py),
and its own in-flight ledger of what it sent since each snapshot; the policy ranks the replicas
and Serve tries them in that order (one replica per rank). Requests that carry no routing
metadata (e.g. `record_routing_stats` probes, health calls) keep Serve's default order.

Replicas come and go (autoscaling, restarts): when Serve hands the router a new replica set
(`RequestRouter.update_replicas`) or reports a replica's actor dead (`on_replica_actor_died`),
the router forgets the replicas that are gone: their ledger entries and snapshot times, their
cached feedback and the in-flight ids routed to them, and the policy forgets what it keeps per
replica (`RoutingPolicy.forget_replicas_except`, e.g. a prefix policy's index), so none of it
grows with the replicas ever seen.  Every routed request is told to the policy
(`RoutingPolicy.on_routed`: a prefix policy learns which replica now holds the prompt's prefix).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from replica.contract import GenerateRequest
from router.feedback import FeedbackError, ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.base import RoutingContext, RoutingRequest
from router.policies.registry import make_router_policy


def routing_request(pending: PendingRequest | None) -> RoutingRequest | None:
    """The routing metadata of a pending `generate(GenerateRequest)` call (None for calls that
    carry none, e.g. ``record_routing_stats`` probes)."""
    if pending is None:
        return None
    payload = pending.args[0] if pending.args else pending.kwargs.get("request")
    return RoutingRequest.of(payload) if isinstance(payload, GenerateRequest) else None


class TierAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "slo", context: dict[str, Any] | None = None,
                         options: dict[str, Any] | None = None) -> None:
        self.policy = make_router_policy(policy, RoutingContext(**context) if context else None, **(options or {}))
        self.ledger = InFlightLedger()
        self._feedback: dict[str, tuple[float, ReplicaFeedback]] = {}
        self._ledger_ids: dict[str, tuple[str, str]] = {}  # Serve's internal id -> (replica, ours)
        self._known_replicas: set[str] = set()  # Serve's latest replica set (a dead one taken out)

    # --- replicas that are gone ----------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new replica set: keep routing state for these replicas only."""
        super().update_replicas(replicas)
        self._known_replicas = {r.replica_id.unique_id for r in replicas}
        self.forget_replicas_except(set(self._known_replicas))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Serve found the replica's actor dead: forget it now (the next replica set will not have it)."""
        super().on_replica_actor_died(replica_id)
        self.forget_replica(replica_id.unique_id)

    def forget_replicas_except(self, live: set[str]) -> None:
        """Drop the ledger entries, snapshot times, cached feedback and in-flight ids of every
        replica not in ``live``, and what the policy keeps about them."""
        self.ledger.retain(live)
        self._feedback = {rid: v for rid, v in self._feedback.items() if rid in live}
        self._ledger_ids = {k: v for k, v in self._ledger_ids.items() if v[0] in live}
        self.policy.forget_replicas_except(live)

    def forget_replica(self, rid: str) -> None:
        """Drop what the router (and its policy) holds about one replica."""
        self.ledger.forget(rid)
        self._feedback.pop(rid, None)
        self._ledger_ids = {k: v for k, v in self._ledger_ids.items() if v[0] != rid}
        if rid in self._known_replicas:  # the policy can only have learnt of a replica Serve listed
            self._known_replicas.discard(rid)
            self.policy.forget_replicas_except(set(self._known_replicas))

    def _latest_feedback(self, replica: RunningReplica) -> ReplicaFeedback | None:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats
        if not stats:
            return None
        ts = stats.get("timestamp_s")
        cached = self._feedback.get(rid)
        if cached is not None and cached[0] == ts:
            return cached[1]
        try:
            fb = ReplicaFeedback.from_snapshot(stats)
        except (FeedbackError, ValueError):
            return None  # a malformed snapshot: treat the replica as unknown, not as a crash
        self._feedback[rid] = (ts, fb)
        self.ledger.on_snapshot(rid, fb.timestamp_s)
        return fb

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = routing_request(pending_request)
        if request is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        feedback = {rid: self._latest_feedback(r) for rid, r in by_id.items()}
        views = build_views(list(by_id), feedback, self.ledger, time.time())
        return [[by_id[rid]] for rid in self.policy.rank(request, views)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = routing_request(pending_request)
        if request is None:
            return
        rid = replica_id.unique_id
        self.ledger.record(rid, request)
        self._ledger_ids[pending_request.metadata.internal_request_id] = (rid, request.request_id)
        self.policy.on_routed(request, rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        entry = self._ledger_ids.pop(internal_request_id, None)
        if entry is not None:
            self.ledger.on_done(*entry)
