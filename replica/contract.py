"""The request contract from the ingress to the engine: one generate request in, stream chunks out.

Every layer a request crosses uses these types and nothing else; every default is written here
(or in `replica.tiers` for the tier model):

    ingress (serve_app)  builds a GenerateRequest: token ids, max_tokens, the key's tier facts,
                         the sampling fields it validated
    router (router.ray_router)
                         reads its routing facts (`router.policies.base.RoutingRequest.of`)
    replica deployment   hands it to its backend (`replica.backend.ReplicaBackend`)
      sim backend        prompt length, max_tokens and tier facts drive the simulated engine
      vLLM backend       token ids; `SamplingFields.to_vllm()` -> vLLM's SamplingParams kwargs;
                         `TierFacts.to_extra_args()` -> SamplingParams.extra_args, which the
                         policy scheduler (`replica.vllm_scheduler`) reads back with
                         `TierFacts.from_extra_args`
    backends stream      StreamChunk (cumulative completion tokens, new text, finish reason)

Adding an OpenAI sampling field: one field on `SamplingFields` (with OpenAI's constraints; the
ingress's request models inherit it) and one entry in `VLLM_SAMPLING_PARAMS` (its SamplingParams
name); `tests/replica/test_contract.py` fails if a field has no mapping.

Nothing here imports vLLM or Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

__all__ = ["DEFAULT_TTFT_TARGET_S", "FINISH_REASONS", "GenerateRequest", "SamplingFields", "StreamChunk", "TierFacts",
           "TierMetadataError", "VLLM_SAMPLING_PARAMS"]


# ------------------------------------------------------------------------------------------- tier

# The paper's capacity criterion is a median TTFT <= 0.5 s: a tier's TTFT target unless it sets one
DEFAULT_TTFT_TARGET_S = 0.5


class TierMetadataError(ValueError):
    """A request's tier metadata (in vLLM's ``extra_args``) is unknown or invalid."""


@dataclass(frozen=True, slots=True)
class TierFacts:
    """What the engine needs to know of a request's tier: its name, TBT SLO (s), TTFT target (s)
    and scheduling rank (0 = strictest).  Built from the serving tier config (the key's tier);
    a client never sets it."""

    name: str
    tbt_slo_s: float
    ttft_target_s: float
    rank: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tier needs a name")
        for what in ("tbt_slo_s", "ttft_target_s"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"tier {self.name!r}: {what} must be a positive number of seconds, got {v!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"tier {self.name!r}: rank must be an integer >= 0, got {self.rank!r}")

    # --- through vLLM: SamplingParams.extra_args (``vllm_xargs`` over vLLM's own HTTP API) --------
    def to_extra_args(self) -> dict[str, Any]:
        return {"tier": self.name, "tbt_slo_s": self.tbt_slo_s, "ttft_target_s": self.ttft_target_s,
                "tier_rank": self.rank}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None, known: Mapping[str, TierFacts],
                        default_tier: str) -> TierFacts:
        """The tier facts of a request from its ``extra_args``: the tier named there (default
        ``default_tier``) as ``known`` describes it, with any of ``tbt_slo_s``, ``ttft_target_s``,
        ``tier_rank`` the request carries taking precedence (this app's ingress sends all four;
        a client of vLLM's own server may send just ``{"tier": "premium"}``).  A tier the
        request describes fully need not be in ``known``.  `TierMetadataError` otherwise."""
        extra = extra_args or {}
        name = extra.get("tier", default_tier)
        if not isinstance(name, str) or not name:
            raise TierMetadataError(f"tier must be a tier name, got {name!r}")
        base = known.get(name)
        full = all(k in extra for k in ("tbt_slo_s", "ttft_target_s", "tier_rank"))
        if base is None and not full:
            raise TierMetadataError(f"unknown tier {name!r}; known tiers: {', '.join(known)}")
        values = {"tbt_slo_s": extra.get("tbt_slo_s", base.tbt_slo_s if base else None),
                  "ttft_target_s": extra.get("ttft_target_s", base.ttft_target_s if base else None),
                  "rank": extra.get("tier_rank", base.rank if base else None)}
        try:
            return cls(name=name, **values)
        except ValueError as e:
            raise TierMetadataError(str(e)) from None


# --------------------------------------------------------------------------------------- sampling

# OpenAI allows up to 4 stop sequences; vLLM checks every one on every output step of the replica
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class SamplingFields(BaseModel):
    """The OpenAI sampling fields a request may set, with OpenAI's types and ranges (numbers and
    booleans strict: ``"0.5"`` or ``true`` is no float; floats finite; at most
    ``MAX_STOP_STRINGS`` stop strings of at most ``MAX_STOP_CHARS`` characters).  None = the
    engine's default.  The simulated engine has no model: it ignores them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: StrictFloat | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    ignore_eos: StrictBool | None = None  # vLLM's extension: generate exactly max_tokens tokens

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(strings)}")
        for s in strings:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return stop

    @classmethod
    def of(cls, request: BaseModel) -> SamplingFields:
        """The sampling fields of a request model that declares them (the ingress's OpenAI
        request models inherit this class)."""
        return cls.model_construct(**{f: getattr(request, f) for f in cls.model_fields})

    def to_vllm(self) -> dict[str, Any]:
        """vLLM ``SamplingParams`` keyword arguments for the fields that are set."""
        out = {}
        for name, param in VLLM_SAMPLING_PARAMS.items():
            value = getattr(self, name)
            if value is not None:
                out[param] = value
        return out


# SamplingFields field -> vLLM SamplingParams argument (one line per field)
VLLM_SAMPLING_PARAMS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "ignore_eos": "ignore_eos",
}


# ---------------------------------------------------------------------------------------- request

@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation request as the ingress sends it to a replica (through a DeploymentHandle,
    so the router sees it): the prompt as token ids (tokenized once, at the ingress), the
    completion limit, the tier, the sampling fields."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    tier: TierFacts
    sampling: SamplingFields = field(default_factory=SamplingFields)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a request needs a request_id")
        if not self.prompt_token_ids:
            raise ValueError(f"{self.request_id}: the prompt is empty")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"{self.request_id}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def with_request_id(self, request_id: str) -> GenerateRequest:
        """The same request under another engine request id (a retry on another replica)."""
        return replace(self, request_id=request_id)


# ------------------------------------------------------------------------------------------ chunk

FINISH_REASONS = ("length", "stop", "abort")


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What a replica stream yields as tokens are produced.

    ``num_tokens``: completion tokens produced so far (cumulative; a chunk may carry several);
    ``text``: the text of the new tokens (None from a backend without a detokenizer, the
    simulated engine, whose tokens have no text); ``finish_reason``: None until the last chunk,
    then ``"length"`` (max_tokens reached), ``"stop"`` (EOS or a stop string) or ``"abort"``
    (the engine gave up on the request, e.g. its scheduler rejected it; ``stop_reason`` says
    why); ``stop_reason``: the stop string that ended it, or the abort reason.  Before the first
    token a replica sends heartbeats (`heartbeat`: no tokens)."""

    num_tokens: int
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def heartbeat(cls) -> StreamChunk:
        """A chunk with no token: the replica has the request and is alive (it sends one at once
        and then regularly until the first token); a receiver skips it."""
        return cls(num_tokens=0)

    @property
    def is_heartbeat(self) -> bool:
        return self.num_tokens == 0 and self.finish_reason is None
