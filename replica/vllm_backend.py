"""The replica's vLLM backend: one `AsyncLLM` engine with a policy scheduler plugged in.

`VLLMBackend(engine_kwargs, tiers=..., scheduler=..., replica_id=...)` builds the engine from
`AsyncEngineArgs(**engine_kwargs)` (`serve_app.config.VLLMEngineConfig.engine_kwargs()`; the
``scheduler_cls`` there is `replica.vllm_scheduler.SLAIScheduler` by default).  The engine core
runs in its own process (AsyncLLM always does); the scheduler there reads its tiers, preset and
replica id from environment variables that are set here before the engine starts
(``REPLICA_TIERS`` as inline JSON, ``REPLICA_SCHEDULER``, ``REPLICA_ID``).

Requests come as the replica's request dict (see `replica.deployment`) with the ingress's token
ids; the tier and its TBT SLO travel to the scheduler in ``SamplingParams.extra_args``.
`generate` yields ``{"index", "text", "finished", "finish_reason"}`` per engine output (deltas;
``index`` counts completion tokens so far).  Cancelling the generator (client gone) makes
AsyncLLM abort the engine request.

The feedback snapshot is read out of the engine-core process with an EngineCore utility call,
``replica_feedback_snapshot``, which `replica.vllm_scheduler` adds to vLLM's EngineCore when it
is imported there (it returns the scheduler's `feedback_snapshot()`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from replica.tiers import TierMix

FEEDBACK_UTILITY = "replica_feedback_snapshot"  # added to EngineCore by replica.vllm_scheduler

# OpenAI request fields passed on to vLLM's SamplingParams (others are ignored by the ingress)
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "ignore_eos")


class VLLMBackend:
    def __init__(self, engine_kwargs: dict[str, Any], *, tiers: TierMix, scheduler: str | None,
                 replica_id: str) -> None:
        os.environ["REPLICA_TIERS"] = tiers.model_dump_json()
        os.environ["REPLICA_ID"] = replica_id
        if scheduler is not None:
            os.environ["REPLICA_SCHEDULER"] = scheduler
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tiers = tiers
        self.replica_id = replica_id
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self._num_unfinished = 0

    def sampling_params(self, request: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = {k: v for k, v in (request.get("sampling") or {}).items() if k in SAMPLING_FIELDS and v is not None}
        return SamplingParams(
            max_tokens=int(request["max_tokens"]),
            output_kind=RequestOutputKind.DELTA,
            extra_args={"tier": str(request["tier"]), "tbt_slo_s": float(request["tbt_slo_s"])},
            **sampling,
        )

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        token_ids = [int(t) for t in request["prompt_token_ids"]]
        params = self.sampling_params(request)
        n = 0
        self._num_unfinished += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": token_ids}, params,
                                                  request_id=str(request["request_id"])):
                c = out.outputs[0]
                n += len(c.token_ids)
                yield {"index": n, "text": c.text, "finished": out.finished,
                       "finish_reason": c.finish_reason if out.finished else None,
                       "stop_reason": c.stop_reason if out.finished and isinstance(c.stop_reason, str) else None}
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

