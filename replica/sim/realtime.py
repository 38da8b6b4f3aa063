"""The simulated engine on the wall clock: the serving backend that stands in for a GPU.

`RealtimeSimEngine` runs the same policy object and `SimEngine` mechanics as the virtual-time
benchmarks, but each iteration takes as long as the cost profile says that GPU would take
(times `time_scale`), and tokens stream to their requests as they are produced. SLAI learns from
the measured iteration times, exactly as inside vLLM. There is no model: a token is its index.

Usage (inside an asyncio loop):

    engine = RealtimeSimEngine(make_policy(DEFAULT_SCHEDULER), load_profile(DEFAULT_COST_PROFILE))
    async for n in engine.generate(request):   # a replica.contract.GenerateRequest
        ...   # n = 1, 2, ... as each token is produced
    engine.snapshot("replica-0")   # the feedback snapshot (replica.slo)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from replica.contract import GenerateRequest
from replica.cost.model import CostModel
from replica.policy.base import SchedulingPolicy
from replica.policy.state import Request
from replica.sim.engine import PAPER_KV_BLOCKS, SimEngine
from replica.slo import SLOTracker

_DONE = -1


class RealtimeSimEngine:
    def __init__(
        self,
        policy: SchedulingPolicy,
        cost: CostModel,
        num_kv_blocks: int = PAPER_KV_BLOCKS,
        time_scale: float = 1.0,
        slo: SLOTracker | None = None,
        clock=time.monotonic,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.engine = SimEngine(policy, cost, num_kv_blocks=num_kv_blocks, on_tokens=self._on_tokens)
        self.time_scale = time_scale
        self.slo = slo or SLOTracker({})
        self.clock = clock
        self._streams: dict[str, asyncio.Queue[int]] = {}
        self._requests: dict[str, Request] = {}
        self._in_plan: set[str] = set()
        self._aborts: dict[str, Request] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    # --- requests ----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[int]:
        """Yields 1, 2, ..., max_tokens as the tokens are produced. Cancelling the iteration
        (client gone) aborts the request and frees its KV."""
        request_id = request.request_id
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        self._ensure_loop()
        tier = request.tier
        req = Request(
            req_id=request_id, prompt_len=request.prompt_len, arrival_s=self.clock(), tier=tier.name,
            tbt_slo_s=tier.tbt_slo_s, tier_rank=tier.rank, ttft_target_s=tier.ttft_target_s,
            max_output_tokens=request.max_tokens,
        )
        queue: asyncio.Queue[int] = asyncio.Queue()
        self._streams[request_id] = queue
        self._requests[request_id] = req
        self.engine.add_request(req)
        self._wake.set()
        finished = False
        try:
            while True:
                n = await queue.get()
                if n == _DONE:
                    finished = True
                    return
                yield n
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)
            self._requests.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Drop a request (KV freed); if it is in the iteration running now, after that one."""
        req = self._requests.get(request_id)
        if req is None or req.is_finished:
            return
        if request_id in self._in_plan:
            self._aborts[request_id] = req
        else:
            self.engine.abort(req)

    @property
    def num_unfinished(self) -> int:
        st = self.engine.state
        return len(st.waiting) + len(st.running)

    def num_cached_tokens(self, request_id: str) -> int:
        """The prompt tokens the engine's prefix cache held for a request being generated (its
        policy `Request.num_cached_tokens`, final once it has a token); 0 for an unknown request or
        an engine without a prefix cache."""
        req = self._requests.get(request_id)
        return int(getattr(req, "num_cached_tokens", 0) or 0) if req is not None else 0

    def snapshot(self, replica_id: str) -> dict:
        return self.slo.snapshot(
            replica_id, self.engine.state, self.engine.policy.mean_batch_time_s,
            now=self.clock(), timestamp_s=time.time(),
        )

    def check_health(self) -> None:
        """Raise if the iteration loop died of an exception (its requests would never finish)."""
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")

    # --- the loop --------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        eng = self.engine
        while True:
            if not eng.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            start = self.clock()
            plan = eng.plan(start)
            if plan.is_empty:  # e.g. everything waits for KV held by nothing schedulable yet
                self._wake.clear()
                await asyncio.sleep(0.001)
                continue
            self._in_plan = {r.req_id for r in plan.decodes} | {r.req_id for r, _ in plan.prefills}
            duration_s = eng.begin(plan) * self.time_scale
            await asyncio.sleep(max(0.0, start + duration_s - self.clock()))
            eng.finish(plan, start, self.clock())  # the measured time, as a real engine would
            self._in_plan = set()
            for req in self._aborts.values():
                if not req.is_finished:
                    eng.abort(req)
            self._aborts.clear()

    def _on_tokens(self, emitted: list[Request], t: float) -> None:
        self.slo.on_tokens(emitted, t)  # arrival and token times are all on self.clock
        for r in emitted:
            q = self._streams.get(r.req_id)
            if q is None or r.req_id in self._aborts:
                continue
            q.put_nowait(r.num_output_tokens + 1)
            if r.num_output_tokens + 1 >= r.max_output_tokens:  # type: ignore[operator]
                q.put_nowait(_DONE)
