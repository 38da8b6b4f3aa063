"""Round robin: ignore load; each request starts one replica further along.

Rule: sort the candidate ids; the first choice is the first id after the previous request's
first choice (wrapping), the rest follow in cyclic order. Keyed on the id rather than an index,
so the cycle stays fair when replicas join or leave.
"""

from __future__ import annotations

from bisect import bisect_right

from router.feedback import ReplicaView
from router.policies.base import RoutingPolicy, RoutingRequest


class RoundRobinPolicy(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        ids = sorted({v.replica_id for v in replicas})
        if not ids:
            return []
        start = 0 if self._last is None else bisect_right(ids, self._last) % len(ids)
        order = ids[start:] + ids[:start]
        self._last = order[0]
        return order
