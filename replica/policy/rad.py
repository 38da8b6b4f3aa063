"""RAD (Resource-Aware Dynamic), built from the paper's two throughput principles.

The paper proves RAD throughput-optimal but publishes no implementation, so the rule below is
ours (documented in docs/BENCHMARKS.md next to its measurements):

* Optimal tiling: whenever there is more prefill work than fits, an iteration's total size
  (decodes + prefill tokens) is a multiple of the profile's GEMM tile (`tile_tokens`), so no
  matrix-multiply tile is padded (if admissions are blocked by KV or the cap, the last prefill
  chunk is cut back to the tile boundary below); a batch off the tile grid is only formed when
  the queue holds less work than that.
* Dynamic allocation by queue state: every running decode runs in every iteration (decode
  work never waits). Which resource binds decides the prefill share:
  - slot-bound (a prompt waits but the active cap or the KV cache stops its admission): the
    requests in the engine are the bottleneck and each finishes faster with short iterations,
    so the iteration is capped at `token_budget` (like Sarathi's);
  - otherwise compute-bound: prefill takes whatever the backlog (uncomputed tokens of started
    prefills plus waiting prompts) fills, up to a size between `token_budget` (engine full)
    and `max_batch_tokens` (engine empty) in proportion to the free request slots: large
    iterations amortise the per-iteration cost while slots are free, and shrink as the
    engine fills, because long iterations slow every decode and so hold slots longer (without
    this, at high load RAD ran out of slots and KV before Sarathi did and fell behind it);
  - no prefill work: decode-only iterations.
  The split follows the queues at every step, never a fixed ratio.
* Admission in arrival order, at most `max_active_requests` holding KV (the cap on prefills
  admitted per cycle), whole prompt reserved in KV with the 1 % watermark, recompute
  preemption of the latest arrival like Sarathi. SLOs are ignored, as in the paper.
"""

from __future__ import annotations

import math
from collections import deque
from operator import attrgetter

from replica.policy.base import PlanBuilder, SchedulingPolicy, split_prefills
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState

_arrival = attrgetter("arrival_s")


class RADPolicy(SchedulingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.name = config.name
        self.tile = config.tile_tokens
        self.compute_bound_tokens = max(self.tile, (config.max_batch_tokens // self.tile) * self.tile)
        self.slot_bound_tokens = min(
            self.compute_bound_tokens, max(self.tile, (config.token_budget // self.tile) * self.tile)
        )

    def _iteration_size(self, num_decodes: int, backlog_tokens: int, limit: int) -> int:
        """Tokens this iteration: all of the work if it fits, else the largest tile multiple."""
        if num_decodes + backlog_tokens <= limit:
            return num_decodes + backlog_tokens
        return max(limit, -(-num_decodes // self.tile) * self.tile)

    def schedule(self, state: EngineState) -> BatchPlan:
        cfg = self.config
        by_arrival = sorted(state.running, key=_arrival)
        started, decodes = split_prefills(by_arrival)
        backlog = sum(r.num_uncomputed_tokens for r in started)
        num_decodes = min(cfg.max_decodes, len(decodes))
        kv = state.kv
        slot_bound = bool(state.waiting) and (
            len(by_arrival) >= cfg.max_active_requests
            or not kv.can_admit(kv.num_free_blocks, state.waiting[0].num_tokens)
        )
        if slot_bound:
            limit = self.slot_bound_tokens
        else:  # the fuller the engine, the closer to the token budget
            free_frac = 1.0 - len(by_arrival) / cfg.max_active_requests
            span = self.compute_bound_tokens - self.slot_bound_tokens
            limit = self.slot_bound_tokens + math.ceil(span * free_frac / self.tile) * self.tile
        if not slot_bound:
            for r in state.waiting:  # only whether the backlog exceeds one batch matters: stop there
                if num_decodes + backlog > limit:
                    break
                backlog += r.num_tokens - r.num_cached_tokens
        size = self._iteration_size(num_decodes, backlog, limit)
        b = PlanBuilder(state, size, cfg.max_active_requests, cfg.max_decodes)
        # the first decodes (arrival order) up to the decode cap; one by one, with preemptions of
        # the latest arrivals, if their KV blocks do not all fit
        if not b.add_decodes_if_no_preemption(decodes[:num_decodes]):
            started = []
            queue = deque(by_arrival)
            while queue:
                r = queue.popleft()
                if r.is_prefill:
                    started.append(r)
                elif b.decode_room:
                    b.add_decode(r, queue)
        for r in started:
            if b.budget_left <= 0:
                break
            b.add_started_prefill(r)
        for r in state.waiting:
            if not b.try_admit(r):
                break
        plan = b.plan
        excess = b.num_tokens % self.tile
        if excess and self.tile < b.num_tokens < num_decodes + backlog and plan.prefills:
            # more work is queued than this batch holds (admissions blocked by KV or the cap):
            # end the batch at the tile boundary below instead of padding a tile
            req, n = plan.prefills[-1]
            if n > excess:
                plan.prefills[-1] = (req, n - excess)
        return plan

