"""The simulated engine as a replica backend (`replica.backend.ReplicaBackend`).

The replica's scheduling policy (built by `replica.policy.make_policy` with the cost profile's
GEMM tile, as every engine builds it) runs in `replica.sim.realtime.RealtimeSimEngine`, each
iteration as long as the cost profile says that GPU would take (times ``time_scale``).  Tokens have
no text (``StreamChunk.text`` is None); sampling fields are ignored (there is no model).  The first
chunk reports the prompt tokens the engine's prefix cache held (``num_cached_tokens``; 0 without one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from replica.backend import BACKEND_REFUSES, ReplicaBackend
from replica.contract import GenerateRequest, StreamChunk, TierFacts
from replica.cost.profile import DEFAULT_COST_PROFILE, load_profile
from replica.policy import DEFAULT_SCHEDULER, EngineLimits, make_policy
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.sim.realtime import RealtimeSimEngine
from replica.slo import SLOTracker


class SimBackend(ReplicaBackend):
    def __init__(self, *, tiers: Sequence[TierFacts], replica_id: str, scheduler: str = DEFAULT_SCHEDULER,
                 cost_profile: str = DEFAULT_COST_PROFILE, kv_blocks: int = PAPER_KV_BLOCKS,
                 time_scale: float = 1.0) -> None:
        self.replica_id = replica_id
        profile = load_profile(cost_profile)
        policy = make_policy(scheduler, engine=EngineLimits(tile_tokens=profile.tile_tokens))
        slo = SLOTracker({t.name: t.tbt_slo_s for t in tiers}, {t.name: t.ttft_target_s for t in tiers})
        self.engine = RealtimeSimEngine(policy, profile, num_kv_blocks=kv_blocks, time_scale=time_scale, slo=slo)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        asked = request.options.asked | {f for f, v in request.sampling if v not in (None, [], "")}
        refused = sorted(asked & BACKEND_REFUSES["sim"].keys())
        if refused:  # the ingress refuses these with a 400; another caller learns it here
            raise ValueError(f"{request.request_id}: the simulated engine cannot honour {', '.join(refused)}: "
                             + "; ".join(BACKEND_REFUSES["sim"][f] for f in refused))
        max_tokens = request.max_tokens
        first = True
        async for n in self.engine.generate(request):
            # the cached prompt tokens (the engine's prefix cache, if any) ride on the first chunk
            cached = self.engine.num_cached_tokens(request.request_id) if first else None
            first = False
            yield StreamChunk(num_tokens=n, finish_reason="length" if n >= max_tokens else None,
                              num_cached_tokens=cached)

    async def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot(self.replica_id)

    async def tbt_gaps_since(self, since_s: float | None, max_samples_per_tier: int) -> dict[str, Any]:
        now = self.engine.clock()
        if since_s is None:
            return {"clock_s": now}
        return {"clock_s": now, "tiers": self.engine.slo.tbt_gaps_since(since_s, now, max_samples_per_tier)}

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    async def check_health(self) -> None:
        self.engine.check_health()
