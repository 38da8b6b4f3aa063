"""vLLM-style (vLLM v0's default): whole prompts first, and an iteration with a prefill has no decodes.

If waiting prompts can be admitted (FCFS; whole prompt within `max_prefill_tokens` per iteration,
KV for the whole prompt with the watermark, active cap), the iteration prefills them and nothing
else. Otherwise every running decode runs; when a decode's KV block does not fit, the
latest-arrived running request not yet taken is preempted, else the decode itself.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from replica.policy.base import PlanBuilder, SchedulingPolicy, split_prefills
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState

_arrival = attrgetter("arrival_s")


class VLLMStylePolicy(SchedulingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.name = config.name

    def schedule(self, state: EngineState) -> BatchPlan:
        cfg = self.config
        b = PlanBuilder(state, cfg.max_prefill_tokens, cfg.max_active_requests, cfg.max_decodes)
        for r in state.waiting:
            if r.num_tokens > b.budget_left or not b.try_admit(r):
                break
        if b.plan.prefills:
            return b.plan
        by_arrival = sorted(state.running, key=_arrival)
        started, decodes = split_prefills(by_arrival)
        if not started and b.add_decodes_if_no_preemption(decodes):  # every decode, no preemption
            return b.plan
        queue = deque(by_arrival)
        while queue:
            r = queue.popleft()
            if r.is_prefill:  # cannot happen with whole-prompt prefills; kept for recompute safety
                b.add_started_prefill(r)
            else:
                b.add_decode(r, queue)
        return b.plan

