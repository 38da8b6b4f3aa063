"""What every scheduling policy shares: the contract, admission orders, and the plan builder.

A policy decides, a mechanism executes.  The mechanisms are the simulated engine
(`replica.sim.engine.SimEngine`, in virtual or wall-clock time) and the vLLM scheduler adapter
(`replica.vllm_scheduler`); both drive the same policy objects through `SchedulingPolicy`, whose
docstrings are the contract.  A new policy is one module with a `SchedulingPolicy` subclass plus
one line in `replica.policy.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import MutableSequence, Sequence
from enum import Enum

from mypy_extensions import mypyc_attr

from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState, Request


class AdmissionOrder(str, Enum):
    FCFS = "fcfs"  # arrival order
    SPF = "spf"  # shortest prompt first (uncached prompt tokens, under prefix caching)
    SPF_TIER = "spf-tier"  # strict tiers first (lower rank), then shortest prompt


def _spf_key(r: Request) -> int:
    return r.prompt_len - r.num_cached_tokens  # the prompt tokens left to compute


def _spf_tier_key(r: Request) -> tuple[int, int]:
    return (r.tier_rank, r.prompt_len - r.num_cached_tokens)


WAITING_KEYS = {AdmissionOrder.FCFS: None, AdmissionOrder.SPF: _spf_key, AdmissionOrder.SPF_TIER: _spf_tier_key}


def split_prefills(reqs: Sequence[Request]) -> tuple[list[Request], list[Request]]:
    """`reqs` split into (prefills, decodes) by `Request.is_prefill`, each in the given order
    (one pass, the property inlined: the policies call this every iteration on every running
    request)."""
    prefills: list[Request] = []
    decodes: list[Request] = []
    for r in reqs:
        if r.num_output_tokens == 0 or r.prompt_len + r.num_output_tokens - r.num_computed_tokens > 1:
            prefills.append(r)
        else:
            decodes.append(r)
    return prefills, decodes


def order_waiting(state: EngineState, order: AdmissionOrder) -> Sequence[Request]:
    """The waiting queue in admission order. Sorts are stable, so ties keep queue order (where
    preempted requests are in front). A mechanism that keeps `state.waiting` sorted by this
    order says so in `state.waiting_sorted_by`, and the list is used as it is."""
    key = WAITING_KEYS[order]
    if key is None or state.waiting_sorted_by == order.value:
        return state.waiting
    return sorted(state.waiting, key=key)


@mypyc_attr(allow_interpreted_subclasses=True)  # a policy may live outside replica.native.MODULES
class SchedulingPolicy(ABC):
    """One engine's scheduling policy: every iteration it turns the engine state into a plan, and
    after the iteration it learns what the iteration measured.  One object per engine (it may keep
    per-engine state: measured batch times, deadlines).

    The mechanism's loop, one call pair per iteration:

        plan = policy.schedule(state)          # decide
        ... execute `plan`: KV blocks, preemption, admissions ...
        plan.record_shape()                    # the shape it runs with (`plan.ran_shape`)
        ... prefill progress, token emission ...
        policy.on_batch_end(state, plan, batch_start_s, batch_end_s)      # learn

    or, when the mechanism fast-forwards a decode stretch (the same all-decode plan run k times
    back to back, nothing waiting: `SimEngine.step`), one call for the k iterations:

        policy.on_batches_end(state, plan, starts_s, ends_s)

    which must leave the policy exactly as k `on_batch_end` calls would.

    Attributes the mechanisms read:

    * ``name``: the preset name (logs, reports).
    * ``order``: the admission order of the waiting queue (`AdmissionOrder`) if the policy admits
      in a sorted order, else None.  A mechanism may keep ``state.waiting`` sorted by it and say
      so in ``state.waiting_sorted_by`` (`order_waiting` then skips the sort).
    * ``mean_batch_time_s``: the policy's running estimate of an iteration's wall time (0.0 when
      it keeps none); replicas report it in their feedback snapshot.
    """

    name: str
    order: AdmissionOrder | None = None
    mean_batch_time_s: float = 0.0

    @abstractmethod
    def schedule(self, state: EngineState) -> BatchPlan:
        """The plan of the next iteration.  Reads ``state`` (``state.now_s`` is the iteration's
        start on the mechanism's clock) and must not mutate it or its requests.  An empty plan
        means nothing can run now.  Victims in ``plan.preempted`` lose their KV (recompute);
        ``plan.admitted`` come from ``state.waiting`` and get KV for their whole prompt."""

    def on_batch_end(self, state: EngineState, plan: BatchPlan, batch_start_s: float, batch_end_s: float) -> None:
        """After the iteration that ran ``plan``: the mechanism has advanced every request's
        progress and emitted tokens; ``batch_end_s - batch_start_s`` is the measured iteration
        time and ``plan.ran_shape`` the shape it was measured on (``plan.shape()`` now sees the
        advanced contexts).  The only request field a policy may write is its own
        ``Request.lst_s``.  Default: nothing to learn."""

    def on_batches_end(self, state: EngineState, plan: BatchPlan, starts_s: list[float],
                       ends_s: list[float]) -> None:
        """After ``len(ends_s)`` back-to-back iterations of the same all-decode ``plan`` (a decode
        stretch), with ``state`` as it is after the last one; ``plan.ran_shape`` is the first
        iteration's shape (each later one has every decode's context one token longer).
        Default: `on_batch_end` per iteration; a policy that reads ``state`` or ``ran_shape``
        there, or wants speed, overrides this."""
        for start, end in zip(starts_s, ends_s):
            self.on_batch_end(state, plan, start, end)


class PlanBuilder:
    """Builds one BatchPlan under a token budget, an active-request cap, a decode cap and the KV
    blocks left, tracking what the plan frees (preemptions) and reserves (decode slots,
    whole-prompt admissions)."""

    __slots__ = ("kv", "plan", "num_tokens", "token_budget", "max_active", "max_decodes", "free_blocks", "num_active",
                 "prefix")

    def __init__(self, state: EngineState, token_budget: int, max_active: int, max_decodes: int) -> None:
        self.kv = kv = state.kv
        self.plan = BatchPlan()
        self.num_tokens = 0
        self.token_budget = token_budget
        self.max_active = max_active
        self.max_decodes = max_decodes
        self.free_blocks = kv.num_blocks - kv.num_used_blocks  # KVCache.num_free_blocks, inlined
        self.num_active = len(state.running)
        self.prefix = state.prefix

    @property
    def budget_left(self) -> int:
        return self.token_budget - self.num_tokens

    @property
    def decode_room(self) -> bool:
        return len(self.plan.decodes) < self.max_decodes

    def preempt(self, req: Request) -> None:
        self.plan.preempted.append(req)
        self.free_blocks += req.num_blocks if self.prefix is None else self.prefix.blocks_freed_by_preempting(req)
        self.num_active -= 1

    def add_decode(self, req: Request, victims: MutableSequence[Request]) -> bool:
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
        need = self.kv.new_blocks_for_decodes(reqs)
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        self.plan.decodes.extend(reqs)
        self.num_tokens += len(reqs)
        return True

    def add_started_prefill(self, req: Request, max_chunk: int | None = None) -> int:
        """Next chunk of a request that already holds its KV; returns the tokens scheduled."""
        chunk = req.prompt_len + req.num_output_tokens - req.num_computed_tokens  # num_uncomputed_tokens
        left = self.token_budget - self.num_tokens  # budget_left
        if left < chunk:
            chunk = left
        if max_chunk is not None and max_chunk < chunk:
            chunk = max_chunk
        if chunk > 0:
            self.plan.prefills.append((req, chunk))
            self.num_tokens += chunk
            return chunk
        return 0

    def try_admit(self, req: Request, max_chunk: int | None = None) -> bool:
        """Admit a waiting request if the budget, the KV blocks for its whole prompt (watermark
        kept) and the active cap allow; schedules its first chunk.  With a prefix cache the
        request's cached prefix is looked up now: blocks running requests already hold cost no
        free block, and the chunk starts after the cached tokens (the mechanism sets
        ``num_computed_tokens`` to them on admission)."""
        if self.budget_left <= 0 or self.num_active >= self.max_active:
            return False
        cached = shared = 0
        if self.prefix is not None:
            cached, shared = self.prefix.lookup(req)
            if self.plan.preempted:  # a victim may hold those blocks alone: its preemption
                shared = 0  # was credited with them already, so count them as new (conservative)
        if not self.kv.can_admit(self.free_blocks, req.num_tokens, shared):
            return False
        chunk = min(req.num_tokens - cached, self.budget_left)
        if max_chunk is not None:
            chunk = min(chunk, max_chunk)
        if chunk <= 0:
            return False
        self.free_blocks -= self.kv.blocks_for(req.num_tokens) - shared
        self.num_active += 1
        self.plan.prefills.append((req, chunk))
        self.plan.admitted.append(req)
        self.num_tokens += chunk
        return True
