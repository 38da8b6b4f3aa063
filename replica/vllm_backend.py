"""The replica's vLLM backend: one `AsyncLLM` engine with a policy scheduler plugged in.

`VLLMBackend(engine_kwargs, tiers=..., scheduler=..., replica_id=...)` builds the engine from
`AsyncEngineArgs(**engine_kwargs)` (`serve_app.config.VLLMEngineConfig.engine_kwargs()`; the
``scheduler_cls`` there is `replica.vllm_scheduler.SLAIScheduler` by default).  The engine core
runs in its own process (AsyncLLM always does); what its scheduler needs to know of the replica
(the preset, the replica id, the deployment's tiers) travels in vLLM's own engine configuration,
``additional_config["tiered_llm"]`` (`replica.vllm_scheduler.REPLICA_CONFIG_KEY`), and each
request's tier facts in its ``SamplingParams.extra_args``.

`generate` takes a `replica.contract.GenerateRequest` (the ingress's token ids; sampling fields
mapped by `SamplingFields.to_vllm`, output options by `EngineOptions.to_vllm`: ``n``, logprobs,
prompt logprobs, ``logit_bias``, structured outputs; the model's generation-config sampling
defaults under them, as vLLM's OpenAI server applies them) and yields a `StreamChunk` per choice
per engine output (deltas: new text, token ids, logprobs; the prompt's logprobs and vLLM's
``num_cached_tokens``, the prompt tokens its prefix cache held, on each choice's first chunk).
Cancelling the generator (client gone) makes AsyncLLM abort the engine request.

The feedback snapshot is read out of the engine-core process with an EngineCore utility call
(`replica.vllm_scheduler.FEEDBACK_UTILITY`, which that module adds to vLLM's EngineCore when the
engine imports it to resolve ``scheduler_cls``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from replica.backend import ReplicaBackend
from replica.contract import EngineRejected, GenerateRequest, StreamChunk, TierFacts, TokenLogprob
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
        # the sampling defaults vLLM's OpenAI server takes from the model's generation config
        self.default_sampling = {k: v for k, v in self.engine.model_config.get_diff_sampling_param().items()
                                 if k != "max_tokens"}
        self._num_unfinished = 0

    def sampling_params(self, request: GenerateRequest) -> Any:
        """vLLM's SamplingParams for ``request``: the model's generation-config defaults (as vLLM's
        OpenAI server applies them: ``generation_config.json``'s temperature, top_p, top_k, min_p,
        penalties), then the request's sampling fields and output options, its tier facts in
        ``extra_args``, deltas out."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        options = request.options.to_vllm()
        structured = options.pop("structured_outputs", None)
        if structured is not None:
            options["structured_outputs"] = StructuredOutputsParams(**structured)
        kwargs = {**self.default_sampling, **request.sampling.to_vllm(), **options}
        return SamplingParams(
            max_tokens=request.max_tokens,
            output_kind=RequestOutputKind.DELTA,
            extra_args=request.tier.to_extra_args(),
            **kwargs,
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """The request's chunks; `EngineRejected` when vLLM refuses it as invalid (its
        ``VLLMClientError``, e.g. a JSON schema its grammar compiler rejects)."""
        from vllm.exceptions import VLLMClientError

        try:
            params = self.sampling_params(request)
        except (VLLMClientError, ValueError) as e:
            raise EngineRejected(str(e), _api_param(getattr(e, "parameter", None))) from None
        try:
            async for chunk in self._generate(request, params):
                yield chunk
        except VLLMClientError as e:
            raise EngineRejected(str(e), _api_param(getattr(e, "parameter", None))) from None

    async def _generate(self, request: GenerateRequest, params: Any) -> AsyncIterator[StreamChunk]:
        counts: dict[int, int] = {}
        want_logprobs = request.options.logprobs is not None
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self._num_unfinished += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": list(request.prompt_token_ids)}, params,
                                                  request_id=request.request_id):
                if out.prompt_logprobs is not None and prompt_logprobs is None:
                    prompt_logprobs = _prompt_logprobs(request.prompt_token_ids, out.prompt_logprobs)
                for c in out.outputs:
                    before = counts.get(c.index)
                    finished = c.finish_reason is not None
                    if not c.token_ids and not finished:
                        continue  # nothing new for this choice
                    n = counts[c.index] = (before or 0) + len(c.token_ids)
                    first = before is None
                    stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                    yield StreamChunk(
                        num_tokens=n, text=c.text, finish_reason=c.finish_reason if finished else None,
                        stop_reason=stop if finished else None, index=c.index, token_ids=tuple(c.token_ids),
                        logprobs=_logprobs(c.token_ids, c.logprobs) if want_logprobs else None,
                        prompt_logprobs=prompt_logprobs if first else None,
                        num_cached_tokens=_cached_tokens(out) if first else None)
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


def _entry(token_id: int, candidates: Any) -> TokenLogprob:
    """One position's `TokenLogprob` from vLLM's {token id: Logprob} (the sampled or prompt
    token first, then the top ones, as vLLM orders them)."""
    own = candidates[token_id]
    return TokenLogprob(token_id=int(token_id), token=own.decoded_token, logprob=float(own.logprob),
                        top=tuple((int(t), lp.decoded_token, float(lp.logprob)) for t, lp in candidates.items()))


def _logprobs(token_ids: Any, logprobs: Any) -> tuple[TokenLogprob, ...]:
    if logprobs is None:
        raise RuntimeError("the engine returned no logprobs for a request that asked for them")
    return tuple(_entry(t, lp) for t, lp in zip(token_ids, logprobs))


def _prompt_logprobs(prompt_token_ids: Any, logprobs: Any) -> tuple[TokenLogprob | None, ...]:
    return tuple(None if lp is None else _entry(t, lp) for t, lp in zip(prompt_token_ids, logprobs))


def _cached_tokens(out: Any) -> int:
    """The prompt tokens vLLM found in its prefix cache for the request (``RequestOutput
    .num_cached_tokens``: known from the output that ends the prefill, the first one with
    tokens; None, which vLLM gives when it has not counted, reads as 0)."""
    n = getattr(out, "num_cached_tokens", None)
    return int(n) if n else 0


def _api_param(parameter: Any) -> str | None:
    """The API parameter of a vLLM validation error's ``parameter`` (a SamplingParams name)."""
    if not isinstance(parameter, str):
        return None
    return {"structured_outputs": "response_format"}.get(parameter, parameter)
