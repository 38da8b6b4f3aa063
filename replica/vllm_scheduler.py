"""vLLM V1 scheduler classes that carry out a pure policy's plan (SLAI and its baselines).

Plug in with `scheduler_cls="replica.vllm_scheduler.SLAIScheduler"` (or `--scheduler-cls`);
`SLAIAsyncScheduler` keeps vLLM's asynchronous scheduling; `SLAIPlusScheduler` /
`SLAIPlusAsyncScheduler` run slai-plus (beyond the paper; vLLM's ``max_num_batched_tokens`` is
then its adaptive budget's ceiling, the base budget stays 512). Other presets:
`PolicyScheduler` / `PolicyAsyncScheduler` run the preset named in the engine config (below; any
name in `replica.policy.available_schedulers()`).

The policy decides, vLLM executes. Every step:
1. vLLM's requests are mirrored into the pure state (`replica.policy.state`): running requests
   in admission order, the waiting queue, and KV blocks from vLLM's block pool: the blocks out of
   its free queue (each counted once, however many requests share it; cached blocks nobody holds
   sit in the free queue and count as free, as in vLLM), plus, for each started prefill, the
   blocks of its whole prompt it has not been given yet (the Sarathi-style reservation the
   policies assume; vLLM allocates chunk by chunk, so its allocations then always succeed);
   a running request's `num_blocks` is its block table (shared blocks included), or its
   whole-prompt reservation while it prefills;
2. the policy returns a BatchPlan;
3. the plan is carried out by vLLM's own machinery: the plan's victims are preempted with
   `_preempt_request` (recompute); this step's `running` list is the plan's decodes then its
   started prefills, in the plan's order (running requests the plan leaves out, i.e. deferred
   decodes, are set aside for this step and put back after it; a plan that runs every running
   request as a decode, in vLLM's running order, the usual decode-only step, leaves vLLM's list
   as it is); the plan's admissions go to the head of the waiting queue;
   `max_num_scheduled_tokens` is the plan's token count; then vLLM's `schedule()` runs
   unchanged: its KV manager allocates, it builds the output.
After the model ran, `update_from_output()` measures the iteration wall time (end of
`schedule()` to the start of `update_from_output()`), updates the mirror, records the tokens in
the SLO tracker and calls the policy's `on_batch_end`.  The running requests' mirrors it synced
are reused by the next step's step 1 (as the list it synced them in when vLLM's running list
is the plan's requests in the plan's order) unless something touched vLLM's running requests in
between (an abort, a prefix-cache reset, another `schedule()`: async scheduling), so a
decode-only step syncs each request once.

One clock: the policy's times (`EngineState.now_s`, the batch start/end times, hence every LST,
and the mirror's `arrival_s`, by which slai-plus ages a waiting request) and the SLO tracker's
token times are `time.perf_counter()`.  vLLM stamps a request's ``arrival_time`` with
`time.time()` (in the front end, possibly another process); `add_request` converts it once:
the mirror's ``arrival_s`` is perf_counter now less the time since that arrival, so a request's
age and its TTFT include what it spent before reaching the scheduler.  The feedback snapshot's
``timestamp_s`` stays wall-clock time (for the routers).

Prefix caching (vLLM's automatic prefix caching, on by default in vLLM): when vLLM's KV manager
caches, `EngineState.prefix` is a `VLLMPrefixView` (the policy's `PrefixCacheView`): vLLM's own
lookup of what a waiting request would hit (read-only: whole blocks, never the last known token;
nothing for a request that skips reading the cache) and the hit blocks' ref counts.  Every
waiting request's `num_cached_tokens` is refreshed by that lookup each step (cost: see
`VLLMPrefixView`); a running request keeps the hit vLLM gave it at admission.  vLLM admits each
of the plan's admissions from exactly the planned hit, so that its first chunk (``num_tokens -
hit`` within the plan's token budget) is the plan's:
* the plan's admissions' cached blocks nobody holds are pinned (`BlockPool.touch`) during
  `schedule()` and released after it (`free_blocks`; an admission holds them by then): the
  blocks vLLM allocates before it reaches the admissions (decodes, started prefills) come from
  the head of its free queue, where the oldest cached blocks sit, and must not evict them;
* vLLM's lookup at admission (`_get_local_prefix_cache_hit`) is cut back to the planned hit when
  it finds more: blocks another admission of the same step has just cached, which the plan did
  not count on.
With prefix caching off (`enable_prefix_caching=False`) `EngineState.prefix` is None and none of
this runs.  The mirror models one KV cache group (full attention, the models served here).

Configuration, in vLLM's own engine config (no environment variables):
``additional_config={"tiered_llm": {...}}`` (``--additional-config`` on vLLM's CLI), all optional:
``scheduler`` (the preset `PolicyScheduler` / `PolicyAsyncScheduler` run; default
slai-spf-dynamic), ``replica_id`` (named in the feedback snapshot), ``tiers`` (a list of
``{"name", "tbt_slo_s", "ttft_target_s", "rank"}``; default the paper's premium/free), and
``default_tier`` (the tier of a request that names none; default the most lenient).
`replica_engine_config` builds it.

Per-request metadata comes in `SamplingParams.extra_args` (`vllm_xargs` over vLLM's HTTP API):
`replica.contract.TierFacts.to_extra_args()` (this app's ingress sends the whole tier:
``tier``, ``tbt_slo_s``, ``ttft_target_s``, ``tier_rank``), or just ``{"tier": NAME}`` (and
optionally ``tbt_slo_s``) for a tier of the configured ones.  A missing tier is the default tier;
an unknown tier or a bad value finishes that request at once (finish reason "abort", the reason in
`stop_reason`, a log line); the engine loop and the other requests go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request as VRequest
from vllm.v1.request import RequestStatus

from replica.contract import TierFacts, TierMetadataError
from replica.policy import (DEFAULT_SCHEDULER, BatchPlan, EngineLimits, EngineState, KVCache, Request, SchedulingPolicy,
                            make_policy)
from replica.policy.state import PrefixHit
from replica.slo import SLOTracker
from replica.tiers import paper_tiers

logger = logging.getLogger(__name__)

KV_WATERMARK = 0.01
REPLICA_CONFIG_KEY = "tiered_llm"  # our section of vLLM's additional_config
FEEDBACK_UTILITY = "replica_feedback_snapshot"  # the EngineCore utility method `_install_feedback_utility` adds


def replica_engine_config(*, scheduler: str | None = None, replica_id: str | None = None,
                          tiers: Sequence[TierFacts] = (), default_tier: str | None = None) -> dict[str, Any]:
    """Our section of vLLM's ``additional_config`` (JSON-ready; None values left out)."""
    out: dict[str, Any] = {"scheduler": scheduler, "replica_id": replica_id, "default_tier": default_tier}
    if tiers:
        out["tiers"] = [{"name": t.name, "tbt_slo_s": t.tbt_slo_s, "ttft_target_s": t.ttft_target_s,
                         "rank": t.rank} for t in tiers]
    return {k: v for k, v in out.items() if v is not None}


