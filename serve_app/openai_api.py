"""The OpenAI request side of the ingress: request schemas, errors, and parsing a body into what a
replica needs (pure: no Ray).

`RequestParser.read(request)` reads a body under ``max_request_bytes`` (413 past it) within
``body_timeout_s`` (408 past it: a client that trickles its body holds an ingress slot no longer);
`RequestParser.parse(body, chat=..., tier=...)` decodes and validates it and tokenizes the prompt
once: a `ParsedRequest` (the validated request, the prompt's token ids, the resolved
``max_tokens``), or a `RequestError` rendered as OpenAI's error JSON:

400 invalid JSON (also nested too deeply, or a string holding a lone UTF-16 surrogate); wrong
types, checked strictly as OpenAI does (``"8"``, ``true`` or ``8.0`` is no integer); out-of-range
or non-finite numbers; more than 4 stop strings, or one over 256 characters (OpenAI's limit: each
is checked on every output step); ``max_tokens`` <= 0 or over the tier's ``max_tokens``;
``ignore_eos`` where the tier does not allow it; ``n`` != 1; several prompts; token ids outside
the vocabulary; an empty prompt; prompt + ``max_tokens`` over the context (without ``max_tokens``
a request gets ``default_max_tokens``, the tier's cap or what the context leaves, whichever is
least).  404 unknown model.  408 a body slower than ``body_timeout_s``.  413 a body over
``max_request_bytes``.

Cheap refusal before work: a prompt whose UTF-8 length alone proves it longer than the context
(`serve_app.tokenizer.Tokenizer.min_tokens`) is refused without tokenizing it; a prompt is
tokenized on the event loop only when short (``INLINE_TOKENIZE_BYTES``), else in a thread of its
tier's own (one per tier: a flood of long free prompts does not delay a premium one).

The sampling fields are `replica.contract.SamplingFields`, which the request models inherit:
adding one there adds it here.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.requests import Request

from replica.contract import SamplingFields
from serve_app.config import ServingTier
from serve_app.tokenizer import Tokenizer

INLINE_TOKENIZE_BYTES = 16 * 1024  # shorter prompts are tokenized on the event loop (well under 10 ms)

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ParsedRequest", "RequestError",
           "RequestParser", "overload_error"]


# -------------------------------------------------------------------------------------- schemas

class OpenAIRequest(SamplingFields):
    """Fields common to both endpoints.  Unknown fields are ignored (never a tier source).
    Numbers and booleans are strict, as OpenAI's API has them: ``"16"``, ``true`` or ``16.0`` for
    ``max_tokens`` is a 400, not 16 or 1; floats must be finite."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = 1
    user: str | None = None  # accepted, ignored

    @property
    def sampling(self) -> SamplingFields:
        return SamplingFields.of(self)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[StrictInt]
    echo: StrictBool = False
    logprobs: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


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

@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A valid request: the validated body, whether it is a chat request, the prompt's token ids
    and the completion limit it resolves to."""

    body: CompletionRequest | ChatCompletionRequest
    chat: bool
    prompt_token_ids: list[int]
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class RequestParser:
    def __init__(self, *, tokenizer: Tokenizer, model_name: str, max_context_tokens: int, max_request_bytes: int,
                 default_max_tokens: int, body_timeout_s: float = 10.0) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context_tokens = int(max_context_tokens)
        self.max_request_bytes = int(max_request_bytes)
        self.default_max_tokens = int(default_max_tokens)
        self.body_timeout_s = float(body_timeout_s)
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

    async def parse(self, body: bytes, *, chat: bool, tier: ServingTier) -> ParsedRequest:
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
        if req.model != self.model_name:
            raise RequestError(404, f"The model `{req.model}` does not exist. Available: {self.model_name}",
                               param="model", code="model_not_found")
        if req.n != 1:
            raise RequestError(400, "only n=1 is supported", param="n", code="invalid_value")
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
        param = "messages" if chat else "prompt"
        ctx = self.max_context_tokens
        prompt = self._prompt(req)
        if isinstance(prompt, str):
            num_bytes = len(prompt.encode("utf-8"))
            at_least = self.tokenizer.min_tokens(num_bytes)
            if at_least >= ctx:  # refused before any tokenizing: the length alone proves it
                raise RequestError(400, f"This model's maximum context length is {ctx} tokens; the prompt has at "
                                   f"least {at_least} tokens ({num_bytes} bytes), which leaves no room for a "
                                   "completion", param=param, code="context_length_exceeded")
            prompt_ids = await self._encode(prompt, tier.name, num_bytes)
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
        return ParsedRequest(req, chat, prompt_ids, int(max_tokens))

    async def _encode(self, text: str, tier: str, num_bytes: int) -> list[int]:
        if num_bytes <= INLINE_TOKENIZE_BYTES:
            return self.tokenizer.encode(text)
        pool = self._executors.get(tier)
        if pool is None:
            pool = self._executors[tier] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{tier}")
        return await asyncio.get_running_loop().run_in_executor(pool, self.tokenizer.encode, text)

    def _prompt(self, req: CompletionRequest | ChatCompletionRequest) -> str | list[int]:
        """The prompt as text to tokenize, or as the token ids the client sent (checked)."""
        if isinstance(req, ChatCompletionRequest):
            return chat_prompt(req.messages)
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


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain chat template: one ``role: content`` line per message, then ``assistant:``.
    `RequestError` (400) for a text part whose ``text`` is not a string."""
    lines = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.get("type") != "text":
                    continue
                part = p.get("text", "")
                if not isinstance(part, str):
                    raise RequestError(400, f"messages.{i}.content.{j}.text: Input should be a valid string",
                                       param=f"messages.{i}.content.{j}.text", code="invalid_value")
                parts.append(part)
            text = "".join(parts)
        else:
            text = m.content or ""
        lines.append(f"{m.role}: {text}")
    lines.append("assistant:")
    return "\n".join(lines)


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
