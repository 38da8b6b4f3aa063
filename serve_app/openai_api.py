"""The OpenAI request side of the ingress: request schemas, errors, and parsing a body into what a
replica needs (pure: no Ray).

`RequestParser.read(request)` reads a body under ``max_request_bytes`` (413 past it) within
``body_timeout_s`` (408 past it: a client that trickles its body holds an ingress slot no longer);
`RequestParser.validate(body, chat=...)` decodes and validates it (a request model);
`RequestParser.prepare(request, tier=...)` checks it against the tier that serves it and the
backend's abilities and renders and tokenizes the prompt once: a `ParsedRequest` (the validated
request, the prompt's token ids, the resolved ``max_tokens``, the `replica.contract.EngineOptions`
it asks for, how to render it); `parse` is both.  Errors are `RequestError`, rendered as OpenAI's
error JSON.

Nothing a client sends is dropped: every field is honoured or refused.  The request models declare
what is served: OpenAI's fields and vLLM's documented extensions (the sampling fields are
`replica.contract.SamplingFields`, inherited: adding one there adds it here).  A field in `REFUSED`
(known, not served: ``tools``, ``suffix``, vLLM's ``vllm_xargs``, ...) is a 400 naming it and why,
unless sent as "nothing" (`_ABSENT`: ``"tools": []``); any other field is a 400 naming it
(``unknown_parameter``), as is a message field or a content part this server cannot honour.  A
field the backend cannot honour (`replica.backend.BACKEND_REFUSES`: the simulated engine has no
model) is a 400 naming the API parameter (``unsupported_parameter``).

Prompts as vLLM's OpenAI server builds them (`serve_app.tokenizer`): chat messages rendered with
the chat template (content parts: text joined by newlines), encoded without special tokens;
completions prompts encoded with them (``add_special_tokens`` overrides either).

400 also for: invalid JSON (also nested too deeply, or a string holding a lone UTF-16 surrogate);
wrong types, checked strictly as OpenAI does (``"8"``, ``true`` or ``8.0`` is no integer);
out-of-range or non-finite numbers; more than 4 stop strings, one over 256 characters or empty;
``max_tokens`` <= 0 or over the tier's ``max_tokens``; ``ignore_eos`` where the tier does not allow
it; ``n`` > 1 with temperature 0 (vLLM's rule); ``top_logprobs`` without ``logprobs``;
``logit_bias`` or ``stop_token_ids`` naming a token outside the vocabulary; several prompts; token
ids outside the vocabulary; an empty prompt; a chat template that fails (or none); prompt +
``max_tokens`` over the context (without ``max_tokens`` a request gets ``default_max_tokens``, the
tier's cap or what the context leaves, whichever is least); ``min_tokens`` over ``max_tokens``.
404 unknown model.

Cheap refusal before work: a prompt whose UTF-8 length alone proves it longer than the context
(`serve_app.tokenizer.Tokenizer.min_tokens`) is refused without tokenizing it; a prompt is
tokenized on the event loop only when short (``INLINE_TOKENIZE_BYTES``), else in a thread of its
tier's own (one per tier: a flood of long free prompts does not delay a premium one).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from starlette.requests import Request

from replica.contract import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, EngineOptions, SamplingFields
from serve_app.config import ServingTier
from serve_app.tokenizer import ChatTemplateError, Tokenizer

INLINE_TOKENIZE_BYTES = 16 * 1024  # shorter prompts are tokenized on the event loop (well under 10 ms)

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ParsedRequest", "RequestError",
           "RequestParser", "overload_error"]


# -------------------------------------------------------------------------------------- schemas

SERVICE_TIERS = ("auto", "default", "flex", "priority")  # OpenAI's values of service_tier

# Fields of OpenAI's API (and of vLLM's extensions) that this server knows but does not serve:
# a request that sets one (to anything but "nothing") is refused with this reason, never ignored.
REFUSED: dict[str, str] = {
    # OpenAI's
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported (vLLM removed it); use n",
    "tools": "tools (function calling) are not supported by this server",
    "tool_choice": "tool_choice needs tools, which are not supported by this server",
    "functions": "functions (function calling) are not supported by this server",
    "function_call": "function_call (function calling) is not supported by this server",
    "parallel_tool_calls": "parallel_tool_calls needs tools, which are not supported by this server",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "this model does not reason",
    "verbosity": "verbosity is not supported", "web_search_options": "web search is not supported",
    "store": "responses are not stored", "metadata": "metadata needs store, which is not supported",
    "prompt_cache_key": "prompt_cache_key is not supported (prefix caching needs no key)",
    "safety_identifier": "safety_identifier is not supported; use user",
    # vLLM's extensions this server does not honour
    "priority": "priority is not accepted: a request's tier comes from its API key (see service_tier)",
    "vllm_xargs": "vllm_xargs is not accepted: a request's tier comes from its API key",
    "kv_transfer_params": "disaggregated prefill is not supported", "ec_transfer_params": "not supported",
    "request_id": "request ids are the server's", "cache_salt": "cache_salt is not supported",
    "chat_template": "the chat template is the server's (engine.chat_template in the app config)",
    "chat_template_kwargs": "chat_template_kwargs are not supported", "documents": "documents are not supported",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "prompt_embeds": "prompt embeddings are not supported", "prompt_logprobs": "use echo with logprobs",
    "structured_outputs": "use response_format", "guided_json": "use response_format",
    "guided_regex": "not supported; use response_format", "guided_choice": "not supported; use response_format",
    "guided_grammar": "not supported; use response_format", "guided_decoding_backend": "not supported",
    "use_beam_search": "beam search is not supported", "length_penalty": "beam search is not supported",
    "truncate_prompt_tokens": "prompts are never truncated (a prompt over the context is a 400)",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "bad_words": "bad_words is not supported; use logit_bias", "logits_processors": "not supported",
    "return_tokens_as_token_ids": "not supported", "return_token_ids": "not supported",
    "logprob_token_ids": "not supported; use logprobs", "thinking_token_budget": "this model does not reason",
    "include_reasoning": "this model does not reason", "repetition_detection": "not supported",
}
# The "nothing" values a request may give a refused field (accepted as absent)
_ABSENT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "store": (None, False),
    "metadata": (None, {}), "functions": (None, []), "function_call": (None, "none"), "modalities": (None, ["text"]),
    "use_beam_search": (None, False), "priority": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
    "length_penalty": (None, 1.0), "chat_template_kwargs": (None, {}), "documents": (None, []),
    "return_token_ids": (None, False), "return_tokens_as_token_ids": (None, False),
    "include_reasoning": (None, True), "bad_words": (None, []), "allowed_token_ids": (None, []),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None  # vLLM's extension: usage on every chunk


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class OpenAIRequest(SamplingFields):
    """Fields common to both endpoints: OpenAI's, and vLLM's documented sampling extensions
    (`replica.contract.SamplingFields`, inherited).  Numbers and booleans are strict, as OpenAI's
    API has them: ``"16"``, ``true`` or ``16.0`` for ``max_tokens`` is a 400, not 16 or 1; floats
    must be finite.  Any other field is a 400 naming it (`REFUSED` says why for the ones this
    server knows); nothing a client sends is ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    user: str | None = Field(default=None, max_length=256)  # OpenAI's end-user id: logged with the key id
    logit_bias: dict[str, StrictFloat | StrictInt] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    add_special_tokens: StrictBool | None = None  # vLLM's extension

    @property
    def sampling(self) -> SamplingFields:
        return SamplingFields.of(self)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[Annotated[StrictInt, Field(ge=0)]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    """A chat message: ``role`` (system, developer, user, assistant), ``content`` (a string, or
    parts of which only text parts are served), an optional ``name``."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True  # vLLM's extension
    continue_final_message: StrictBool = False  # vLLM's extension
    echo: StrictBool = False  # vLLM's extension: the response starts with the final assistant message


# --------------------------------------------------------------------------------------- errors

class RequestError(Exception):
    """A request rejected before it reaches a replica; rendered as OpenAI's error JSON."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def overload_error(message: str) -> RequestError:
    """The 429 of a shed request (OpenAI's error JSON; the caller adds ``Retry-After``)."""
    return RequestError(429, message, type="server_overloaded", code="overloaded")


# -------------------------------------------------------------------------------------- parsing

# The API parameter that sets each engine field (for the 400 of a backend that cannot honour it)
_OPTION_PARAMS = {"n": "n", "logprobs": "logprobs", "prompt_logprobs": "echo", "logit_bias": "logit_bias",
                  "json_object": "response_format", "json_schema": "response_format"}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A valid request: the validated body, whether it is a chat request, the prompt's token ids,
    the completion limit it resolves to (per choice), what it asks of the engine's output
    (``options``), and how to render it: ``echo_text`` (the text a response starts with: the
    prompt of a completions request with ``echo``, the final assistant message of a chat request
    with ``echo``; None: nothing), ``echo_token_ids`` (the prompt tokens a completions ``echo``
    with ``logprobs`` reports), ``top_logprobs`` (top candidates per token in the response's
    logprobs; None: no logprobs)."""

    body: CompletionRequest | ChatCompletionRequest
    chat: bool
    prompt_token_ids: list[int]
    max_tokens: int
    options: EngineOptions = EngineOptions()
    echo_text: str | None = None
    top_logprobs: int | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def n(self) -> int:
        return self.options.n

    @property
    def max_completion_tokens(self) -> int:
        """The most tokens the request may generate, all choices together."""
        return self.options.n * self.max_tokens


class RequestParser:
    """Reads and parses requests for one model.  ``refuses``: what the backend cannot honour
    (`replica.backend.BACKEND_REFUSES`: contract field -> why)."""

    def __init__(self, *, tokenizer: Tokenizer, model_name: str, max_context_tokens: int, max_request_bytes: int,
                 default_max_tokens: int, body_timeout_s: float = 10.0,
                 refuses: Mapping[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context_tokens = int(max_context_tokens)
        self.max_request_bytes = int(max_request_bytes)
        self.default_max_tokens = int(default_max_tokens)
        self.body_timeout_s = float(body_timeout_s)
        self.refuses = dict(refuses or {})
        self._executors: dict[str, ThreadPoolExecutor] = {}

    async def read(self, request: Request) -> bytes:
        """The request body; 413 as soon as it (or its declared length) passes the limit, 408 when
        it has not all arrived within ``body_timeout_s``."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                               code="request_timeout") from None
        return bytes(body)

    def validate(self, body: bytes, *, chat: bool) -> CompletionRequest | ChatCompletionRequest:
        """The body as a request model: 400 for anything malformed, unknown or refused (`REFUSED`),
        404 for another model.  No tokenizing."""
        try:
            text = _decode_body(body)
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"invalid JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise RequestError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object", code="invalid_json")
        bad = _lone_surrogate_path(text, data)
        if bad is not None:
            key = bad.split(".", 1)[0]
            raise RequestError(400, f"{bad}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                               "which is not valid Unicode", param=key if key in data else None,
                               code="invalid_json")
        model_cls = ChatCompletionRequest if chat else CompletionRequest
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise RequestError(400, msg, param=param, code="invalid_value") from None
        _refuse_extras(req.model_extra, "", chat=chat)
        if req.model != self.model_name:
            raise RequestError(404, f"The model `{req.model}` does not exist. Available: {self.model_name}",
                               param="model", code="model_not_found")
        return req

    async def parse(self, body: bytes, *, chat: bool, tier: ServingTier) -> ParsedRequest:
        """`validate`, then `prepare` for ``tier``."""
        return await self.prepare(self.validate(body, chat=chat), tier=tier)

    async def prepare(self, req: CompletionRequest | ChatCompletionRequest, *, tier: ServingTier) -> ParsedRequest:
        """A validated request checked against ``tier``'s caps (the tier that serves it) and the
        backend's abilities, its prompt rendered and tokenized as vLLM's OpenAI server does it
        (`serve_app.tokenizer`)."""
        chat = isinstance(req, ChatCompletionRequest)
        max_tokens = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if max_tokens is not None and max_tokens <= 0:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                               code="invalid_value")
        if max_tokens is not None and tier.max_tokens is not None and max_tokens > tier.max_tokens:
            raise RequestError(400, f"max_tokens {max_tokens} is over the {tier.name} tier's limit of "
                               f"{tier.max_tokens}", param="max_tokens", code="invalid_value")
        if req.ignore_eos and not tier.allow_ignore_eos:
            raise RequestError(400, f"ignore_eos is not allowed for the {tier.name} tier", param="ignore_eos",
                               code="invalid_value")
        options, top_logprobs = self._options(req)
        self._check_backend(req, options)
        param = "messages" if chat else "prompt"
        ctx = self.max_context_tokens
        echo_text: str | None = None
        if isinstance(req, ChatCompletionRequest):
            messages = chat_messages(req.messages)
            if req.echo and messages[-1]["role"] == "assistant":
                echo_text = messages[-1]["content"] or None
            if req.add_generation_prompt and req.continue_final_message:
                raise RequestError(400, "continue_final_message and add_generation_prompt cannot both be true "
                                   "(send add_generation_prompt: false to continue the final message)",
                                   param="continue_final_message", code="invalid_value")
            try:
                prompt: str | list[int] = self.tokenizer.render_chat(
                    messages, add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message)
            except ChatTemplateError as e:
                raise RequestError(400, str(e), param="messages", code="invalid_value") from None
            add_special = False if req.add_special_tokens is None else req.add_special_tokens
        else:
            prompt = self._completion_prompt(req)
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            if req.echo:
                echo_text = prompt if isinstance(prompt, str) else self.tokenizer.hf.decode(prompt)
        if isinstance(prompt, str):
            num_bytes = len(prompt.encode("utf-8"))
            at_least = self.tokenizer.min_tokens(num_bytes)
            if at_least >= ctx:  # refused before any tokenizing: the length alone proves it
                raise RequestError(400, f"This model's maximum context length is {ctx} tokens; the prompt has at "
                                   f"least {at_least} tokens ({num_bytes} bytes), which leaves no room for a "
                                   "completion", param=param, code="context_length_exceeded")
            prompt_ids = await self._encode(prompt, tier.name, num_bytes, add_special)
        else:
            prompt_ids = prompt
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise RequestError(400, "the prompt is empty", param=param, code="invalid_value")
        if prompt_len >= ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                               f"{prompt_len} tokens, which leaves no room for a completion", param=param,
                               code="context_length_exceeded")
        if max_tokens is None:
            caps = (self.default_max_tokens, ctx - prompt_len, tier.max_tokens or self.default_max_tokens)
            max_tokens = min(caps)
        elif prompt_len + max_tokens > ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                               f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the "
                               f"completion). Please reduce the length of the {param} or completion.",
                               param="max_tokens", code="context_length_exceeded")
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise RequestError(400, f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens})",
                               param="min_tokens", code="invalid_value")
        return ParsedRequest(req, chat, prompt_ids, int(max_tokens), options, echo_text, top_logprobs)

    # --- the request's output options -----------------------------------------------------------
    def _options(self, req: CompletionRequest | ChatCompletionRequest) -> tuple[EngineOptions, int | None]:
        """The engine options the request asks for, and the top logprobs to render per token."""
        vocab = self.tokenizer.vocab_size
        values: dict[str, Any] = {}
        if req.n != 1:
            if req.temperature == 0:  # vLLM's rule: greedy choices would all be the same
                raise RequestError(400, f"n must be 1 when using greedy sampling (temperature 0), got {req.n}",
                                   param="n", code="invalid_value")
            values["n"] = req.n
        top: int | None = None
        if isinstance(req, ChatCompletionRequest):
            if req.top_logprobs and not req.logprobs:
                raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                                   code="invalid_value")
            if req.logprobs:
                top = req.top_logprobs or 0
                values["logprobs"] = top
        elif req.logprobs is not None:
            top = req.logprobs
            values["logprobs"] = top
            if req.echo:
                values["prompt_logprobs"] = top
        if req.logit_bias:
            bias: dict[int, float] = {}
            for key, value in req.logit_bias.items():
                token = int(key) if key.isascii() and key.isdigit() else None
                if token is None or token >= vocab:
                    raise RequestError(400, f"logit_bias: {key[:20]!r} is not a token id of this model "
                                       f"(0..{vocab - 1})", param="logit_bias", code="invalid_value")
                if not math.isfinite(value) or not -100 <= value <= 100:
                    raise RequestError(400, f"logit_bias[{key}]: a bias is in [-100, 100], got {value}",
                                       param="logit_bias", code="invalid_value")
                bias[token] = float(value)
            values["logit_bias"] = bias
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            values["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise RequestError(400, "response_format of type json_schema needs json_schema.schema",
                                   param="response_format.json_schema", code="invalid_value")
            values["json_schema"] = fmt.json_schema.json_schema
        for t in req.stop_token_ids or ():
            if t >= vocab:
                raise RequestError(400, f"stop_token_ids: {t} is out of the vocabulary (0..{vocab - 1})",
                                   param="stop_token_ids", code="invalid_value")
        return EngineOptions(**values), top

    def _check_backend(self, req: CompletionRequest | ChatCompletionRequest, options: EngineOptions) -> None:
        """400 for what the request asks that the backend cannot honour."""
        if not self.refuses:
            return
        asked = [(name, _OPTION_PARAMS[name]) for name in sorted(options.asked)]
        asked += [(name, name) for name in SamplingFields.model_fields if getattr(req, name) not in (None, [], "")]
        for name, param in asked:
            why = self.refuses.get(name)
            if why is not None:
                if name == "prompt_logprobs" and not isinstance(req, ChatCompletionRequest):
                    param = "echo"
                raise RequestError(400, f"{param} is not supported by this server's engine: {why}", param=param,
                                   code="unsupported_parameter")

    # --- prompts --------------------------------------------------------------------------------
    async def _encode(self, text: str, tier: str, num_bytes: int, add_special_tokens: bool) -> list[int]:
        if num_bytes <= INLINE_TOKENIZE_BYTES:
            return self.tokenizer.encode(text, add_special_tokens)
        pool = self._executors.get(tier)
        if pool is None:
            pool = self._executors[tier] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{tier}")
        return await asyncio.get_running_loop().run_in_executor(pool, self.tokenizer.encode, text, add_special_tokens)

    def _completion_prompt(self, req: CompletionRequest) -> str | list[int]:
        """The prompt as text to tokenize, or as the token ids the client sent (checked)."""
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise RequestError(400, "batched prompts are not supported: send one prompt per request",
                                   param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        ids = [int(t) for t in prompt]
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"token id {bad} is out of the vocabulary (0..{vocab - 1})", param="prompt",
                               code="invalid_value")
        return ids