def _replica_settings(vllm_config: Any) -> tuple[str | None, str | None, dict[str, TierFacts], str | None]:
    """(scheduler, replica_id, tiers by name, default tier) from ``additional_config``; ValueError
    naming the setting when it is malformed."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    ours = additional.get(REPLICA_CONFIG_KEY, {}) if isinstance(additional, dict) else {}
    if not isinstance(ours, dict):
        raise ValueError(f"additional_config[{REPLICA_CONFIG_KEY!r}] must be a mapping, got {ours!r}")
    unknown = sorted(set(ours) - {"scheduler", "replica_id", "tiers", "default_tier"})
    if unknown:
        raise ValueError(f"additional_config[{REPLICA_CONFIG_KEY!r}]: unknown setting(s) {', '.join(unknown)}")
    tiers_in = ours.get("tiers")
    if tiers_in is None:
        tiers = [t.facts() for t in paper_tiers().tiers]
    else:
        try:
            tiers = [TierFacts(**t) for t in tiers_in]
        except (TypeError, ValueError) as e:
            raise ValueError(f"additional_config[{REPLICA_CONFIG_KEY!r}].tiers: {e}") from None
    by_name = {t.name: t for t in tiers}
    default = ours.get("default_tier")
    if default is not None and default not in by_name:
        raise ValueError(f"additional_config[{REPLICA_CONFIG_KEY!r}].default_tier {default!r} is not one of the "
                         f"tiers ({', '.join(by_name)})")
    return ours.get("scheduler"), ours.get("replica_id"), by_name, default


@dataclass
class StepRecord:
    """One step as planned and as executed (kept for conformance checks and benchmarks);
    `kv_used`: the KV blocks the policy saw in use (`KVCache.num_used_blocks`)."""

    planned: dict
    executed: dict[str, int]
    schedule_s: float
    kv_used: int = 0
    # the requests vLLM preempted in this step (`SchedulerOutput.preempted_req_ids`: the plan's
    # victims, and any request vLLM's own `schedule()` preempted)
    preempted: list[str] = field(default_factory=list)
    # the running decodes the policy saw (one uncomputed token, a token out): the plan runs,
    # preempts or defers each of them
    running_decodes: list[str] = field(default_factory=list)


class VLLMPrefixView:
    """The policy's `PrefixCacheView` over vLLM's prefix cache (see the module docstring).

    `lookup` runs vLLM's own longest-hit search (`KVCacheCoordinator.find_longest_cache_hit` on
    the request's block hashes, at most ``num_tokens - 1`` tokens, as `get_computed_blocks` does,
    without its event side effect or its stats) and counts the hit blocks running requests hold
    (``ref_cnt > 0``).  Nothing in vLLM changes.  Hits are memoised for one step (`new_step`): the
    mirror's refresh and the plan builder's admission check share one search.  The cost: one
    hash-map probe per hit block plus one, per waiting request and step (measured on a 2-core CPU
    host: about 6 us for a request with a 5-block hit, so about 0.6 ms a step with 100 waiting).

    `blocks_freed_by_preempting` also notes the victim (the plan builder calls it exactly when it
    preempts), so that within the plan being built, blocks several victims share count as freed
    by the last of them, and a later admission's hit blocks held only by victims count as free
    blocks it takes (their ref counts drop to 0 when the victims go), as vLLM will see it.
    """

    __slots__ = ("_sched", "_hits", "_victim_refs", "_victims")

    def __init__(self, scheduler: PolicySchedulerMixin) -> None:
        self._sched = scheduler
        self._hits: dict[str, tuple[int, Sequence[Any]]] = {}
        self._victim_refs: dict[int, int] = {}
        self._victims: dict[str, int] = {}

    def new_step(self) -> None:
        self._hits.clear()
        self._victim_refs.clear()
        self._victims.clear()

    def hit(self, req_id: str) -> tuple[int, Sequence[Any]]:
        """(cached tokens, the hit's blocks of the first KV cache group) for a waiting request."""
        got = self._hits.get(req_id)
        if got is None:
            sched = self._sched
            vreq = sched.requests[req_id]
            mgr = sched.kv_cache_manager
            if vreq.num_computed_tokens or not mgr.prefix_cache_lookup_enabled(vreq):
                got = (0, ())  # vLLM looks up only a request holding no KV, and only if it may read the cache
            else:
                groups, n, _ = mgr.coordinator.find_longest_cache_hit(vreq.block_hashes, vreq.num_tokens - 1)
                got = (n, groups[0] if groups else ())
            self._hits[req_id] = got
        return got

    def lookup(self, req: Request) -> PrefixHit:
        n, blocks = self.hit(req.req_id)
        vr = self._victim_refs
        if vr:
            in_use = sum(1 for b in blocks if b.ref_cnt - vr.get(b.block_id, 0) > 0)
        else:
            in_use = sum(1 for b in blocks if b.ref_cnt > 0)
        return PrefixHit(n, in_use)

    def blocks_freed_by_preempting(self, req: Request) -> int:
        done = self._victims.get(req.req_id)
        if done is not None:
            return done
        table = self._sched._block_table(req.req_id)
        vr = self._victim_refs
        freed = 0
        for b in table:
            if b.is_null:
                continue
            others = vr.get(b.block_id, 0)
            if b.ref_cnt - others == 1:
                freed += 1
            vr[b.block_id] = others + 1
        freed += max(0, req.num_blocks - len(table))  # a started prefill's reservation
        self._victims[req.req_id] = freed
        return freed


class PolicySchedulerMixin:
    """Carries out `self.policy`'s plans inside a vLLM V1 scheduler (see the module docstring)."""

    preset: str | None = None  # None: additional_config's "scheduler" (default slai-spf-dynamic)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        scheduler, replica_id, self.tiers, default_tier = _replica_settings(self.vllm_config)
        if self.preset is not None and scheduler is not None and scheduler != self.preset:
            raise ValueError(f"{type(self).__name__} runs {self.preset}, but additional_config asks for "
                             f"{scheduler}: use replica.vllm_scheduler.PolicyScheduler (or PolicyAsyncScheduler) "
                             "to pick the preset there")
        name = self.preset or scheduler or DEFAULT_SCHEDULER
        self.default_tier = default_tier or max(self.tiers.values(), key=lambda t: t.rank).name
        self.configured_max_tokens = self.max_num_scheduled_tokens
        # vLLM's max_num_batched_tokens is the most one step may hold (its buffers are sized by
        # it); EngineLimits makes it the budget, or the ceiling of an adaptive one (slai-plus, RAD)
        self.policy: SchedulingPolicy = make_policy(name, engine=EngineLimits(
            max_batch_tokens=self.configured_max_tokens, max_active_requests=self.max_num_active_reqs,
            max_decodes=self.max_num_running_reqs))
        pool = self.kv_cache_manager.block_pool
        self.kv = KVCache(pool.num_gpu_blocks - 1, self.block_size, KV_WATERMARK)  # block 0 is vLLM's null block
        self.prefix_view = VLLMPrefixView(self) if self.kv_cache_manager.enable_caching else None
        self._planned_hits: dict[str, int] = {}  # the hit each admission of the step in progress was planned with
        self.num_hits_cut = 0  # admissions whose vLLM lookup found more than planned (cut back to the plan)
        self.mirrors: dict[str, Request] = {}
        # (vLLM's running list, its length, their mirrors, reservations) as `update_from_output`
        # synced them; `mirror_state` reuses them while nothing has touched running requests since
        self._fresh: tuple[list[VRequest], int, list[Request], int] | None = None
        self.slo = SLOTracker({t.name: t.tbt_slo_s for t in self.tiers.values()},
                              {t.name: t.ttft_target_s for t in self.tiers.values()})
        self.replica_id = replica_id or f"replica-{os.getpid()}"
        self._rejected: list[EngineCoreOutput] = []
        self._rejected_clients: list[int] = []
        self._in_flight: deque[tuple[BatchPlan, float]] = deque()
        # the state `on_batch_end` gets: the KV cache and the iteration's end (nothing waiting or
        # running: a policy learns from the plan; policies never mutate a state they are given)
        self._end_state = EngineState(now_s=0.0, kv=self.kv)
        self.step_log: deque[StepRecord] = deque(maxlen=int(os.environ.get("REPLICA_STEP_LOG", "0")) or None)
        self.record_steps = bool(os.environ.get("REPLICA_STEP_LOG"))
        logger.info("vLLM scheduler %s runs policy %s", type(self).__name__, name)

    # --- requests in -------------------------------------------------------------------------
    def add_request(self, request: VRequest) -> None:
        super().add_request(request)
        sp = request.sampling_params
        try:
            tier = TierFacts.from_extra_args(sp.extra_args if sp is not None else None, self.tiers,
                                             self.default_tier)
        except TierMetadataError as e:
            # finish it (freeing nothing: it never ran) and tell its client in the next output
            logger.warning("request %s rejected: %s", request.request_id, e)
            self.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
            self._rejected.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ABORT,
                    stop_reason=f"rejected: {e}",
                )
            )
            self._rejected_clients.append(request.client_index)
            return
        self.mirrors[request.request_id] = Request(
            req_id=request.request_id,
            prompt_len=request.num_prompt_tokens,
            arrival_s=self._arrival_on_policy_clock(request.arrival_time),
            tier=tier.name,
            tbt_slo_s=tier.tbt_slo_s,
            tier_rank=tier.rank,
            ttft_target_s=tier.ttft_target_s,
        )

    def finish_requests(self, request_ids, finished_status):
        self._fresh = None  # may take requests out of `running` and free their blocks
        return super().finish_requests(request_ids, finished_status)

    def reset_prefix_cache(self, *args, **kwargs):
        self._fresh = None  # may preempt every running request
        return super().reset_prefix_cache(*args, **kwargs)

    @staticmethod
    def _arrival_on_policy_clock(arrival_time: float) -> float:
        """vLLM's ``arrival_time`` (`time.time()`) on the policy's clock (`time.perf_counter()`):
        now less the time since the arrival (never after now)."""
        return time.perf_counter() - max(0.0, time.time() - arrival_time)

    # --- the mirror ----------------------------------------------------------------------------
    def _sync(self, vreq: VRequest) -> Request:
        m = self.mirrors[vreq.request_id]
        # tokens in flight (async scheduling) count as produced: vLLM schedules past them
        m.num_output_tokens = vreq.num_output_tokens + vreq.num_output_placeholders
        m.num_computed_tokens = vreq.num_computed_tokens
        return m

    def _block_table(self, req_id: str) -> Sequence[Any]:
        """The request's blocks in vLLM (first KV cache group; shared blocks included)."""
        return self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(req_id, ())

    def _sync_running(self, vreq: VRequest) -> tuple[Request, int]:
        """Sync a running request's mirror, set its `num_blocks` (block table, or whole-prompt
        reservation while it prefills); returns it and its reservation beyond the table."""
        m = self._sync(vreq)
        held = len(self._block_table(vreq.request_id))
        reserved = 0
        if m.is_prefill:
            reserved = max(0, self.kv.blocks_for(m.num_tokens) - held)
        m.num_blocks = held + reserved
        return m, reserved

    def _kv_used(self, reserved: int) -> KVCache:
        """The mirror's KV cache with ``reserved`` blocks (started prefills' reservations) on top
        of the blocks out of vLLM's free queue (block 0 is vLLM's null block; the queue's count is
        `BlockPool.get_num_free_blocks` without the call)."""
        pool = self.kv_cache_manager.block_pool
        kv = self.kv
        kv.num_used_blocks = min(kv.num_blocks, pool.num_gpu_blocks - 1 - pool.free_block_queue.num_free_blocks + reserved)
        return kv

    def _sync_all_running(self) -> tuple[list[Request], int]:
        """`_sync_running` for every running request, inlined (the per-step hot loop): returns
        their mirrors in `self.running`'s order and the started prefills' reservations."""
        mirrors = self.mirrors
        tables = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        bs = self.kv.block_size
        running = []
        reserved = 0
        for vreq in self.running:
            rid = vreq.request_id
            m = mirrors[rid]
            # tokens in flight (async scheduling) count as produced: vLLM schedules past them
            # (`len(_output_token_ids)` is vLLM's `num_output_tokens` without the property call)
            num_output = m.num_output_tokens = len(vreq._output_token_ids) + vreq.num_output_placeholders
            computed = m.num_computed_tokens = vreq.num_computed_tokens
            held = len(tables.get(rid, ()))
            num_tokens = m.prompt_len + num_output
            if num_output == 0 or num_tokens - computed > 1:  # Request.is_prefill: reserve the whole prompt
                r = -(-num_tokens // bs) - held
                if r > 0:
                    reserved += r
                    held += r
            m.num_blocks = held
            running.append(m)
        return running, reserved

    def _sync_ran(self, plan: BatchPlan) -> tuple[list[Request], int, list[Request], list[VRequest]]:
        """After `plan` ran: sync the mirrors of its requests (`_sync_running`, inlined for those
        still running; a finished one is marked finished, holding no blocks).  Returns those that
        emitted a token, the reservations of those still running, and those still running (their
        mirrors and vLLM's requests, in the plan's order)."""
        requests = self.requests
        tables = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        bs = self.kv.block_size
        running_status = RequestStatus.RUNNING
        emitted = []
        still: list[Request] = []
        still_v: list[VRequest] = []
        reserved = 0
        for m in (plan.decodes if not plan.prefills else [*plan.decodes, *(m for m, _ in plan.prefills)]):
            before = m.num_output_tokens
            rid = m.req_id
            vreq = requests.get(rid)
            if vreq is not None and vreq.status is running_status:
                still.append(m)
                still_v.append(vreq)
                num_output = m.num_output_tokens = len(vreq._output_token_ids) + vreq.num_output_placeholders
                computed = m.num_computed_tokens = vreq.num_computed_tokens
                held = len(tables.get(rid, ()))
                num_tokens = m.prompt_len + num_output
                if num_output == 0 or num_tokens - computed > 1:  # still a prefill: its reservation
                    r = -(-num_tokens // bs) - held
                    if r > 0:
                        reserved += r
                        held += r
                m.num_blocks = held
                if num_output > before:
                    emitted.append(m)
                continue
            if vreq is None or vreq.is_finished():
                m.is_finished = True
                m.num_blocks = 0
                m.num_output_tokens = before + 1 if vreq is None else vreq.num_output_tokens
            else:  # out of the running requests, not finished
                self._sync_running(vreq)
            if m.num_output_tokens > before:
                emitted.append(m)
        return emitted, reserved, still, still_v

    def mirror_state(self, now_s: float) -> EngineState:
        view = self.prefix_view
        # the running requests' mirrors and reservations: those `update_from_output` synced if
        # nothing has touched vLLM's running requests since (`_fresh`), else synced now
        fresh = self._fresh
        if fresh is not None and fresh[0] is self.running and fresh[1] == len(self.running):
            running, reserved = fresh[2], fresh[3]
        else:
            running, reserved = self._sync_all_running()
        waiting = []
        if view is not None:
            view.new_step()
        if len(self.requests) != len(self.running):  # else every request vLLM holds runs: none waits
            for vreq in self.waiting:
                m = self._sync(vreq)
                m.num_blocks = 0
                if view is not None:
                    m.num_cached_tokens = view.hit(vreq.request_id)[0]
                waiting.append(m)
        return EngineState(now_s=now_s, kv=self._kv_used(reserved), waiting=waiting, running=running, prefix=view)

    # --- one step --------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        t0 = time.perf_counter()
        state = self.mirror_state(t0)
        self._fresh = None  # this step changes the running requests
        kv_used = state.kv.num_used_blocks
        running_decodes = [m.req_id for m in state.running if not m.is_prefill] if self.record_steps else []
        plan = self.policy.schedule(state)
        req = self.requests
        decodes, prefills, admitted = plan.decodes, plan.prefills, plan.admitted
        if plan.preempted:
            for m in plan.preempted:
                vreq = req[m.req_id]
                self.running.remove(vreq)
                self._preempt_request(vreq, time.monotonic())
        elif not prefills and decodes == state.running:
            # every running request decodes, in vLLM's running order (the mirrors' order; a
            # Request compares by identity): vLLM's running list is this step's as it is
            step_running = self.running
            set_aside = ()
            decodes = None
        if decodes is not None:
            step_running = [req[m.req_id] for m in decodes]
            if admitted:
                admitted_ids = {m.req_id for m in admitted}
                step_running += [req[m.req_id] for m, _ in prefills if m.req_id not in admitted_ids]
            elif prefills:
                step_running += [req[m.req_id] for m, _ in prefills]
            chosen = set(step_running)  # vLLM's requests hash by identity
            set_aside = [v for v in self.running if v not in chosen]
        if admitted:
            for m in reversed(admitted):
                vreq = req[m.req_id]
                self.waiting.remove_request(vreq)
                self.waiting.prepend_request(vreq)
        pinned = self._pin_planned_hits(plan) if admitted and self.prefix_view is not None else []
        self.running = step_running
        # plan.num_tokens, without its two property calls on a decode-only plan
        num_tokens = len(plan.decodes) + (plan.num_prefill_tokens if prefills else 0)
        self.max_num_scheduled_tokens = min(num_tokens, self.configured_max_tokens)
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            if set_aside:
                self.running.extend(v for v in set_aside if not v.is_finished())
            self.max_num_scheduled_tokens = self.configured_max_tokens
            if self._planned_hits:
                self._planned_hits.clear()
            if pinned:
                self.kv_cache_manager.block_pool.free_blocks(pinned)
        plan.record_shape()  # mirrors not yet synced: the contexts this step runs with (admissions: vLLM's hit)
        end = time.perf_counter()
        if self.record_steps:
            self.step_log.append(StepRecord(plan.summary(), dict(out.num_scheduled_tokens), end - t0, kv_used,
                                            sorted(out.preempted_req_ids or ()), running_decodes))
        self._in_flight.append((plan, end))
        return out

    def _pin_planned_hits(self, plan: BatchPlan) -> list:
        """Note each admission's planned hit (for `_get_local_prefix_cache_hit`) and pin its cached
        blocks nobody holds (after the plan's preemptions), so that the allocations vLLM makes
        before it reaches the admissions cannot evict them.  Returns the pinned blocks, in the
        order to release them (tail blocks first, as vLLM frees a request's blocks)."""
        view = self.prefix_view
        pinned = []
        seen = set()
        for m in plan.admitted:
            n, blocks = view.hit(m.req_id)
            self._planned_hits[m.req_id] = n
            for b in reversed(blocks):
                if b.ref_cnt == 0 and b.block_id not in seen:
                    seen.add(b.block_id)
                    pinned.append(b)
        if pinned:
            self.kv_cache_manager.block_pool.touch(pinned)
        return pinned

    def _get_local_prefix_cache_hit(self, request: VRequest):
        """vLLM's lookup at admission, cut back to the hit the plan counted on (see the module
        docstring); the admitted request's mirror keeps that hit as its `num_cached_tokens`."""
        blocks, num_local, *rest = super()._get_local_prefix_cache_hit(request)
        planned = self._planned_hits.get(request.request_id)
        if planned is not None:
            if num_local > planned:
                blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, planned)
                num_local = planned
                self.num_hits_cut += 1
            elif num_local < planned:
                logger.warning("request %s: vLLM's prefix-cache hit %d < the planned %d", request.request_id,
                               num_local, planned)
            m = self.mirrors.get(request.request_id)
            if m is not None:
                m.num_cached_tokens = num_local
        return (blocks, num_local, *rest)

    def update_from_output(self, scheduler_output, model_runner_output):
        start_s = time.perf_counter()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        vrunning = self.running
        plan = None
        if self._in_flight:
            plan, schedule_end_s = self._in_flight.popleft()
            now = time.perf_counter()  # the token time, on the policy's clock (the mirror's arrival_s)
            emitted, reserved, still, still_v = self._sync_ran(plan)
        # every running request's mirror is now synced, kept for the next step's `mirror_state`
        # (`_fresh`): the plan's (as they are if vLLM's running list is the plan's requests in the
        # plan's order), or, if some running request did not run, all of them again
        if plan is not None and len(still) == len(vrunning):
            if still_v == vrunning:  # identity: vLLM's requests define no equality
                running = still
            else:
                mirrors = self.mirrors
                running = [mirrors[v.request_id] for v in vrunning]
        else:
            running, reserved = self._sync_all_running()
        self._fresh = (vrunning, len(vrunning), running, reserved)
        if plan is not None:
            self.slo.record_tokens(emitted, now)  # also stamps their last (and first) token times
            if plan.decodes or plan.prefills:  # not `plan.is_empty`
                self._kv_used(reserved)
                state = self._end_state  # EngineState(now_s=start_s, kv=kv), one object for every step
                state.now_s = start_s
                self.policy.on_batch_end(state, plan, schedule_end_s, start_s)
        if len(self.mirrors) > len(self.requests):  # some request has left vLLM: forget its mirror
            for rid in [rid for rid in self.mirrors if rid not in self.requests]:
                del self.mirrors[rid]
        if self._rejected:
            for out, client in zip(self._rejected, self._rejected_clients):
                if client in outputs:
                    outputs[client].outputs.append(out)
                else:
                    outputs[client] = EngineCoreOutputs(outputs=[out])
            self._rejected.clear()
            self._rejected_clients.clear()
        return outputs

    def feedback_snapshot(self) -> dict:
        """The replica's feedback snapshot (`replica.slo`): queue, decodes per tier, KV use,
        mean batch time, per-tier TTFT/TBT over the last minute."""
        now = time.perf_counter()
        state = self.mirror_state(now)
        state.kv = self._kv_now()
        # the tracker's window ends now on its clock (the policy's); the timestamp is wall-clock
        return self.slo.snapshot(self.replica_id, state, self.policy.mean_batch_time_s, now=now,
                                 timestamp_s=time.time())

    def _kv_now(self) -> KVCache:
        """The KV cache now: blocks out of vLLM's free queue plus started prefills' reservations."""
        reserved = sum(self._sync_running(v)[1] for v in self.running if v.request_id in self.mirrors)
        return self._kv_used(reserved)


def _install_feedback_utility() -> None:
    """Give vLLM's EngineCore a utility method ``replica_feedback_snapshot`` (AsyncLLM reaches it
    with ``engine_core.call_utility_async``): the scheduler's feedback snapshot, out of the
    engine-core process.  Only adds a method; nothing of vLLM's changes.  Runs when this module
    is imported, which the engine core does to resolve ``scheduler_cls``."""
    from vllm.v1.engine.core import EngineCore

    if hasattr(EngineCore, FEEDBACK_UTILITY):
        return

    def replica_feedback_snapshot(self) -> dict | None:
        scheduler = self.scheduler
        return scheduler.feedback_snapshot() if isinstance(scheduler, PolicySchedulerMixin) else None

    setattr(EngineCore, FEEDBACK_UTILITY, replica_feedback_snapshot)


_install_feedback_utility()


def _policy_scheduler(name: str, base: type, preset: str | None) -> type:
    return type(name, (PolicySchedulerMixin, base), {"preset": preset, "__module__": __name__})


SLAIScheduler = _policy_scheduler("SLAIScheduler", Scheduler, DEFAULT_SCHEDULER)
SLAIAsyncScheduler = _policy_scheduler("SLAIAsyncScheduler", AsyncScheduler, DEFAULT_SCHEDULER)
SarathiFCFSScheduler = _policy_scheduler("SarathiFCFSScheduler", Scheduler, "sarathi-fcfs")
SLAIPlusScheduler = _policy_scheduler("SLAIPlusScheduler", Scheduler, "slai-plus")
SLAIPlusAsyncScheduler = _policy_scheduler("SLAIPlusAsyncScheduler", AsyncScheduler, "slai-plus")
PolicyScheduler = _policy_scheduler("PolicyScheduler", Scheduler, None)
PolicyAsyncScheduler = _policy_scheduler("PolicyAsyncScheduler", AsyncScheduler, None)
