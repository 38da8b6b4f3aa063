"""SLAI (SLO-aware LLM inference), as the paper's authors implement it.

Every decode-ready request j carries a last schedulable time for its next token, set after each
batch that ran it:

    LST_j = end of that batch + TBT_j - Theta * mean_batch_time

`mean_batch_time` is the running mean of every measured batch wall time; Theta is 5 while KV-cache
use is below 96 % and 10 at or above (dynamic offset), or the constant `theta_fixed`, 10 (fixed
offset, as the authors' fixed-offset configuration). A decode that is not scheduled keeps its old LST.

Each iteration, under a token budget (512), an active-request cap (128) and a decode cap (128):
1. critical decodes (now >= LST), earliest LST first;
2. prefills already started, in the order they started, chunk = min(remaining, budget left);
3. new arrivals in FCFS, SPF, or SPF-with-strict-tiers-first order, admitted while the budget,
   KV blocks for the whole prompt (1 % watermark) and the active cap allow;
4. leftover budget to the non-critical decodes, earliest LST first, within the decode cap.
When a decode needs a KV block that is not free, the newest started prefill not yet in this
batch is preempted (recompute), else the decode itself.
"""

from __future__ import annotations

from operator import attrgetter

from mypy_extensions import mypyc_attr

from replica.policy.base import AdmissionOrder, PlanBuilder, SchedulingPolicy, order_waiting
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.state import INF, EngineState, Request


_lst = attrgetter("lst_s")
_arrival = attrgetter("arrival_s")


def sort_by_lst(reqs: list[Request]) -> None:
    """Sort ``reqs`` in place, earliest LST first, ties by arrival (then by their order): two
    stable sorts on float keys, the order a (lst_s, arrival_s) key gives, at half its cost."""
    if len(reqs) > 1:
        reqs.sort(key=_arrival)
        reqs.sort(key=_lst)


