"""Power of two choices on queue length (Ray Serve's default request router).

Rule: sample two distinct replicas uniformly at random; the one with the shorter queue comes
first, the other second (ties: the first sampled). Queue length = waiting + running in the
replica's last snapshot + this router's ledger entries sent since (0 + ledger without feedback).
The remaining replicas follow by queue length, then id. The RNG is seedable.
"""

from __future__ import annotations

import random
from typing import Any

from router.feedback import ReplicaView
from router.policies.base import (
    RoutingContext,
    RoutingPolicy,
    RoutingRequest,
    queue_length,
)


class PowerOfTwoPolicy(RoutingPolicy):
    name = "pow2"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    @classmethod
    def context_options(cls, context: RoutingContext) -> dict[str, Any]:
        return {"seed": context.seed} if context.seed is not None else {}

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        if len(replicas) == 1:
            return [replicas[0].replica_id]
        a, b = self.rng.sample(replicas, 2)
        first, second = (b, a) if queue_length(b) < queue_length(a) else (a, b)
        chosen = {first.replica_id, second.replica_id}
        rest = sorted((v for v in replicas if v.replica_id not in chosen),
                      key=lambda v: (queue_length(v), v.replica_id))
        return [first.replica_id, second.replica_id] + [v.replica_id for v in rest]
