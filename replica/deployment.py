"""The replica as a Ray Serve deployment: one engine per replica (one GPU in production).

`LLMReplica` is a plain class; `serve_app.app` wraps it with `serve.deployment(...)` options from
the app config.  It holds one `replica.backend.ReplicaBackend` (``backend``):

- ``"sim"`` (the embedded default): `replica.sim.backend.SimBackend`, the same pure scheduling
  policy and a GPU cost profile, tokens at that GPU's pace (no model, no GPU);
- ``"vllm"``: `replica.vllm_backend.VLLMBackend`, vLLM ``AsyncLLM`` with the policy scheduler
  class (`replica.vllm_scheduler`) plugged in as ``scheduler_cls``; ``engine_kwargs`` are vLLM's
  engine arguments (`serve_app.config.VLLMEngineConfig.engine_kwargs()`).

Requests arrive through a DeploymentHandle (so the router sees them) as a
`replica.contract.GenerateRequest`; `generate` streams `replica.contract.StreamChunk` s.
Cancelling the stream (client gone) aborts the engine request.  ``tiers`` are the deployment's
tiers (`replica.contract.TierFacts`): the engine tracks SLOs per tier from the start (each request
carries its own tier facts too).  `record_routing_stats()` returns the feedback snapshot
(`replica.slo`) that Serve pushes to every router, and `record_autoscaling_stats()` the same
snapshot with the replica's arrival counters for Serve's autoscaler
(`serve_app.ray_autoscaling`); the same snapshot sets the replica's
Prometheus gauges (`replica.metrics`), also refreshed by a background task every
``TIERED_METRICS_PERIOD_S`` (5 s) when Serve polls less often.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from replica.autoscaling_stats import ArrivalCounter, autoscaling_stats
from replica.backend import ReplicaBackend
from replica.contract import GenerateRequest, StreamChunk, TierFacts
from replica.cost.profile import DEFAULT_COST_PROFILE
from replica.metrics import REPLICA_METRICS_PERIOD_S, ReplicaMetrics
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.streaming import cancel_read, coalesce
from replica.tiers import paper_tiers

logger = logging.getLogger("ray.serve")

HEARTBEAT_S = 1.0  # a request waiting for its first token: a heartbeat chunk this often


class LLMReplica:
    def __init__(
        self,
        backend: str = "sim",
        *,
        tiers: Sequence[TierFacts] | None = None,
        replica_id: str | None = None,
        scheduler: str | None = None,
        cost_profile: str = DEFAULT_COST_PROFILE,
        kv_blocks: int = PAPER_KV_BLOCKS,
        time_scale: float = 1.0,
        engine_kwargs: dict[str, Any] | None = None,
        log_engine_metrics: bool = True,
    ) -> None:
        """``scheduler``: a preset of `replica.policy` (None: the sim backend's default, or the
        vLLM scheduler class's own preset); ``cost_profile``, ``kv_blocks``, ``time_scale``: the
        sim backend's; ``engine_kwargs``, ``log_engine_metrics`` (vLLM's own metrics through Ray):
        the vLLM backend's."""
        facts = list(tiers) if tiers is not None else [t.facts() for t in paper_tiers().tiers]
        self.replica_id = replica_id or os.environ.get("REPLICA_ID") or f"replica-{uuid.uuid4().hex[:8]}"
        self.backend: ReplicaBackend
        if backend == "sim":
            from replica.sim.backend import SimBackend

            sim_options: dict[str, Any] = {"scheduler": scheduler} if scheduler is not None else {}
            self.backend = SimBackend(tiers=facts, replica_id=self.replica_id, cost_profile=cost_profile,
                                      kv_blocks=kv_blocks, time_scale=time_scale, **sim_options)
        elif backend == "vllm":
            if not engine_kwargs or "model" not in engine_kwargs:
                raise ValueError("the vllm backend needs engine_kwargs with a model")
            from replica.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(dict(engine_kwargs), tiers=facts, scheduler=scheduler,
                                       replica_id=self.replica_id, log_engine_metrics=log_engine_metrics)
        else:
            raise ValueError(f"unknown backend {backend!r}: expected 'sim' or 'vllm'")
        self._metrics = ReplicaMetrics.create()  # None when TIERED_METRICS=0
        self._metrics_task: asyncio.Task | None = None
        self._arrivals = ArrivalCounter()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """The backend's chunks, preceded by heartbeats (`StreamChunk.heartbeat`): one at once (the
        replica took the request) and one every `HEARTBEAT_S` until the first token, so that the
        ingress tells a replica that queues a request from one that hangs (its deadline for a sign
        of life is short, its deadline for the first token long).  The first token goes at once;
        the rest are coalesced to at most one message per the tier's stream interval
        (`replica.streaming.coalesce`, ``request.tier.stream_interval_s``)."""
        if self._metrics_task is None and self._metrics is not None:
            self._start_metrics_task()
        self._arrivals.record(request.tier.name, len(request.prompt_token_ids))
        yield StreamChunk.heartbeat()
        chunks = aiter(self.backend.generate(request))
        pending: asyncio.Future[StreamChunk] | None = asyncio.ensure_future(anext(chunks))
        try:
            while True:  # until the first real chunk: heartbeats while the engine queues the request
                done, _ = await asyncio.wait({pending}, timeout=HEARTBEAT_S)
                if done:
                    break
                yield StreamChunk.heartbeat()
            try:
                first = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield first
            rest = coalesce(chunks, request.tier.stream_interval_s)
            try:
                async for chunk in rest:
                    yield chunk
            finally:
                await rest.aclose()
        finally:
            await cancel_read(pending)
            await chunks.aclose()  # the client is gone (or the stream ended): the engine request is aborted

    async def record_routing_stats(self) -> dict[str, Any]:
        snap = await self.backend.snapshot()
        if self._metrics is not None:
            self._record_metrics(snap)
            if self._metrics_task is None:
                self._start_metrics_task()
        return snap

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (with ``replicas.autoscaling``; read by
        `serve_app.ray_autoscaling.TierAwareServePolicy`): the feedback snapshot's fields and the
        arrival counters (`replica.autoscaling_stats`)."""
        return autoscaling_stats(await self.backend.snapshot(), self._arrivals)

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
        snapshots), ``actor_name`` (Serve's replica actor, namespace ``serve``; None outside Serve),
        ``pid`` (its process)."""
        snap = await self.backend.snapshot()
        actor_name = None
        try:
            from ray import serve

            actor_name = serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - not running inside a Serve replica
            pass
        return {"replica_id": self.replica_id, "actor_name": actor_name, "pid": os.getpid(),
                "num_unfinished": int(self.backend.num_unfinished), "num_waiting": int(snap.get("num_waiting", 0)),
                "num_running": int(snap.get("num_running", 0)), "kv_usage": float(snap.get("kv_usage", 0.0))}

    async def tbt_gaps_since(self, marks: dict[str, float] | None = None,
                             max_samples_per_tier: int = 200_000) -> dict[str, Any]:
        """For benchmarks (`loadtest.stream_path`; not on the request path, no per-token work): the
        TBT gaps this replica's engine produced per tier since a mark.  Called without ``marks``
        (e.g. through ``DeploymentHandle.broadcast``), it returns this replica's mark:
        ``{"replica_id", "clock_s"}`` (on its engine's clock).  Called with the marks collected
        then (``{replica_id: clock_s}``), it also returns ``"tiers"``: per tier ``gaps_s`` (at most
        ``max_samples_per_tier``, evenly strided beyond), ``num_gaps``, ``sampled``, ``complete``
        (`replica.slo.SLOTracker.tbt_gaps_since`); a replica absent from ``marks`` (started since)
        returns its mark only.  Raises NotImplementedError where the backend cannot tell."""
        since_s = None if marks is None else marks.get(self.replica_id)
        return {"replica_id": self.replica_id, **await self.backend.tbt_gaps_since(since_s, max_samples_per_tier)}

    async def check_health(self) -> None:
        await self.backend.check_health()

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)  # None if __init__ failed before building it
        if backend is not None:
            backend.shutdown()
