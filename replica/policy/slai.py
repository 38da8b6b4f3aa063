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


class SLAIPolicy(SchedulingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.name = config.name
        self.order = AdmissionOrder(config.admission_order)
        self.mean_batch_time_s = 0.0
        self.num_batches = 0
        self.theta = config.theta_low if config.dynamic_theta else config.theta_fixed
        self._offset_s = 0.0

    def schedule(self, state: EngineState) -> BatchPlan:
        cfg = self.config
        now = state.now_s
        b = PlanBuilder(state, self.token_budget_for(state), cfg.max_active_requests, cfg.max_decodes)
        critical: list[Request] = []
        non_critical: list[Request] = []
        prefilling: list[Request] = []
        if self.decodes_all_critical(state):
            now = INF
        add_prefilling, add_critical, add_non_critical = prefilling.append, critical.append, non_critical.append
        for r in state.running:  # inlined Request.is_prefill (hot loop)
            if r.num_output_tokens == 0 or r.prompt_len + r.num_output_tokens - r.num_computed_tokens > 1:
                add_prefilling(r)
            elif now >= r.lst_s:
                add_critical(r)
            else:
                add_non_critical(r)
        victims = list(prefilling)  # started prefills not yet in this batch, newest last

        # 1. critical decodes, earliest LST first
        sort_by_lst(critical)
        if not (
            len(critical) <= min(b.budget_left, cfg.max_decodes)
            and b.add_decodes_if_no_preemption(critical)
        ):
            for r in critical:
                if b.budget_left <= 0 or not b.decode_room:
                    break
                b.add_decode(r, victims)
        b.plan.num_critical_decodes = len(b.plan.decodes)

        # 2 and 3. started prefills, then new ones
        victims = self.schedule_prefills(state, b, victims)

        # 4. non-critical decodes, earliest LST first, in the budget left (sorted only if any fit)
        k = min(len(non_critical), b.budget_left, cfg.max_decodes - len(b.plan.decodes))
        if k > 0:
            sort_by_lst(non_critical)
            if not b.add_decodes_if_no_preemption(non_critical[:k]):
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
        return order_waiting(state, self.order)

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
        self.on_batches_end(state, plan, [batch_start_s], [batch_end_s])

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
