"""The batch plan every policy returns: what one engine iteration executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from replica.cost.shape import BatchShape
from replica.policy.state import Request

_num_computed = attrgetter("num_computed_tokens")


@dataclass(slots=True)
class BatchPlan:
    """One iteration.

    `decodes`: running decodes that compute one token each, in the order chosen.
    `prefills`: `(request, new_tokens)` chunks, started prefills first, then admissions.
    `admitted`: the requests of `prefills` that come from the waiting queue this iteration; the
        mechanism reserves KV for their whole `num_tokens` (Sarathi-style admission).
    `preempted`: running requests whose KV is dropped (recompute); they go back to the front of
        the waiting queue.
    `ran_shape`: the shape the iteration ran with, recorded by the mechanism when it starts the
        iteration (`record_shape`); None before.  After the iteration the requests' contexts
        have moved on, so what learns from the iteration (`SchedulingPolicy.on_batch_end`) reads
        this, not `shape()`.
    """

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_critical_decodes: int = 0
    ran_shape: BatchShape | None = None

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
        """The batch shape a cost profile prices, from the requests' contexts as they are now: the
        shape the iteration runs with only until the mechanism advances them.  An admission's
        chunk starts after its cached prefix (`num_cached_tokens`; 0 without prefix caching),
        which is where the mechanism sets its `num_computed_tokens` when it admits it."""
        p_sum = p_sq = p_ctx = 0
        admitted = set(map(id, self.admitted)) if self.admitted else ()
        for req, n in self.prefills:
            p_sum += n
            p_sq += n * n
            p_ctx += n * (req.num_cached_tokens if id(req) in admitted else req.num_computed_tokens)
        return BatchShape(p_sum, p_sq, p_ctx, len(self.decodes), sum(map(_num_computed, self.decodes)))

    def record_shape(self) -> BatchShape:
        """Record `ran_shape` (and return it): the mechanism calls this when it starts the
        iteration, once its admissions hold their cached prefix and before it advances any
        request's progress."""
        decodes = self.decodes
        if self.prefills:
            shape = self.shape()
        else:  # a decode-only plan's `shape()`, inlined (the usual iteration)
            shape = BatchShape(0, 0, 0, len(decodes), sum(map(_num_computed, decodes)))
        self.ran_shape = shape
        return shape

    def summary(self) -> dict:
        """Comparable, id-level description (used by conformance checks)."""
        return {
            "decodes": [r.req_id for r in self.decodes],
            "prefills": [(r.req_id, n) for r, n in self.prefills],
            "admitted": [r.req_id for r in self.admitted],
            "preempted": [r.req_id for r in self.preempted],
            "num_critical_decodes": self.num_critical_decodes,
        }
