"""slai-next: slai-plus with two more levers against the throughput ceiling (issue 20), each
switchable for the ablation.

slai-plus (`replica.policy.slai_plus`) runs SLAI's iteration (critical decodes, started prefills
first-come first-served, new prompts shortest first, the other decodes) with its five fixes.  Its
median TTFT, not request slots, binds on the paper's setup: a short prompt that arrives behind a
long started prefill waits for all of it, and the adaptive budget is given up whenever the slot
guard trips.  slai-next keeps every slai-plus mechanism and flag and adds:

* ``srpf`` (shortest remaining prefill first across started and new prompts): at each chunk
  boundary the prefill budget goes to the prompts with the fewest tokens left to compute, started
  ones (``num_uncomputed_tokens``) and waiting ones (their uncached prompt, the SPF key) in one
  order, instead of every started prefill before any new one.  A started prefill that is not
  chosen gets no tokens this iteration; it keeps its KV (vLLM V1 simply leaves a running request
  out of a step).  Aging bounds it as it bounds admission: with ``aging`` on, a prompt, started or
  waiting, that has waited ``max_wait_ttft_multiple`` x its tier's TTFT target since it arrived is
  overdue, and overdue prompts go first, oldest first, so a long prompt waits at most that
  deadline plus the drain time of the prompts overdue before it.  One rule keeps the plan what
  vLLM executes: vLLM gives its running requests (decodes, then started prefills in plan order)
  their whole remaining prompt within the budget before it admits anything, so a started prefill
  gets a partial chunk only while the plan admits nothing; a started prefill that does not fit
  whole after an admission waits for the next chunk boundary (the prefill pass stops there).
  Safe for the strict tier: it reorders prefill chunks only, after the critical decodes, under
  the same budget.

* ``eager_budget`` (the budget the strict tier allows, whenever it is safe): like slai-plus it
  grows the budget only with a prefill backlog and never while slot-bound (longer iterations
  would hold every request, and its KV, longer: measured, growing while slot-bound cost a
  capacity step on the h100-measured profile, BENCHMARKS 14d).  What differs is the SLO that
  bounds the iteration: the strictest among the requests whose token gap this iteration
  lengthens, the running decodes.  A request still prefilling emits its first token at the end of its last
  chunk; its first gap is the next iteration, sized with it as a decode.  With no decode running
  (and not slot-bound) the budget is ``max_token_budget``.  Why the strict tier stays safe: the candidate budgets and
  their prediction are slai-plus's (whole tiles, the time model fitted on this engine's measured
  iterations, every running decode plus one chunk at the longest started prefill's context), the
  predicted time is at most (1 - ``slo_margin``) of the strictest running decode's SLO, and once
  iterations exceed half that SLO the adaptive offset makes every decode of that tier critical in
  every iteration, so its gap is one iteration.  A long iteration with no decode running raises
  the offset (2 x the longest recent iteration) at once, so the requests it completes are critical
  from their first token.

* ``shrink_budget`` (with ``eager_budget``): where even the base budget's predicted
  iteration is longer than (1 - ``slo_margin``) of the strictest running decode's SLO (a strict
  tier on a slow GPU: 50 ms on the rtx6000ada profile, whose 512-token iteration takes ~45-60 ms
  with the decodes' context), the budget is the largest whole number of tiles below the base whose
  predicted time fits, never below one tile or below what holds every running decode.  If no
  such budget fits, the SLO is out of the budget's reach and the mechanism steps aside (the base
  stays): shrinking then would cost throughput and still miss (measured: premium 25 ms on the
  rtx6000ada profile, whose fixed iteration cost alone is ~19 ms).  Where it can, it gives up
  throughput, not the strict tier's SLO.

Everything else (aging of admissions, the adaptive offset, the slot guard, the recent window,
KV admission of whole prompts) is slai-plus's, behind the same flags.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from operator import attrgetter

from replica.policy.base import PlanBuilder
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.slai_plus import SLAIPlusPolicy, fits_in, running_load
from replica.policy.state import INF, EngineState, Request

_arrival = attrgetter("arrival_s")


def _remaining(r: Request) -> int:
    return r.prompt_len + r.num_output_tokens - r.num_computed_tokens


class SLAINextPolicy(SLAIPlusPolicy):
    """slai-plus with shortest-remaining-prefill-first across started and new prompts and a budget
    grown whenever the time model predicts it safe (see the module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.last_skipped: list[Request] = []  # started prefills the last plan left out (tests, logs)

    # --- the iteration: SLAI's, with this prefill step ----------------------------------------
    def schedule(self, state: EngineState) -> BatchPlan:
        self.last_skipped = []  # `schedule_prefills` sets it (SLAI skips it with nothing to prefill)
        return super().schedule(state)

    def schedule_prefills(self, state: EngineState, b: PlanBuilder, started: list[Request]) -> list[Request]:
        if not self.config.srpf:
            return super().schedule_prefills(state, b, started)
        preempted = set(map(id, b.plan.preempted))
        started = [r for r in started if id(r) not in preempted]
        scheduled: set[int] = set()
        if b.budget_left > 0 and (started or state.waiting):
            self._fill_prefills(state, b, started, scheduled)
        left_out = [r for r in started if id(r) not in scheduled]
        self.last_skipped = list(left_out)
        if b.plan.admitted and len(b.plan.prefills) > 1:
            # started prefills first, then admissions: the order vLLM runs them in
            admitted = set(map(id, b.plan.admitted))
            b.plan.prefills.sort(key=lambda rn: id(rn[0]) in admitted)
        return left_out

    def _fill_prefills(self, state: EngineState, b: PlanBuilder, started: list[Request],
                       scheduled: set[int]) -> None:
        cfg = self.config
        now = state.now_s
        k = cfg.max_wait_ttft_multiple
        aging = cfg.aging

        def overdue(r: Request) -> bool:
            return aging and now - r.arrival_s >= k * r.ttft_target_s

        late = [r for r in started if overdue(r)]
        late_ids = set(map(id, late))
        waiting = self.waiting_order(state)  # overdue waiting requests first, oldest first (aging)
        n_late_waiting = 0
        if aging:
            while n_late_waiting < len(waiting) and overdue(waiting[n_late_waiting]):
                n_late_waiting += 1
        if late and n_late_waiting:
            front = sorted([*late, *waiting[:n_late_waiting]], key=_arrival)
        else:
            front = late or list(waiting[:n_late_waiting])
        rest_started = sorted((r for r in started if id(r) not in late_ids), key=_remaining)
        rest_waiting = waiting[n_late_waiting:]
        if rest_started:
            # merge the started prefills (by tokens left) into the waiting order (SPF: uncached
            # prompt), started first on a tie: one pass, no re-sort of the waiting queue
            keyed = heapq.merge(((_remaining(r), 0, j, r) for j, r in enumerate(rest_started)),
                                ((r.prompt_len - r.num_cached_tokens, 1, j, r) for j, r in enumerate(rest_waiting)))
            rest: Iterator[Request] = (r for *_, r in keyed)
        else:
            rest = iter(rest_waiting)
        admitting = True
        for source in (front, rest):
            for r in source:
                left = b.budget_left
                if left <= 0:
                    return
                if r.num_blocks:  # a started prefill (holds its KV)
                    need = _remaining(r)
                    if need > left and b.plan.admitted:
                        return  # vLLM would give it the admissions' tokens: it waits for the next boundary
                    b.add_started_prefill(r)
                    scheduled.add(id(r))
                elif admitting and not b.try_admit(r):
                    admitting = False  # admission blocked (KV, slots): no later prompt jumps it

    # --- the budget ------------------------------------------------------------------------------
    def token_budget_for(self, state: EngineState) -> int:
        cfg = self.config
        if not cfg.eager_budget:
            return super().token_budget_for(state)
        base = cfg.token_budget
        self.last_budget = base
        if not cfg.adaptive_budget or cfg.max_token_budget <= base:
            return base
        # the SLO that bounds the iteration: the strictest running decode's (module docstring)
        slo, work, ctx, n_dec, chunk_ctx = running_load(state, decodes_only=True)
        if fits_in(state, work, base):
            return base  # everything fits: the budget changes nothing
        tile = cfg.tile_tokens
        # slot-bound: never grow (longer iterations would hold every request, and its KV, longer:
        # slai-plus's rule); the shrink below still protects the strictest decode
        top = base if self._slot_bound else max(cfg.max_token_budget // tile * tile, base)
        if slo == INF:  # no decode running: no token gap is lengthened by this iteration
            self.last_budget = top
            return top
        coef = self.time_model.coefficients
        if coef is None:
            return base
        limit = (1.0 - cfg.slo_margin) * slo
        fixed = coef[0] + coef[2] * (ctx / 1e3)

        def predicted_s(budget: int) -> float:
            chunk = max(budget - n_dec, 0)
            return fixed + coef[1] * budget + coef[3] * (chunk * chunk / 1e6) + coef[4] * (chunk * chunk_ctx / 1e6)

        best = base
        for budget in range(top, base, -tile):  # largest first
            if predicted_s(budget) <= limit:
                best = budget
                break
        else:
            if cfg.shrink_budget and predicted_s(base) > limit:
                # the base itself is too long for the strictest decode: the largest whole number
                # of tiles below it that fits, down to what holds every running decode; if none
                # fits, the budget cannot hold that SLO and steps aside (the base stays)
                floor = max(tile, -(-n_dec // tile) * tile)
                for budget in range((base - 1) // tile * tile, floor - 1, -tile):
                    if predicted_s(budget) <= limit:
                        best = budget
                        break
        self.last_budget = best
        return best
