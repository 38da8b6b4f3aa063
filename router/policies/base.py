"""The routing contract: a request's routing metadata and the policy protocol.

A policy ranks the candidate replicas for one request, best first, from what it sees of each
(`router.feedback.ReplicaView`: latest feedback snapshot, its age, the router's in-flight ledger
entries). It returns every candidate id exactly once, so a caller can fall back down the list
(Ray Serve's RequestRouter tries ranks in order). Policies may keep state (a cursor, an RNG) but
never mutate the views; recording the choice in the ledger is the caller's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from router.feedback import ReplicaView


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    request_id: str
    tier: str
    tbt_slo_s: float
    tier_rank: int  # 0 = strictest tier
    prompt_len: int

    def __post_init__(self) -> None:
        if not (self.tbt_slo_s > 0 and math.isfinite(self.tbt_slo_s)):
            raise ValueError(f"tbt_slo_s must be positive and finite, got {self.tbt_slo_s}")
        if self.prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {self.prompt_len}")
        if self.tier_rank < 0:
            raise ValueError(f"tier_rank must be >= 0, got {self.tier_rank}")


@runtime_checkable
class RoutingPolicy(Protocol):
    name: str

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        """Replica ids of `replicas`, best first (all of them, each once; [] for no replicas)."""
        ...


def queue_length(view: ReplicaView) -> int:
    """Requests on a replica as this router knows them: waiting + running in its last snapshot
    plus the ledger's entries sent since."""
    fb = view.feedback
    base = 0 if fb is None else fb.num_waiting + fb.num_running
    return base + len(view.in_flight)
