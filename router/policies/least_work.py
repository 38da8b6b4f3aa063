"""Least work: send a request to the replica with the least outstanding work, in tokens.

Rule: for each replica,

    work_tokens = prefill_tokens + decode_token_weight * num_decodes

* prefill_tokens = prompt tokens not yet computed: the snapshot's `waiting_prefill_tokens` plus
  the prompt tokens of this router's ledger entries sent since that snapshot;
* num_decodes = the snapshot's running decodes (all tiers) plus one per ledger entry (each
  becomes a decode once its prefill is done);
* a replica without feedback (or with feedback older than `max_feedback_age_s`, if set) counts
  only its ledger entries.

Replicas rank by work_tokens, lowest first; ties: fewer ledger entries, then replica id. The
request itself is not added (it would add the same amount everywhere).

Unit of `decode_token_weight`: prefill-equivalent tokens per running decode. Replicas schedule
by a token budget per batch (SLAI / Sarathi chunked prefill, `token_budget` = 512) in which a
decode step and a prefill token each take one token, so a running decode takes one token of
every batch while it runs. What a routing decision cares about is the few batches until the new
request's prefill is done: over a horizon of H batches a decode takes H tokens of budget that
prefill cannot use, so decode_token_weight = H. The default 4 is that horizon at the budget's
scale: a prompt of ~2,000 tokens (the order of the paper trace's median, 1,730, and mean, 2,340)
is ~4 budgets of 512 tokens; it is also token_budget / max_decodes (512 / 128, SLAI's decode cap
per batch), i.e. a replica at its decode cap weighs one full batch budget. It is not tuned to any
benchmark; a larger weight leans towards balancing decodes (KV use, TBT), a smaller one towards
prefill backlog (TTFT).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from router.feedback import ReplicaFeedback, ReplicaView, usable_feedback
from router.policies.base import RoutingPolicy, RoutingRequest


class LeastWorkPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    decode_token_weight: float = Field(
        4.0, ge=0, description="prefill-equivalent tokens one running (or ledger) decode counts for")
    max_feedback_age_s: float | None = Field(None, gt=0, description="older feedback is ignored (None: never)")


@dataclass(frozen=True, slots=True)
class WorkEstimate:
    replica_id: str
    prefill_tokens: int  # snapshot's waiting prefill tokens + ledger prompt tokens
    num_decodes: int  # snapshot's running decodes + ledger entries
    work_tokens: float
    num_in_flight: int


class LeastWorkPolicy(RoutingPolicy):
    name = "least-work"

    def __init__(self, config: LeastWorkPolicyConfig | None = None, **overrides) -> None:
        if config is None:
            config = LeastWorkPolicyConfig(**overrides)
        elif overrides:
            config = LeastWorkPolicyConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config

    def _usable(self, view: ReplicaView) -> ReplicaFeedback | None:
        return usable_feedback(view, self.config.max_feedback_age_s)

    def estimate(self, view: ReplicaView) -> WorkEstimate:
        pend = view.pending
        prefill = pend.prefill_tokens
        decodes = sum(pend.decodes_by_tier.values())
        fb = self._usable(view)
        if fb is not None:
            prefill += fb.waiting_prefill_tokens
            decodes += fb.total_running_decodes
        return WorkEstimate(
            replica_id=view.replica_id, prefill_tokens=prefill, num_decodes=decodes,
            work_tokens=prefill + self.config.decode_token_weight * decodes,
            num_in_flight=len(view.in_flight),
        )

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        ests = sorted((self.estimate(v) for v in replicas),
                      key=lambda e: (e.work_tokens, e.num_in_flight, e.replica_id))
        return [e.replica_id for e in ests]
