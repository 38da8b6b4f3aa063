"""The replica as a Ray Serve deployment: one engine per replica.

`LLMReplica` is a plain class; `serve_app` wraps it with `serve.deployment(...)` options from the
app config. Its engine is the real-time simulated engine (`backend="sim"`, the embedded default:
the same SLAI policy and a GPU cost profile, tokens at that GPU's pace) or, in a later step,
vLLM `AsyncLLM` with the SLAI scheduler class.

Requests arrive through a DeploymentHandle (so the router sees tier and prompt length):

    {"request_id": str, "prompt_len": int, "max_tokens": int,
     "tier": str, "tbt_slo_s": float, "tier_rank": int}

`generate` streams `{"index": n, "finished": bool}` per token; cancelling the stream (client
gone) aborts the engine request. `record_routing_stats()` returns the feedback snapshot
(`replica.slo`) that Serve pushes to every router.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from replica.cost.profile import load_profile
from replica.policy import make_policy
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.sim.realtime import RealtimeSimEngine
from replica.slo import SLOTracker


class LLMReplica:
    def __init__(
        self,
        backend: str = "sim",
        scheduler: str = "slai-spf-dynamic",
        cost_profile: str = "rtx6000ada-mistral7b",
        kv_blocks: int = PAPER_KV_BLOCKS,
        time_scale: float = 1.0,
        tiers: dict[str, dict[str, float]] | None = None,
        replica_id: str | None = None,
    ) -> None:
        if backend != "sim":
            raise ValueError(f"backend {backend!r} is not available in this replica yet (only 'sim')")
        tiers = tiers or {"premium": {"tbt_slo_s": 0.1, "ttft_target_s": 0.5}, "free": {"tbt_slo_s": 0.5, "ttft_target_s": 0.5}}
        self.replica_id = replica_id or os.environ.get("REPLICA_ID") or f"replica-{uuid.uuid4().hex[:8]}"
        slo = SLOTracker({k: v["tbt_slo_s"] for k, v in tiers.items()},
                         {k: v.get("ttft_target_s", 0.5) for k, v in tiers.items()})
        self.engine = RealtimeSimEngine(make_policy(scheduler), load_profile(cost_profile),
                                        num_kv_blocks=kv_blocks, time_scale=time_scale, slo=slo)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        max_tokens = int(request["max_tokens"])
        async for n in self.engine.generate(
            str(request["request_id"]),
            prompt_len=int(request["prompt_len"]),
            max_tokens=max_tokens,
            tier=str(request.get("tier", "default")),
            tbt_slo_s=float(request.get("tbt_slo_s", 0.5)),
            tier_rank=int(request.get("tier_rank", 0)),
        ):
            yield {"index": n, "finished": n >= max_tokens}

    def record_routing_stats(self) -> dict[str, Any]:
        return self.engine.snapshot(self.replica_id)

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    async def check_health(self) -> None:
        task = self.engine._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")
