"""The replica's vLLM backend: one `AsyncLLM` engine with a policy scheduler plugged in.

`VLLMBackend(engine_kwargs, tiers=..., scheduler=..., replica_id=...)` builds the engine from
`AsyncEngineArgs(**engine_kwargs)` (`serve_app.config.VLLMEngineConfig.engine_kwargs()`; the
``scheduler_cls`` there is `replica.vllm_scheduler.SLAIScheduler` by default).  The engine core
runs in its own process (AsyncLLM always does); what its scheduler needs to know of the replica
(the preset, the replica id, the deployment's tiers) travels in vLLM's own engine configuration,
``additional_config["tiered_llm"]`` (`replica.vllm_scheduler.REPLICA_CONFIG_KEY`), and each
request's tier facts in its ``SamplingParams.extra_args``.

`generate` takes a `replica.contract.GenerateRequest` (the ingress's token ids; sampling fields
mapped by `SamplingFields.to_vllm`) and yields a `StreamChunk` per engine output (deltas).
Cancelling the generator (client gone) makes AsyncLLM abort the engine request.

The feedback snapshot is read out of the engine-core process with an EngineCore utility call
(`replica.vllm_scheduler.FEEDBACK_UTILITY`, which that module adds to vLLM's EngineCore when the
engine imports it to resolve ``scheduler_cls``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from replica.backend import ReplicaBackend
from replica.contract import GenerateRequest, StreamChunk, TierFacts
from replica.vllm_scheduler import FEEDBACK_UTILITY, REPLICA_CONFIG_KEY, replica_engine_config


class VLLMBackend(ReplicaBackend):
    def __init__(self, engine_kwargs: dict[str, Any], *, tiers: Sequence[TierFacts], scheduler: str | None,
                 replica_id: str, log_engine_metrics: bool = True) -> None:
        """``log_engine_metrics``: vLLM's own metrics (``vllm:*``) through Ray's metrics agent, as
        ``ray_vllm_*`` with a ``ReplicaId`` tag (vLLM's `RayPrometheusStatLogger`, as Ray Serve LLM
        does; a custom stat logger keeps the engine's stats on even with ``disable_log_stats``)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(engine_kwargs)
        additional = dict(kwargs.pop("additional_config", None) or {})
        additional[REPLICA_CONFIG_KEY] = replica_engine_config(scheduler=scheduler, replica_id=replica_id,
                                                               tiers=tiers)
        stat_loggers = None
        if log_engine_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers = [RayPrometheusStatLogger]
        self.replica_id = replica_id
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, additional_config=additional),
                                                stat_loggers=stat_loggers)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self._num_unfinished = 0

    @staticmethod
    def sampling_params(request: GenerateRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=request.max_tokens,
            output_kind=RequestOutputKind.DELTA,
            extra_args=request.tier.to_extra_args(),
            **request.sampling.to_vllm(),
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        params = self.sampling_params(request)
        n = 0
        self._num_unfinished += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": list(request.prompt_token_ids)}, params,
                                                  request_id=request.request_id):
                c = out.outputs[0]
                n += len(c.token_ids)
                if out.finished:  # vLLM sets the finish reason of a finished output
                    stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                    yield StreamChunk(num_tokens=n, text=c.text, finish_reason=c.finish_reason, stop_reason=stop)
                else:
                    yield StreamChunk(num_tokens=n, text=c.text)
        finally:
            self._num_unfinished -= 1

    async def snapshot(self) -> dict[str, Any]:
        snap = await self.engine.engine_core.call_utility_async(FEEDBACK_UTILITY)
        if not isinstance(snap, dict):
            raise RuntimeError(f"the engine's scheduler gives no feedback snapshot (scheduler_cls is not a "
                               f"replica.vllm_scheduler class?): got {snap!r}")
        return snap

    @property
    def num_unfinished(self) -> int:
        return self._num_unfinished

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()
