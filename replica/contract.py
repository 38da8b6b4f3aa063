"""The request contract from the ingress to the engine: one generate request in, stream chunks out.

Every layer a request crosses uses these types and nothing else; every default is written here
(or in `replica.tiers` for the tier model):

    ingress (serve_app)  builds a GenerateRequest: token ids, max_tokens (per choice), the tier
                         facts of the tier that serves it, the sampling fields it validated, the
                         output options (`EngineOptions`: n, logprobs, logit_bias, structured
                         outputs), the prompt's prefix hashes (`replica.prefix_hash`)
    router (router.ray_router)
                         reads its routing facts (`router.policies.base.RoutingRequest.of`)
    replica deployment   hands it to its backend (`replica.backend.ReplicaBackend`)
      sim backend        prompt length, max_tokens and tier facts drive the simulated engine
      vLLM backend       token ids; `SamplingFields.to_vllm()` and `EngineOptions.to_vllm()` ->
                         vLLM's SamplingParams kwargs; `TierFacts.to_extra_args()` ->
                         SamplingParams.extra_args, which the policy scheduler
                         (`replica.vllm_scheduler`) reads back with `TierFacts.from_extra_args`
    backends stream      StreamChunk per choice (cumulative completion tokens, new text, token
                         ids, logprobs, finish reason, cached prompt tokens); `EngineRejected` for
                         a request the engine finds invalid (the ingress's 400)

Adding an OpenAI sampling field: one field on `SamplingFields` (with OpenAI's constraints; the
ingress's request models inherit it) and one entry in `VLLM_SAMPLING_PARAMS` (its SamplingParams
name); `tests/replica/test_contract.py` fails if a field has no mapping.

Nothing here imports vLLM or Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

__all__ = ["DEFAULT_TTFT_TARGET_S", "FINISH_REASONS", "STREAM_INTERVAL_SLO_FRACTION", "EngineOptions",
           "EngineRejected", "GenerateRequest", "SamplingFields", "StreamChunk", "TierFacts", "TierMetadataError",
           "TokenLogprob", "VLLM_SAMPLING_PARAMS", "default_stream_interval_s"]


# ------------------------------------------------------------------------------------------- tier

# The paper's capacity criterion is a median TTFT <= 0.5 s: a tier's TTFT target unless it sets one
DEFAULT_TTFT_TARGET_S = 0.5


class TierMetadataError(ValueError):
    """A request's tier metadata (in vLLM's ``extra_args``) is unknown or invalid."""


class EngineRejected(ValueError):
    """The engine refused a request as invalid (e.g. vLLM's validation of a JSON schema for
    structured outputs): the client's fault, which the ingress answers with a 400 naming
    ``param`` (the API parameter, when known)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray (pickled) with its param
        return (type(self), (str(self), self.param))


# A stream's tokens after the first are sent together at most every stream interval (the replica
# coalesces them, `replica.streaming`).  The gap a client sees is then at most max(interval, the
# engine's own gap): coalescing alone never makes a gap longer than the interval, and a token
# that comes after a longer engine gap goes at once.  A quarter of the tier's TBT SLO keeps what
# coalescing adds to any token's delivery (at most the interval) well inside the SLO and leaves
# three quarters of it to the engine's own gaps and the path, while a stream of the lenient tier
# (500 ms) is sent in ~125 ms batches: several tokens per message at GPU pace.
STREAM_INTERVAL_SLO_FRACTION = 0.25


def default_stream_interval_s(tbt_slo_s: float) -> float:
    """A tier's stream interval unless its config sets one: `STREAM_INTERVAL_SLO_FRACTION` of its
    TBT SLO."""
    return STREAM_INTERVAL_SLO_FRACTION * tbt_slo_s


@dataclass(frozen=True, slots=True)
class TierFacts:
    """What the engine needs to know of a request's tier: its name, TBT SLO (s), TTFT target (s),
    scheduling rank (0 = strictest) and stream interval (s: the replica sends a stream's tokens
    after the first together at most this often; 0: each engine output at once).  Built from the
    serving tier config (the tier that serves the request); a client never sets it."""

    name: str
    tbt_slo_s: float
    ttft_target_s: float
    rank: int
    stream_interval_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tier needs a name")
        for what in ("tbt_slo_s", "ttft_target_s"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"tier {self.name!r}: {what} must be a positive number of seconds, got {v!r}")
        v = self.stream_interval_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"tier {self.name!r}: stream_interval_s must be >= 0 seconds, got {v!r}")
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


MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit (vLLM's default max_logprobs is 20 too)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_N = 8  # choices per request (each one is a sequence the engine decodes)


class SamplingFields(BaseModel):
    """The sampling fields a request may set that mean the same at the API (OpenAI's, and vLLM's
    documented extensions) and in vLLM's ``SamplingParams``: the ingress's request models
    inherit them.  OpenAI's types and ranges (numbers and booleans strict: ``"0.5"`` or ``true``
    is no float; floats finite; at most ``MAX_STOP_STRINGS`` stop strings of at most
    ``MAX_STOP_CHARS`` characters).  None = the engine's default.  The simulated engine has no
    model: its tokens do not depend on them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    ignore_eos: StrictBool | None = None  # vLLM's extension: generate exactly max_tokens tokens
    # vLLM's documented extensions (its OpenAI server takes them too)
    top_k: StrictInt | None = Field(default=None, ge=-1, description="-1 or 0: all tokens")
    min_p: StrictFloat | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(default=None,
                                                                           max_length=MAX_STOP_TOKEN_IDS)
    min_tokens: StrictInt | None = Field(default=None, ge=0)
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(strings)}")
        for s in strings:
            if not s:
                raise ValueError("a stop sequence cannot be empty")
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
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "min_tokens": "min_tokens",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
}


class EngineOptions(BaseModel):
    """What a request asks of the engine's output, in vLLM's terms (the ingress maps each
    endpoint's own fields onto these: ``n``; completions' ``logprobs`` and chat's ``logprobs`` +
    ``top_logprobs``; ``echo`` with logprobs; ``logit_bias`` keyed by token id strings;
    ``response_format``).  A backend that cannot honour one refuses the request
    (`replica.backend.BACKEND_OPTIONS`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(default=1, ge=1, le=MAX_N, description="completions (choices) to generate")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="per generated token: the sampled token's logprob and this many top ones")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                        description="the same for every prompt token")
    logit_bias: dict[int, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS,
                                                description="token id -> bias added to its logit, in [-100, 100]")
    json_object: bool = Field(default=False, description="the output is a JSON object")
    json_schema: dict[str, Any] | None = Field(default=None, description="the output follows this JSON schema")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        for token, value in (bias or {}).items():
            if token < 0 or not -100.0 <= value <= 100.0 or not math.isfinite(value):
                raise ValueError(f"logit_bias: token ids >= 0 and biases in [-100, 100], got {token}: {value}")
        return bias

    @property
    def asked(self) -> set[str]:
        """The options set to other than their defaults (what a backend must support)."""
        fields = type(self).model_fields
        return {name for name in self.model_fields_set if getattr(self, name) != fields[name].default}

    def to_vllm(self) -> dict[str, Any]:
        """vLLM ``SamplingParams`` keyword arguments, but for structured outputs: ``json_object``
        and ``json_schema`` are given back under ``"structured_outputs"`` as the keyword
        arguments of vLLM's ``StructuredOutputsParams`` (the backend builds it: this module
        imports no vLLM)."""
        out: dict[str, Any] = {"n": self.n}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        if self.logit_bias:
            out["logit_bias"] = dict(self.logit_bias)
        if self.json_schema is not None:
            out["structured_outputs"] = {"json": self.json_schema}
        elif self.json_object:
            out["structured_outputs"] = {"json_object": True}
        return out


# ---------------------------------------------------------------------------------------- request