def _refuse_extras(extra: Mapping[str, Any] | None, where: str, *, chat: bool) -> None:
    """400 for a field the request model does not declare: `REFUSED` says why for the ones this
    server knows (accepted only with their "nothing" value, `_ABSENT`); any other is unknown."""
    for name, value in (extra or {}).items():
        if name in REFUSED and any(type(value) is type(a) and value == a for a in _ABSENT.get(name, (None,))):
            continue
        param = f"{where}{name}"
        if name in REFUSED:
            raise RequestError(400, f"{param}: {REFUSED[name]}", param=param, code="unsupported_parameter")
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        raise RequestError(400, f"{param}: unknown parameter for {endpoint} (this server refuses what it would not "
                           "honour; the README lists every field it takes)", param=param,
                           code="unknown_parameter")


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template gets them (vLLM's "string" content format): ``role``,
    ``content`` (a list of parts becomes its text parts joined with newlines; None becomes ""),
    ``name`` when given.  400 for a part that is not text (naming its type) and for message fields
    this server does not honour (non-empty ``tool_calls``, ``audio``, ...)."""
    out = []
    for i, m in enumerate(messages):
        for name, value in (m.model_extra or {}).items():
            if value in (None, [], ""):
                continue
            why = _MESSAGE_REFUSED.get(name, "unknown message field")
            raise RequestError(400, f"messages.{i}.{name}: {why}", param=f"messages.{i}.{name}",
                               code="unsupported_parameter")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                kind = part.get("type")
                where = f"messages.{i}.content.{j}"
                if kind != "text":
                    raise RequestError(400, f"{where}.type: content parts of type {str(kind)[:40]!r} are not "
                                       "supported (this model takes text parts only)", param=f"{where}.type",
                                       code="unsupported_content")
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(400, f"{where}.text: Input should be a valid string", param=f"{where}.text",
                                       code="invalid_value")
                unknown = sorted(set(part) - {"type", "text"})
                if unknown:
                    raise RequestError(400, f"{where}.{unknown[0]}: unknown field of a text part",
                                       param=f"{where}.{unknown[0]}", code="unknown_parameter")
                texts.append(text)
            content = "\n".join(texts)
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


_MESSAGE_REFUSED = {
    "tool_calls": "tool calls need tools, which are not supported by this server",
    "tool_call_id": "tool messages need tools, which are not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio is not supported", "refusal": "refusal messages are not supported",
    "reasoning": "this model does not reason", "reasoning_content": "this model does not reason",
}


# a \uD800-\uDFFF escape: the one way a lone surrogate gets into JSON text that was decoded strictly
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _decode_body(body: bytes | bytearray) -> str:
    """The body as text, in the encoding JSON allows (UTF-8, -16 or -32, detected as `json.loads`
    does) but strictly: no surrogate code units (which `json.loads` on bytes would let through)."""
    return bytes(body).decode(json.detect_encoding(body))


def _lone_surrogate_path(text: str, data: Any) -> str | None:
    """Where in ``data`` (``text`` parsed) a string holds a lone UTF-16 surrogate (an unpaired
    ``"\\ud800"``: not Unicode text, so neither tokenizable nor printable as UTF-8): a path like
    ``messages.0.content`` (``<key>`` for a dict key), or None.  Iterative (parsed JSON nests as deep
    as the parser allows), and only run when ``text`` (strictly decoded) has a surrogate escape."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return None

    def bad(s: str) -> bool:
        if s.isascii():
            return False
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if bad(value):
                return ".".join(map(str, path))[:200]
        elif isinstance(value, dict):
            if any(bad(k) for k in value):
                return ".".join(map(str, (*path, "<key>")))[:200]
            stack.extend((v, (*path, k)) for k, v in value.items() if isinstance(v, (str, dict, list)))
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value) if isinstance(v, (str, dict, list)))
    return None


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"{param}: {err['msg']}" if param else err["msg"], param
