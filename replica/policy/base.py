"""What every scheduling policy shares: the contract, admission orders, and the plan builder.

Contract (one call per engine iteration):

    plan = policy.schedule(state)              # decide; must not mutate `state` or its requests
    ... the mechanism executes `plan` (KV, preemption, progress, token emission) ...
    policy.on_batch_end(state, plan, batch_start_s, batch_end_s)
                                               # learn: measured batch time, per-request deadlines

`schedule` only reads request progress; the only request field a policy writes is its own
`Request.lst_s`, in `on_batch_end`. The mechanism is the simulator (replica/sim) or the vLLM
scheduler adapter; both run the same objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState, Request


class AdmissionOrder(str, Enum):
    FCFS = "fcfs"  # arrival order
    SPF = "spf"  # shortest prompt first
    SPF_TIER = "spf-tier"  # strict tiers first (lower rank), then shortest prompt


def _spf_key(r: Request) -> int:
    return r.prompt_len


def _spf_tier_key(r: Request) -> tuple[int, int]:
    return (r.tier_rank, r.prompt_len)


WAITING_KEYS = {AdmissionOrder.FCFS: None, AdmissionOrder.SPF: _spf_key, AdmissionOrder.SPF_TIER: _spf_tier_key}


def order_waiting(state: EngineState, order: AdmissionOrder) -> Sequence[Request]:
    """The waiting queue in admission order. Sorts are stable, so ties keep queue order (where
    preempted requests are in front). A mechanism that keeps `state.waiting` sorted by this
    order says so in `state.waiting_sorted_by`, and the list is used as it is."""
    key = WAITING_KEYS[order]
    if key is None or state.waiting_sorted_by == order.value:
        return state.waiting
    return sorted(state.waiting, key=key)


class SchedulingPolicy(Protocol):
    name: str

    def schedule(self, state: EngineState) -> BatchPlan: ...

    def on_batch_end(
        self, state: EngineState, plan: BatchPlan, batch_start_s: float, batch_end_s: float
    ) -> None: ...


class PlanBuilder:
    """Builds one BatchPlan under a token budget, an active-request cap, a decode cap and the KV
    blocks left, tracking what the plan frees (preemptions) and reserves (decode slots,
    whole-prompt admissions)."""

    __slots__ = ("kv", "plan", "num_tokens", "token_budget", "max_active", "max_decodes", "free_blocks", "num_active")

    def __init__(self, state: EngineState, token_budget: int, max_active: int, max_decodes: int) -> None:
        self.kv = state.kv
        self.plan = BatchPlan()
        self.num_tokens = 0
        self.token_budget = token_budget
        self.max_active = max_active
        self.max_decodes = max_decodes
        self.free_blocks = state.kv.num_free_blocks
        self.num_active = len(state.running)

    @property
    def budget_left(self) -> int:
        return self.token_budget - self.num_tokens

    @property
    def decode_room(self) -> bool:
        return len(self.plan.decodes) < self.max_decodes

    def preempt(self, req: Request) -> None:
        self.plan.preempted.append(req)
        self.free_blocks += req.num_blocks
        self.num_active -= 1

    def add_decode(self, req: Request, victims: list[Request]) -> bool:
        """Schedule one decode token; if its next KV block does not fit, preempt `victims` from the
        end (the lowest priority), and if none is left, preempt `req` itself. True if scheduled."""
        need = self.kv.extra_blocks_for_step(req)
        while need > self.free_blocks:
            if victims:
                self.preempt(victims.pop())
            else:
                self.preempt(req)
                return False
        self.free_blocks -= need
        self.plan.decodes.append(req)
        self.num_tokens += 1
        return True

    def add_decodes_if_no_preemption(self, reqs: list[Request]) -> bool:
        """Fast path: schedule all of `reqs` as decodes if their new KV blocks fit without any
        preemption (the same outcome `add_decode` would reach one by one); else add nothing."""
        bs = self.kv.block_size
        need = 0
        for r in reqs:
            if r.prompt_len + r.num_output_tokens > r.num_blocks * bs:
                need += 1
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        self.plan.decodes.extend(reqs)
        self.num_tokens += len(reqs)
        return True

    def add_started_prefill(self, req: Request, max_chunk: int | None = None) -> int:
        """Next chunk of a request that already holds its KV; returns the tokens scheduled."""
        chunk = min(req.num_uncomputed_tokens, self.budget_left)
        if max_chunk is not None:
            chunk = min(chunk, max_chunk)
        if chunk > 0:
            self.plan.prefills.append((req, chunk))
            self.num_tokens += chunk
        return max(chunk, 0)

    def try_admit(self, req: Request, max_chunk: int | None = None) -> bool:
        """Admit a waiting request if the budget, the KV blocks for its whole prompt (watermark
        kept) and the active cap allow; schedules its first chunk."""
        if self.budget_left <= 0 or self.num_active >= self.max_active:
            return False
        if not self.kv.can_admit(self.free_blocks, req.num_tokens):
            return False
        chunk = min(req.num_tokens, self.budget_left)
        if max_chunk is not None:
            chunk = min(chunk, max_chunk)
        if chunk <= 0:
            return False
        self.free_blocks -= self.kv.blocks_for(req.num_tokens)
        self.num_active += 1
        self.plan.prefills.append((req, chunk))
        self.plan.admitted.append(req)
        self.num_tokens += chunk
        return True