@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation request as the ingress sends it to a replica (through a DeploymentHandle,
    so the router sees it): the prompt as token ids (tokenized once, at the ingress), the
    completion limit (per choice), the tier, the sampling fields, the output options, and the
    prompt's prefix signal for the router: ``prefix_hashes``, the chained hashes of its full
    blocks of ``prefix_block_tokens`` tokens (`replica.prefix_hash.chained_block_hashes`,
    computed once by the ingress when ``router.prefix_block_tokens`` is on; () and 0: none).
    Engines ignore them (vLLM hashes its own KV blocks); a retry keeps them (`with_request_id`)."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    tier: TierFacts
    sampling: SamplingFields = field(default_factory=SamplingFields)
    options: EngineOptions = field(default_factory=EngineOptions)
    prefix_hashes: tuple[int, ...] = ()
    prefix_block_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a request needs a request_id")
        if not self.prompt_token_ids:
            raise ValueError(f"{self.request_id}: the prompt is empty")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"{self.request_id}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.prefix_hashes or self.prefix_block_tokens:
            self._check_prefix()

    def _check_prefix(self) -> None:
        block = self.prefix_block_tokens
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"{self.request_id}: prefix_block_tokens must be an integer >= 0, got {block!r}")
        hashes = self.prefix_hashes
        if not isinstance(hashes, tuple):
            hashes = tuple(hashes)
            object.__setattr__(self, "prefix_hashes", hashes)
        if hashes and block == 0:
            raise ValueError(f"{self.request_id}: prefix_hashes need a prefix_block_tokens >= 1")
        if block and len(hashes) > len(self.prompt_token_ids) // block:
            raise ValueError(f"{self.request_id}: {len(hashes)} prefix hashes for a prompt of "
                             f"{len(self.prompt_token_ids)} tokens, which has "
                             f"{len(self.prompt_token_ids) // block} full blocks of {block}")
        if not all(type(h) is int and 0 <= h < 1 << 64 for h in hashes):
            raise ValueError(f"{self.request_id}: prefix hashes must be integers in [0, 2**64)")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def with_request_id(self, request_id: str) -> GenerateRequest:
        """The same request under another engine request id (a retry on another replica)."""
        return replace(self, request_id=request_id)


# ------------------------------------------------------------------------------------------ chunk

FINISH_REASONS = ("length", "stop", "abort")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's logprob as the engine gives it: its id, its text (None: the engine did not
    detokenize it; the receiver decodes the id), its logprob, and ``top``: the candidates the engine
    reports at that position, in its order (the sampled token first when it is not among the top
    ones, as vLLM orders them), each (id, text or None, logprob)."""

    token_id: int
    token: str | None
    logprob: float
    top: tuple[tuple[int, str | None, float], ...] = ()


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What a replica stream yields as tokens are produced.

    ``num_tokens``: completion tokens produced so far for this choice (cumulative; a chunk may
    carry several); ``index``: the choice (0 .. n-1); ``text``: the text of the new tokens (None
    from a backend without a detokenizer, the simulated engine, whose tokens have no text);
    ``token_ids``: their ids (empty when the backend has none); ``logprobs``: one `TokenLogprob` per
    new token when asked for; ``prompt_logprobs``: one per prompt token (the first None), on the
    first chunk of a request that asked for them; ``finish_reason``: None until the last chunk of
    the choice, then ``"length"`` (max_tokens reached), ``"stop"`` (EOS or a stop string) or
    ``"abort"`` (the engine gave up on the request, e.g. its scheduler rejected it; ``stop_reason``
    says why); ``stop_reason``: the stop string that ended it, or the abort reason;
    ``num_cached_tokens``: the prompt tokens the engine found in its prefix cache (vLLM's
    ``RequestOutput.num_cached_tokens``), on each choice's first chunk (None: not reported in this
    chunk).  Before the first token a replica sends heartbeats (`heartbeat`: no tokens)."""

    num_tokens: int
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None
    index: int = 0
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def merge(cls, chunks: Sequence[StreamChunk]) -> StreamChunk:
        """One chunk for consecutive ``chunks`` of one choice (what a client would have read from
        them, in one message): the last one's count and finish, the texts, token ids and logprobs
        joined, the first prompt logprobs and cached-token count given."""
        if not chunks:
            raise ValueError("nothing to merge")
        if len(chunks) == 1:
            return chunks[0]
        first, last = chunks[0], chunks[-1]
        if any(c.index != first.index for c in chunks):
            raise ValueError("chunks of different choices do not merge")
        texts = [c.text for c in chunks]
        logprobs = [c.logprobs for c in chunks]
        joined_logprobs = None if all(lp is None for lp in logprobs) else tuple(e for lp in logprobs for e in lp or ())
        return cls(num_tokens=last.num_tokens,
                   text=None if all(t is None for t in texts) else "".join(t or "" for t in texts),
                   finish_reason=last.finish_reason, stop_reason=last.stop_reason, index=first.index,
                   token_ids=tuple(t for c in chunks for t in c.token_ids), logprobs=joined_logprobs,
                   prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None),
                   num_cached_tokens=next((c.num_cached_tokens for c in chunks if c.num_cached_tokens is not None),
                                          None))

    @classmethod
    def heartbeat(cls) -> StreamChunk:
        """A chunk with no token: the replica has the request and is alive (it sends one at once
        and then regularly until the first token); a receiver skips it."""
        return cls(num_tokens=0)

    @property
    def is_heartbeat(self) -> bool:
        return self.num_tokens == 0 and self.finish_reason is None and self.prompt_logprobs is None