@mypyc_attr(allow_interpreted_subclasses=True)  # variants may live outside replica.native.MODULES
class SLAIPolicy(SchedulingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.name = config.name
        self.order = AdmissionOrder(config.admission_order)
        self.mean_batch_time_s = 0.0
        self.num_batches = 0
        self.theta = config.theta_low if config.dynamic_theta else config.theta_fixed
        self._offset_s = 0.0
        # whether `on_batch_end` may run SLAI's own learning inline (a variant that overrides a
        # hook of it goes through `on_batches_end`)
        cls = type(self)
        self._inline_batch_end = all(getattr(cls, hook) is getattr(SLAIPolicy, hook) for hook in (
            "on_batches_end", "record_batch_times", "current_theta", "offset_s", "next_token_lst_s"))

    def schedule(self, state: EngineState) -> BatchPlan:
        cfg = self.config
        now = state.now_s
        budget = self.token_budget_for(state)
        critical: list[Request] = []
        non_critical: list[Request] = []
        victims: list[Request] = []  # started prefills not yet in this batch, newest last
        if self.decodes_all_critical(state):
            now = INF
        add_prefilling, add_critical, add_non_critical = victims.append, critical.append, non_critical.append
        for r in state.running:  # inlined Request.is_prefill (hot loop)
            if r.num_output_tokens == 0 or r.prompt_len + r.num_output_tokens - r.num_computed_tokens > 1:
                add_prefilling(r)
            elif now >= r.lst_s:
                add_critical(r)
            else:
                add_non_critical(r)

        # The usual decode step: nothing waits, no prefill runs, no decode is critical.  If every
        # decode fits (budget, decode cap, KV blocks), the plan is all of them, earliest LST
        # first: what steps 1-4 below give, without building it.
        if not (critical or victims or state.waiting):
            k = len(non_critical)
            if k <= budget and k <= cfg.max_decodes:
                sort_by_lst(non_critical)
                kv = state.kv
                if kv.new_blocks_for_decodes(non_critical) <= kv.num_blocks - kv.num_used_blocks:
                    return BatchPlan(non_critical)

        b = PlanBuilder(state, budget, cfg.max_active_requests, cfg.max_decodes)
        # 1. critical decodes, earliest LST first (none: the usual decode step, nothing to do)
        if critical:
            sort_by_lst(critical)
            if not (
                len(critical) <= min(b.token_budget - b.num_tokens, cfg.max_decodes)
                and b.add_decodes_if_no_preemption(critical)
            ):
                for r in critical:
                    if b.budget_left <= 0 or not b.decode_room:
                        break
                    b.add_decode(r, victims)
            b.plan.num_critical_decodes = len(b.plan.decodes)

        # 2 and 3. started prefills, then new ones (none started and none waiting: nothing to do,
        # the usual decode step)
        if victims or state.waiting:
            victims = self.schedule_prefills(state, b, victims)

        # 4. non-critical decodes, earliest LST first, in the budget left (sorted only if any fit)
        k = min(len(non_critical), b.token_budget - b.num_tokens, cfg.max_decodes - len(b.plan.decodes))
        if k > 0:
            sort_by_lst(non_critical)
            if not b.add_decodes_if_no_preemption(non_critical if k == len(non_critical) else non_critical[:k]):
                for r in non_critical:
                    if b.budget_left <= 0 or not b.decode_room:
                        break
                    b.add_decode(r, victims)
        return b.plan

    # --- the hooks a variant overrides (slai_plus, slai_next) -----------------------------------
    def schedule_prefills(self, state: EngineState, b: PlanBuilder, started: list[Request]) -> list[Request]:
        """Steps 2 and 3 into ``b``, after the critical decodes: the started prefills (``started``,
        in the order they started; some may have been preempted by step 1) first-come first-served,
        then new prompts in `waiting_order` while they can be admitted.  Returns the started
        prefills left out of this batch (newest last): what a non-critical decode may preempt."""
        preempted = b.plan.preempted
        pending = [r for r in started if r not in preempted] if preempted else started
        left_out: list[Request] = []
        for k, r in enumerate(pending):
            if b.num_tokens >= b.token_budget:  # no budget left
                left_out = pending[k:]
                break
            b.add_started_prefill(r)
        if b.num_tokens < b.token_budget and state.waiting:
            for r in self.waiting_order(state):
                if not b.try_admit(r):
                    break
        return left_out

    def token_budget_for(self, state: EngineState) -> int:
        """This iteration's token budget: the fixed one."""
        return self.config.token_budget

    def decodes_all_critical(self, state: EngineState) -> bool:
        """Whether every decode is critical this iteration: never, in the paper's SLAI."""
        return False

    def waiting_order(self, state: EngineState):
        """The waiting queue in admission order (FCFS, SPF or SPF-tier)."""
        order = self.order
        assert order is not None  # set in __init__
        return order_waiting(state, order)

    def record_batch_times(self, state: EngineState, plan: BatchPlan, starts_s: list[float],
                           ends_s: list[float]) -> None:
        """Fold every measured duration into the running mean (all batches, never forgetting)."""
        n = self.num_batches
        mean = self.mean_batch_time_s
        for start, end in zip(starts_s, ends_s):
            n += 1
            mean += (end - start - mean) / n
        self.num_batches = n
        self.mean_batch_time_s = mean

    def next_token_lst_s(self, r: Request, batch_end_s: float) -> float:
        """The last schedulable time of ``r``'s next token, after a batch that ran it.  It may
        depend on ``r`` only through its ``tbt_slo_s``: `on_batches_end` computes it once per SLO."""
        return batch_end_s + r.tbt_slo_s - self._offset_s

    def current_theta(self, kv_usage: float) -> float:
        cfg = self.config
        if not cfg.dynamic_theta:
            return cfg.theta_fixed
        return cfg.theta_high if kv_usage >= cfg.theta_kv_threshold else cfg.theta_low

    def on_batch_end(
        self, state: EngineState, plan: BatchPlan, batch_start_s: float, batch_end_s: float
    ) -> None:
        if not self._inline_batch_end:
            self.on_batches_end(state, plan, [batch_start_s], [batch_end_s])
            return
        # `on_batches_end` of one batch with SLAI's own hooks (`record_batch_times`,
        # `current_theta`, `offset_s`, `next_token_lst_s`) folded into one pass: the same
        # arithmetic in the same order, so the same numbers to the last bit (this runs once per
        # iteration in every mechanism)
        cfg = self.config
        n = self.num_batches = self.num_batches + 1
        mean = self.mean_batch_time_s
        mean = self.mean_batch_time_s = mean + (batch_end_s - batch_start_s - mean) / n
        if not cfg.dynamic_theta:
            theta = cfg.theta_fixed
        else:
            kv = state.kv  # KVCache.usage, inlined
            theta = cfg.theta_high if kv.num_used_blocks / kv.num_blocks >= cfg.theta_kv_threshold else cfg.theta_low
        self.theta = theta
        offset = self._offset_s = theta * mean
        for r in plan.decodes:
            if not r.is_finished and r.num_blocks:
                r.lst_s = batch_end_s + r.tbt_slo_s - offset
        for r, _ in plan.prefills:
            if not r.is_finished and r.num_blocks and not r.is_prefill:
                r.lst_s = batch_end_s + r.tbt_slo_s - offset

    def on_batches_end(
        self, state: EngineState, plan: BatchPlan, starts_s: list[float], ends_s: list[float]
    ) -> None:
        """After one batch, or the same batch repeated back to back (a decode stretch): fold
        every measured duration into the running mean, then set the LST of each request that
        ran and is decode-ready."""
        self.record_batch_times(state, plan, starts_s, ends_s)
        self.theta = self.current_theta(state.kv.usage)
        batch_end_s = ends_s[-1]
        self._offset_s = self.offset_s(state)
        lst = self.next_token_lst_s
        by_slo: dict[float, float] = {}  # one LST per TBT SLO (a tier's requests share it)
        for r in plan.decodes:
            if not r.is_finished and r.num_blocks:
                v = by_slo.get(r.tbt_slo_s)
                if v is None:
                    v = by_slo[r.tbt_slo_s] = lst(r, batch_end_s)
                r.lst_s = v
        for r, _ in plan.prefills:
            if not r.is_finished and r.num_blocks and not r.is_prefill:
                r.lst_s = lst(r, batch_end_s)

    def offset_s(self, state: EngineState) -> float:
        """How long before a token's TBT deadline it becomes critical: Theta mean batch times."""
        return self.theta * self.mean_batch_time_s
