"""Sarathi-Serve: every running decode in every iteration, chunked prefills under the budget.

Running requests are taken in arrival order (FCFS priority). Decodes first; when a decode's next
KV block does not fit, the lowest-priority (latest-arrived) running request not yet taken is
preempted, else the decode itself. Then started prefills in arrival order, then new prompts from
the waiting queue (FCFS, or shortest prompt first) while budget, KV (whole prompt, watermark) and
the cap on requests in the batch allow.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from mypy_extensions import mypyc_attr

from replica.policy.base import AdmissionOrder, PlanBuilder, SchedulingPolicy, order_waiting, split_prefills
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState


_arrival = attrgetter("arrival_s")


@mypyc_attr(allow_interpreted_subclasses=True)  # variants may live outside replica.native.MODULES
class SarathiPolicy(SchedulingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.name = config.name
        self.order = AdmissionOrder(config.admission_order)

    def schedule(self, state: EngineState) -> BatchPlan:
        cfg = self.config
        b = PlanBuilder(state, cfg.token_budget, cfg.max_active_requests, cfg.max_decodes)
        by_arrival = sorted(state.running, key=_arrival)
        started_prefills, decodes = split_prefills(by_arrival)
        if not b.add_decodes_if_no_preemption(decodes):
            started_prefills = []
            queue = deque(by_arrival)
            while queue:
                r = queue.popleft()
                if r.is_prefill:
                    started_prefills.append(r)
                else:
                    b.add_decode(r, queue)
        for r in started_prefills:
            b.add_started_prefill(r)
        if state.waiting and b.budget_left > 0:
            assert self.order is not None  # set in __init__
            for r in order_waiting(state, self.order):
                if not b.try_admit(r):
                    break
        return b.plan

