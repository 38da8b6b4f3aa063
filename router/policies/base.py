"""The routing contract: a request's routing metadata, what a policy may know of the deployment,
and the policy interface.

A policy ranks the candidate replicas for one request, best first, from what it sees of each
(`router.feedback.ReplicaView`: latest feedback snapshot, its age, the router's in-flight ledger
entries). It returns every candidate id exactly once, so a caller can fall back down the list
(Ray Serve's RequestRouter tries ranks in order). Policies may keep state (a cursor, an RNG) but
never mutate the views; recording the choice in the ledger is the caller's job.

Every policy is built the same way, by `router.policies.registry.make_router_policy(name,
context, **options)`: the `RoutingContext` (the deployment's tiers, its replicas' token budget, a
seed) gives each policy what it takes from it (`RoutingPolicy.context_options`), explicit options
override.  The Serve adapter (`router.ray_router`) and the cluster simulator
(`loadtest.simulate.cluster`) both build them so.

Two hooks tell a stateful policy what happened after it ranked (both no-ops by default, so a
stateless policy ignores them):

* ``on_routed(request, replica_id)``: the request was actually sent to ``replica_id`` (not
  necessarily the policy's first choice: a caller may have fallen down the list).  The Serve
  adapter calls it from ``on_request_routed``, the cluster simulator right after its decision.
  A policy that learns from its own decisions (the prefix index of `slo` and `prefix-affinity`)
  learns here, never in ``rank``.
* ``forget_replicas_except(live)``: every replica not in ``live`` is gone; drop what is held
  about them, so a policy's state stays bounded however many replicas come and go.

A request's prompt prefix is described by ``RoutingRequest.prefix_hashes``: chained hashes of its
blocks of ``prefix_block_tokens`` tokens (equal hash at position k means an equal prompt up to the
end of block k), the unit a replica's prefix cache reuses.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from replica.contract import GenerateRequest

if TYPE_CHECKING:
    from router.feedback import ReplicaView


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    request_id: str
    tier: str
    tbt_slo_s: float
    tier_rank: int  # 0 = strictest tier
    prompt_len: int
    # chained hashes of the prompt's blocks of prefix_block_tokens tokens, in prompt order (the
    # last may be a partial block, as in the Mooncake trace); () when unknown
    prefix_hashes: tuple[int, ...] = ()
    prefix_block_tokens: int = 0  # tokens per hashed block (> 0 when there are hashes)

    def __post_init__(self) -> None:
        if not (self.tbt_slo_s > 0 and math.isfinite(self.tbt_slo_s)):
            raise ValueError(f"tbt_slo_s must be positive and finite, got {self.tbt_slo_s}")
        if self.prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {self.prompt_len}")
        if self.tier_rank < 0:
            raise ValueError(f"tier_rank must be >= 0, got {self.tier_rank}")
        if self.prefix_block_tokens < 0:
            raise ValueError(f"prefix_block_tokens must be >= 0, got {self.prefix_block_tokens}")
        if self.prefix_hashes:
            if self.prefix_block_tokens <= 0:
                raise ValueError("prefix_block_tokens must be > 0 when prefix_hashes are given")
            if (len(self.prefix_hashes) - 1) * self.prefix_block_tokens >= self.prompt_len:
                raise ValueError(f"{len(self.prefix_hashes)} prefix blocks of {self.prefix_block_tokens} tokens "
                                 f"cover more than the prompt's {self.prompt_len} tokens")

    @classmethod
    def of(cls, request: GenerateRequest) -> RoutingRequest:
        """The routing metadata of a generate request (`replica.contract`)."""
        t = request.tier
        return cls(request_id=request.request_id, tier=t.name, tbt_slo_s=t.tbt_slo_s, tier_rank=t.rank,
                   prompt_len=request.prompt_len,
                   prefix_hashes=tuple(getattr(request, "prefix_hashes", None) or ()),
                   prefix_block_tokens=int(getattr(request, "prefix_block_tokens", 0) or 0))


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """What a router may know of the deployment it routes for (None / empty: unknown, the
    policy's default stands): each tier's TBT SLO, the replicas' token budget per iteration, a
    seed for randomised policies, and how old a replica's feedback may get before the replica is
    taken for unresponsive.  JSON-ready as `as_dict()` (Serve's router kwargs)."""

    tier_tbt_slo_s: Mapping[str, float] = field(default_factory=dict)
    token_budget: int | None = None
    seed: int | None = None
    stale_feedback_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are known (``RoutingContext(**as_dict())`` rebuilds it)."""
        out: dict[str, Any] = {"tier_tbt_slo_s": dict(self.tier_tbt_slo_s)}
        if self.token_budget is not None:
            out["token_budget"] = self.token_budget
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stale_feedback_s is not None:
            out["stale_feedback_s"] = self.stale_feedback_s
        return out


class RoutingPolicy(ABC):
    name: str

    @classmethod
    def context_options(cls, context: RoutingContext) -> dict[str, Any]:
        """The constructor options this policy takes from the deployment's `RoutingContext`
        (explicit options override them).  Default: none."""
        return {}

    @abstractmethod
    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        """Replica ids of `replicas`, best first (all of them, each once; [] for no replicas)."""

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        """`request` was sent to `replica_id` (after `rank`, whichever rank the caller took).
        Default: nothing to learn."""

    def forget_replicas_except(self, live: set[str]) -> None:
        """Only the replicas in `live` are left: drop all state about the others.  Default: none held."""


def queue_length(view: ReplicaView) -> int:
    """Requests on a replica as this router knows them: waiting + running in its last snapshot
    plus the ledger's entries sent since."""
    fb = view.feedback
    base = 0 if fb is None else fb.num_waiting + fb.num_running
    return base + len(view.in_flight)
