"""The replica backend contract: one engine behind the replica deployment.

`replica.deployment.LLMReplica` (the Ray Serve deployment) holds one backend and does nothing
engine-specific itself.  Two implementations:

- `replica.sim.backend.SimBackend`: the simulated engine on the wall clock (the SLAI policy and a
  GPU cost profile; no model, no GPU);
- `replica.vllm_backend.VLLMBackend`: vLLM's ``AsyncLLM`` with a policy scheduler class
  (`replica.vllm_scheduler`) plugged in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from replica.contract import GenerateRequest, StreamChunk


class ReplicaBackend(ABC):
    replica_id: str

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Stream ``request``'s completion: chunks in order, cumulative ``num_tokens``, the last
        one with a ``finish_reason``.  Closing or cancelling the iterator before the end (the
        client is gone) aborts the engine request and frees its KV.  Raises ValueError for a
        request this engine cannot take (e.g. a duplicate request id)."""

    @abstractmethod
    async def snapshot(self) -> dict[str, Any]:
        """The replica's feedback snapshot (`replica.slo.SLOTracker.snapshot` schema), which the
        deployment returns from ``record_routing_stats`` to the routers and the ingress."""

    @property
    @abstractmethod
    def num_unfinished(self) -> int:
        """Requests the engine holds (waiting or running) that have not finished."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine can no longer serve (Serve then replaces the replica)."""

    async def tbt_gaps_since(self, since_s: float | None, max_samples_per_tier: int) -> dict[str, Any]:
        """For benchmarks (not the request path): ``{"clock_s": now}`` on the clock of the engine's
        SLO tracker, and with a ``since_s`` from an earlier call also ``"tiers"``: the TBT gaps the
        engine produced since then, per tier (`replica.slo.SLOTracker.tbt_gaps_since`).  Default:
        not available (NotImplementedError)."""
        raise NotImplementedError(f"{type(self).__name__} does not give its TBT gaps")

    def shutdown(self) -> None:
        """Release the engine (processes, GPU memory); called when the replica goes away.
        Default: nothing to release."""


# What each backend cannot honour, by `replica.contract` field (`SamplingFields` and `EngineOptions`
# names): field -> why.  The ingress refuses a request that sets one with a 400 naming its API
# parameter (`serve_app.openai_api`), so nothing a client asks for is silently dropped.  The vLLM
# backend honours every field.  The simulated engine has no model: its tokens are a fixed
# sequence (one token with probability 1 at each step), so the fields that reshape a distribution
# (temperature, top_p, top_k, min_p, seed, the penalties) leave them unchanged as they would for
# such a model, it never emits EOS (ignore_eos, min_tokens hold), and its tokens are plain text
# (the detokenizer flags hold); what needs a model's distribution or its text is refused.
_SIM_NO_MODEL = "the simulated engine has no model"
BACKEND_REFUSES: dict[str, dict[str, str]] = {
    "sim": {
        "n": f"{_SIM_NO_MODEL}: it generates one choice per request",
        "logprobs": f"{_SIM_NO_MODEL}, so no logprobs",
        "prompt_logprobs": f"{_SIM_NO_MODEL}, so no prompt logprobs",
        "logit_bias": f"{_SIM_NO_MODEL} whose logits a bias could change",
        "json_object": f"{_SIM_NO_MODEL}: structured outputs need one",
        "json_schema": f"{_SIM_NO_MODEL}: structured outputs need one",
        "stop": f"{_SIM_NO_MODEL}: its output does not stop at strings",
        "stop_token_ids": f"{_SIM_NO_MODEL}: its output does not stop at tokens",
    },
    "vllm": {},
}
