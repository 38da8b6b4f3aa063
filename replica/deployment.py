"""The replica as a Ray Serve deployment: one engine per replica (one GPU in production).

`LLMReplica` is a plain class; `serve_app` wraps it with `serve.deployment(...)` options from the
app config.  Its engine (``backend``):

- ``"sim"`` (the embedded default): `replica.sim.realtime.RealtimeSimEngine`, the same pure
  scheduling policy and a GPU cost profile, tokens at that GPU's pace (no model, no GPU);
- ``"vllm"``: `replica.vllm_backend.VLLMBackend`, vLLM ``AsyncLLM`` with the policy scheduler
  class (`replica.vllm_scheduler`) plugged in as ``scheduler_cls``; ``engine_kwargs`` are vLLM's
  engine arguments (`serve_app.config.VLLMEngineConfig.engine_kwargs()`).

Requests arrive through a DeploymentHandle (so the router sees tier and prompt length):

    {"request_id": str, "prompt_len": int, "prompt_token_ids": list[int] (vllm: required),
     "max_tokens": int, "tier": str, "tbt_slo_s": float, "tier_rank": int, "ttft_target_s": float,
     "sampling": {"temperature", "top_p", "seed", "stop", ...} (vllm only)}

`generate` streams ``{"index": n, "text": str | None, "finished": bool, "finish_reason": str | None}``
(``index``: completion tokens so far; ``text``: the new text, None from the sim backend, whose
tokens have no text).  Cancelling the stream (client gone) aborts the engine request.
`record_routing_stats()` returns the feedback snapshot (`replica.slo`) that Serve pushes to
every router; the same snapshot sets the replica's Prometheus gauges (`serve_app.metrics`:
queued prefill tokens, waiting/running requests, decodes per tier, KV use, mean batch time), also
refreshed by a background task every ``TIERED_METRICS_PERIOD_S`` (5 s) when Serve polls less often.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from replica.sim.engine import PAPER_KV_BLOCKS
from replica.tiers import TierMix, TierSpec

logger = logging.getLogger("ray.serve")

DEFAULT_TIERS = {"premium": {"tbt_slo_s": 0.1, "ttft_target_s": 0.5, "rank": 0},
                 "free": {"tbt_slo_s": 0.5, "ttft_target_s": 0.5, "rank": 1}}


def tier_mix_of(tiers: dict[str, dict[str, float]]) -> TierMix:
    """The serving tiers ``{name: {tbt_slo_s, ttft_target_s, rank}}`` as a TierMix (uniform
    shares: serving never draws tiers)."""
    ranked = all("rank" in t for t in tiers.values())
    return TierMix(tiers=[
        TierSpec(name=name, tbt_slo_s=t["tbt_slo_s"], ttft_target_s=t.get("ttft_target_s", 0.5),
                 share=1.0 / len(tiers), rank=int(t["rank"]) if ranked else None)
        for name, t in tiers.items()])


class SimBackend:
    """The real-time simulated engine behind the replica interface."""

    def __init__(self, *, scheduler: str, cost_profile: str, kv_blocks: int, time_scale: float,
                 tiers: TierMix, replica_id: str) -> None:
        from replica.cost.profile import load_profile
        from replica.policy import make_policy
        from replica.sim.realtime import RealtimeSimEngine
        from replica.slo import SLOTracker

        self.replica_id = replica_id
        slo = SLOTracker({t.name: t.tbt_slo_s for t in tiers.tiers}, {t.name: t.ttft_target_s for t in tiers.tiers})
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
            ttft_target_s=float(request.get("ttft_target_s", 0.5)),
        ):
            finished = n >= max_tokens
            yield {"index": n, "text": None, "finished": finished, "finish_reason": "length" if finished else None}

    async def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot(self.replica_id)

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    async def check_health(self) -> None:
        task = self.engine._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")


class LLMReplica:
    def __init__(
        self,
        backend: str = "sim",
        scheduler: str | None = "slai-spf-dynamic",
        cost_profile: str = "rtx6000ada-mistral7b",
        kv_blocks: int = PAPER_KV_BLOCKS,
        time_scale: float = 1.0,
        tiers: dict[str, dict[str, float]] | None = None,
        replica_id: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        mix = tier_mix_of(tiers or DEFAULT_TIERS)
        self.replica_id = replica_id or os.environ.get("REPLICA_ID") or f"replica-{uuid.uuid4().hex[:8]}"
        if backend == "sim":
            self.backend: Any = SimBackend(scheduler=scheduler or "slai-spf-dynamic", cost_profile=cost_profile,
                                           kv_blocks=kv_blocks, time_scale=time_scale, tiers=mix,
                                           replica_id=self.replica_id)
        elif backend == "vllm":
            if not engine_kwargs or "model" not in engine_kwargs:
                raise ValueError("the vllm backend needs engine_kwargs with a model")
            from replica.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(dict(engine_kwargs), tiers=mix, scheduler=scheduler,
                                       replica_id=self.replica_id)
        else:
            raise ValueError(f"unknown backend {backend!r}: expected 'sim' or 'vllm'")
        from serve_app.metrics import ReplicaMetrics

        self._metrics = ReplicaMetrics.create()  # None when TIERED_METRICS=0
        self._metrics_task: asyncio.Task | None = None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self._metrics_task is None and self._metrics is not None:
            self._start_metrics_task()
        async for chunk in self.backend.generate(request):
            yield chunk

    async def record_routing_stats(self) -> dict[str, Any]:
        snap = await self.backend.snapshot()
        if self._metrics is not None:
            self._record_metrics(snap)
            if self._metrics_task is None:
                self._start_metrics_task()
        return snap

    # --- Prometheus gauges from the feedback snapshot ---------------------------------------------
    def _record_metrics(self, snap: dict[str, Any]) -> None:
        try:
            self._metrics.update(snap)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - metrics never fail the replica
            logger.warning("replica %s: recording metrics failed", self.replica_id, exc_info=True)

    def _start_metrics_task(self) -> None:
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_loop())

    async def _metrics_loop(self) -> None:
        """Refresh the gauges every period unless record_routing_stats just did."""
        from serve_app.metrics import REPLICA_METRICS_PERIOD_S

        period = REPLICA_METRICS_PERIOD_S
        while True:
            await asyncio.sleep(period)
            if self._metrics is None or not self._metrics.due(period):
                continue
            try:
                snap = await self.backend.snapshot()
            except Exception:  # noqa: BLE001
                logger.debug("replica %s: no snapshot for the metrics", self.replica_id, exc_info=True)
                continue
            self._record_metrics(snap)

    def num_unfinished(self) -> int:
        return self.backend.num_unfinished

    async def engine_state(self) -> dict[str, Any]:
        """This replica's engine load and its Serve identity (tests and operators; not on the
        request path): ``num_unfinished`` (requests the engine still holds), ``num_waiting``,
        ``num_running``, ``kv_usage`` (from the feedback snapshot), ``replica_id`` (the one in the
        snapshots), ``actor_name`` (Serve's replica actor, namespace ``serve``; None outside Serve)."""
        snap = await self.backend.snapshot()
        actor_name = None
        try:
            from ray import serve

            actor_name = serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - not running inside a Serve replica
            pass
        return {"replica_id": self.replica_id, "actor_name": actor_name,
                "num_unfinished": int(self.backend.num_unfinished), "num_waiting": int(snap.get("num_waiting", 0)),
                "num_running": int(snap.get("num_running", 0)), "kv_usage": float(snap.get("kv_usage", 0.0))}

    async def check_health(self) -> None:
        await self.backend.check_health()

    def __del__(self) -> None:
        shutdown = getattr(getattr(self, "backend", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
