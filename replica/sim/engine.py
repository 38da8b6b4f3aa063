"""The simulated engine: executes a policy's plans against a GPU cost profile.

It is the mechanism twin of the vLLM adapter: the same policy object decides, this class does
what vLLM's KV manager and model runner would (reserve and free KV blocks, preempt by
recompute, advance prefills, emit tokens), and the cost profile says how long the iteration
took. The clock is the caller's: `loadtest.simulate` drives it in virtual time; the serving
backend drives it in real time.

With ``prefix_caching=True`` its KV blocks live in a `PrefixBlockPool` (vLLM's block pool with
automatic prefix caching: shared, reference-counted blocks, LRU eviction of cached free blocks),
which is also the policy's `EngineState.prefix`.  A request's cached prefix is looked up when it
arrives or is preempted (its `num_cached_tokens`, the key of shortest-prompt-first order; the
waiting queue is kept sorted by it, so an estimate is not refreshed while the request waits) and
again when the policy admits it (`PlanBuilder.try_admit`), which is what the admission uses.
Without it (the default) KV blocks are counted per request, as before.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from operator import attrgetter, sub

from mypy_extensions import mypyc_attr

from replica.cost.model import CostModel
from replica.policy.base import WAITING_KEYS, SchedulingPolicy
from replica.policy.plan import BatchPlan
from replica.policy.state import EngineState, KVCache, Request
from replica.sim.prefix_cache import PrefixBlockPool

# docs/paper.md: 14,733 KV blocks of 16 tokens on the RTX 6000 Ada with Mistral-7B, 1 % watermark.
PAPER_KV_BLOCKS = 14_733

_max_output_tokens = attrgetter("max_output_tokens")
_num_output_tokens = attrgetter("num_output_tokens")


@mypyc_attr(native_class=False)  # an exception class (compiled builds: replica.native)
class SchedulerStalled(RuntimeError):
    """The policy returned an empty plan although requests are waiting and nothing runs."""


# Called once per iteration with the requests that emitted a token and the time they did, before
# any of them records it (their `last_token_s` is the previous token's; a decode's progress is not
# yet advanced either). The list may be the plan's own: read it, do not keep or change it.
TokensCallback = Callable[[list[Request], float], None]
# Called once per fast-forwarded decode stretch: the requests (each emitted one token at every
# one of the iteration end times) and those end times.
RepeatedTokensCallback = Callable[[list[Request], list[float]], None]
# Called with each plan the policy makes and the state it made it from, before the engine carries
# it out (a probe's view of the policy's decisions; read them, do not change them).
PlanCallback = Callable[[EngineState, BatchPlan], None]


class SimEngine:
    def __init__(
        self,
        policy: SchedulingPolicy,
        cost: CostModel,
        num_kv_blocks: int = PAPER_KV_BLOCKS,
        block_size: int = 16,
        kv_watermark: float = 0.01,
        on_tokens: TokensCallback | None = None,
        on_finish: Callable[[Request], None] | None = None,
        on_repeated_tokens: RepeatedTokensCallback | None = None,
        prefix_caching: bool = False,
        on_plan: PlanCallback | None = None,
    ) -> None:
        self.policy = policy
        self.on_plan = on_plan
        self.cost = cost
        self.state = EngineState(now_s=0.0, kv=KVCache(num_kv_blocks, block_size, kv_watermark))
        self.on_tokens = on_tokens
        self.on_finish = on_finish
        self.on_repeated_tokens = on_repeated_tokens
        self.pool = PrefixBlockPool(self.state.kv) if prefix_caching else None
        self.state.prefix = self.pool
        # Keep the waiting queue in the policy's admission order (if it sorts), so the policy
        # does not re-sort a long queue every iteration.
        order = policy.order
        self._waiting_key = WAITING_KEYS.get(order) if order is not None else None
        if self._waiting_key is not None and order is not None:
            self.state.waiting_sorted_by = order.value
        # A policy that keeps SchedulingPolicy's no-op on_batch_end and on_batches_end learns
        # nothing from iterations: they are not called (Sarathi, vLLM-style and RAD do not learn).
        self._learns = any(getattr(type(policy), name) is not getattr(SchedulingPolicy, name)
                           for name in ("on_batch_end", "on_batches_end"))
        self.num_iterations = 0
        self.num_preemptions = 0
        self.busy_s = 0.0
        # What the engine spends beside the batch shape (`CostProfile.overheads`; None for GPU
        # profiles): it needs the requests taken in since the last iteration and when the last
        # iteration ended (the idle time before the next one).
        self._overheads = getattr(cost, "overheads", None)
        self._num_taken_in = 0
        self._last_end_s = 0.0
        self._wake_tail_s = 0.0  # what the next iteration pays of the last wake's tail

    @property
    def has_work(self) -> bool:
        return bool(self.state.waiting or self.state.running)

    def add_request(self, req: Request) -> None:
        """Enqueue an arrived request (its `max_output_tokens` must be set: when to stop)."""
        if req.max_output_tokens is None or req.max_output_tokens < 1:
            raise ValueError(f"request {req.req_id}: max_output_tokens must be >= 1")
        self._num_taken_in += 1
        if self.pool is not None:
            req.num_cached_tokens = self.pool.lookup(req).num_cached_tokens
        if self._waiting_key is None:
            self.state.waiting.append(req)
        else:
            bisect.insort_right(self.state.waiting, req, key=self._waiting_key)

    def abort(self, req: Request) -> None:
        """Drop a request wherever it is (client gone); frees its KV."""
        st = self.state
        if req in st.running:
            st.running.remove(req)
            self._free(req)
        elif req in st.waiting:
            st.waiting.remove(req)
        req.is_finished = True

    def plan(self, now_s: float) -> BatchPlan:
        st = self.state
        st.now_s = now_s
        plan = self.policy.schedule(st)
        if self.on_plan is not None:
            self.on_plan(st, plan)
        if st.waiting and not st.running and plan.is_empty:
            head = st.waiting[0]
            raise SchedulerStalled(
                f"{self.policy.name}: nothing schedulable with {len(self.state.waiting)} waiting "
                f"(head {head.req_id}: {head.num_tokens} tokens, {self.state.kv.num_free_blocks} "
                f"free KV blocks): the request cannot fit this engine"
            )
        return plan

    def begin(self, plan: BatchPlan) -> float:
        """Carry out the plan's KV decisions; returns the iteration time the cost profile gives
        (its batch-shape model, plus its `overheads` where it has them)."""
        st = self.state
        kv = st.kv
        if plan.preempted:
            gone = set(map(id, plan.preempted))
            st.running = [r for r in st.running if id(r) not in gone]
            for r in plan.preempted:  # the last victim ends up first, as in Sarathi/vLLM
                self._free(r)
                r.num_computed_tokens = 0
                r.num_preemptions += 1
                if self.pool is not None:
                    r.num_cached_tokens = self.pool.lookup(r).num_cached_tokens
                if self._waiting_key is None:
                    st.waiting.insert(0, r)
                else:  # in front of its equals, as a stable sort of a front-inserted queue
                    st.waiting.insert(bisect.bisect_left(st.waiting, self._waiting_key(r), key=self._waiting_key), r)
            self.num_preemptions += len(plan.preempted)
        if plan.admitted:
            admitted = plan.admitted
            k = len(admitted)
            if st.waiting[:k] == admitted:  # the usual case: the queue's head, in order (identity)
                del st.waiting[:k]
            else:
                new = set(map(id, admitted))
                st.waiting = [r for r in st.waiting if id(r) not in new]
            for r in admitted:
                if self.pool is None:
                    kv.grow_to(r, r.num_tokens)
                else:  # reuses its cached prefix now: its first chunk starts after it
                    self.pool.admit(r)
                st.running.append(r)
        if plan.decodes:
            bs = kv.block_size
            grow = [r for r in plan.decodes if r.prompt_len + r.num_output_tokens > r.num_blocks * bs]
            if len(grow) > kv.num_free_blocks:  # a decode adds at most one block (its KV covers all but 1 token)
                raise RuntimeError(f"KV cache overflow: decodes need {len(grow)} blocks, {kv.num_free_blocks} free")
            if self.pool is None:
                for r in grow:
                    r.num_blocks += 1
                kv.num_used_blocks += len(grow)
            else:
                for r in grow:
                    self.pool.grow(r, 1)
        shape_s = self.cost.iteration_time_s(plan.record_shape())  # the shape before `finish` advances it
        o = self._overheads
        if o is None:
            return shape_s
        extra_s, tail_s = o.iteration_s(self._num_taken_in, len(plan.prefills), st.now_s - self._last_end_s,
                                        self._wake_tail_s)
        self._num_taken_in = 0
        self._wake_tail_s = tail_s if tail_s > 1e-6 else 0.0  # (under a microsecond: let decodes fast-forward)
        return extra_s + shape_s

    def finish(self, plan: BatchPlan, start_s: float, end_s: float) -> None:
        """Advance progress at the end of the iteration, emit tokens, retire finished requests."""
        st = self.state
        st.now_s = self._last_end_s = end_s
        self.num_iterations += 1
        self.busy_s += end_s - start_s
        decodes = plan.decodes
        emitted: list[Request] = []  # the prefills whose last chunk this was
        pool = self.pool
        for r, n in plan.prefills:
            if pool is not None:
                pool.on_computed(r, r.num_computed_tokens, r.num_computed_tokens + n)
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.prompt_len + r.num_output_tokens:
                emitted.append(r)
                if r.first_token_s is None:
                    r.first_token_s = end_s
        if self.on_tokens is not None:  # sees each request's previous last_token_s
            self.on_tokens(emitted + decodes if emitted else decodes, end_s)
        done: list[Request] = []
        for r in emitted:
            r.last_token_s = end_s
            r.num_output_tokens = n = r.num_output_tokens + 1
            if n >= r.max_output_tokens:  # type: ignore[operator]
                r.is_finished = True
                done.append(r)
        for r in decodes:  # one pass: progress, token, finish
            r.num_computed_tokens += 1
            r.last_token_s = end_s
            r.num_output_tokens = n = r.num_output_tokens + 1
            if n >= r.max_output_tokens:  # type: ignore[operator]
                r.is_finished = True
                done.append(r)
        if done:
            self._retire(done)
        if self._learns:
            self.policy.on_batch_end(st, plan, start_s, end_s)

    def step(self, now_s: float, until_s: float = float("inf")) -> tuple[BatchPlan, float] | None:
        """Plan and execute iterations starting at `now_s` (virtual time). Returns the plan and the
        end time, or None if there is nothing to run.

        Decode stretches are fast-forwarded: when the plan is every running request decoding and
        nothing waits, every policy plans the same batch again until a request finishes, a new
        request arrives (`until_s`: the next arrival) or a decode would need a KV block that is not
        free. Those iterations are then executed at once (same times, same tokens, same policy
        updates: `SchedulingPolicy.on_batches_end`, `CostModel.decode_stretch_ends_s`) instead of
        one by one.  If tokens are observed this needs `on_repeated_tokens`; without it the
        engine steps one iteration at a time."""
        plan = self.plan(now_s)
        if not plan.prefills:
            if not plan.decodes:
                return None
            st = self.state
            if not st.waiting and not plan.preempted and len(plan.decodes) == len(st.running) and self._can_repeat \
                    and not self._wake_tail_s:
                end_s = self._repeat_decodes(plan, now_s, until_s)
                if end_s is not None:
                    return plan, end_s
        end_s = now_s + self.begin(plan)
        self.finish(plan, now_s, end_s)
        return plan, end_s

    @property
    def _can_repeat(self) -> bool:
        return self.on_tokens is None or self.on_repeated_tokens is not None

    def _repeat_decodes(self, plan: BatchPlan, now_s: float, until_s: float) -> float | None:
        # Plain Python loops: a stretch has a few to ~100 requests and is often a few iterations
        # long, where numpy's per-call overhead cost more than the loops.
        reqs = plan.decodes
        k_max = min(map(sub, map(_max_output_tokens, reqs), map(_num_output_tokens, reqs)))
        if k_max < 2:
            return None
        kv = self.state.kv
        bs = kv.block_size

        def extra_blocks(k: int) -> int:  # blocks the k iterations add (iteration j holds T + j - 1)
            extra = 0
            for r in reqs:
                add = -(-(r.prompt_len + r.num_output_tokens + k - 1) // bs) - r.num_blocks
                if add > 0:
                    extra += add
            return extra

        # The iterations until the first that ends at or after the next arrival (`until_s`), at
        # most k_max; then as many of them as the free KV blocks allow, at least 2 (extra_blocks
        # grows with k, so this is the stretch the whole k_max range would give).  A decode's KV
        # holds its computed tokens (all but its last), so k iterations add at most ceil(k / bs)
        # blocks to it: where that bound fits, the blocks are only counted as they are taken.
        ctx = plan.record_shape().sum_decode_ctx  # the stretch's first iteration
        ends = self.cost.decode_stretch_ends_s(len(reqs), ctx, now_s, k_max, until_s)
        k = len(ends)
        free = kv.num_free_blocks
        if len(reqs) * -(-max(k, 2) // bs) > free and extra_blocks(max(k, 2)) > free:
            lo, hi = 0, max(k, 2) - 1  # largest k with extra_blocks(k) <= free
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if extra_blocks(mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            if lo < 2:
                return None
            k = lo
            del ends[k:]
        if self.on_repeated_tokens is not None:
            self.on_repeated_tokens(reqs, ends)  # sees each request's previous last_token_s and progress
        t = ends[-1]
        last = k - 1
        pool = self.pool
        used = 0
        done = []
        for r in reqs:  # one pass: KV blocks, progress, tokens, finish
            add = -(-(r.prompt_len + r.num_output_tokens + last) // bs) - r.num_blocks
            if add > 0:
                if pool is None:
                    r.num_blocks += add
                    used += add
                else:  # blocks of generated tokens carry no hash: allocation order does not matter
                    pool.grow(r, add)
            r.num_computed_tokens += k
            r.last_token_s = t
            r.num_output_tokens = n = r.num_output_tokens + k
            if n >= r.max_output_tokens:  # type: ignore[operator]
                r.is_finished = True
                done.append(r)
        kv.num_used_blocks += used  # (the pool counts its own)
        st = self.state
        st.now_s = self._last_end_s = t
        self.num_iterations += k
        self.busy_s += t - now_s
        if done:
            self._retire(done)
        if self._learns:
            self.policy.on_batches_end(st, plan, [now_s, *ends[:-1]], ends)
        return t

    def _retire(self, done: list[Request]) -> None:
        """Remove finished requests (`done`) from the running ones, free their KV."""
        st = self.state
        st.running = [r for r in st.running if not r.is_finished]  # a running request finishes only here
        for r in done:
            self._free(r)
            if self.on_finish is not None:
                self.on_finish(r)

    def _free(self, req: Request) -> None:
        if self.pool is None:
            self.state.kv.free(req)
        else:
            self.pool.free_request(req)
