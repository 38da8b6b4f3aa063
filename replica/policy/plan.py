"""The batch plan every policy returns: what one engine iteration executes."""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.cost.shape import BatchShape
from replica.policy.state import Request


@dataclass(slots=True)
class BatchPlan:
    """One iteration.

    `decodes`: running decodes that compute one token each, in the order chosen.
    `prefills`: `(request, new_tokens)` chunks, started prefills first, then admissions.
    `admitted`: the requests of `prefills` that come from the waiting queue this iteration; the
        mechanism reserves KV for their whole `num_tokens` (Sarathi-style admission).
    `preempted`: running requests whose KV is dropped (recompute); they go back to the front of
        the waiting queue.
    """

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_critical_decodes: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    def shape(self) -> BatchShape:
        """The batch shape a cost profile prices (contexts as before this iteration)."""
        p_sum = p_sq = p_ctx = 0
        for req, n in self.prefills:
            p_sum += n
            p_sq += n * n
            p_ctx += n * req.num_computed_tokens
        d_ctx = 0
        for req in self.decodes:
            d_ctx += req.num_computed_tokens
        return BatchShape(p_sum, p_sq, p_ctx, len(self.decodes), d_ctx)

    def summary(self) -> dict:
        """Comparable, id-level description (used by conformance checks)."""
        return {
            "decodes": [r.req_id for r in self.decodes],
            "prefills": [(r.req_id, n) for r, n in self.prefills],
            "admitted": [r.req_id for r in self.admitted],
            "preempted": [r.req_id for r in self.preempted],
            "num_critical_decodes": self.num_critical_decodes,
        }
