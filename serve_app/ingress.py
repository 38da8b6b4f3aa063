"""The HTTP ingress: an OpenAI-compatible FastAPI app in a Serve deployment (`Ingress`).

HTTP -> Ingress -> DeploymentHandle -> `replica.deployment.LLMReplica` (routed by
`router.ray_router.TierAwareRouter`, which reads tier and prompt length from the request dict;
Serve's HTTP proxy would give the router no body, hence this hop).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming SSE or one JSON with
``usage``), ``GET /v1/models``, ``GET /health``.

The tier comes only from the API key (``Authorization: Bearer KEY`` -> `serve_app.auth.KeyStore`);
body fields such as ``priority``, ``vllm_xargs``, ``user`` or ``tier`` are accepted and ignored, so
a client can never choose its tier.  The resolved tier is returned in the ``x-tier`` header.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 401 (missing or
unknown key), 400 (invalid JSON, also JSON nested too deeply or holding a lone UTF-16 surrogate;
wrong types, checked strictly as OpenAI does: ``"8"``, ``true`` or ``8.0`` is no integer; out-of-range
or non-finite numbers, ``max_tokens`` <= 0, token ids outside
the vocabulary, prompt + ``max_tokens`` over the context; without ``max_tokens`` a request gets
``default_max_tokens`` or what the context leaves), 404
(unknown model), 413 (body over ``max_request_bytes``), 429 (overload, with ``Retry-After``).  A
client that disconnects has its replica stream cancelled, which aborts the engine request.  The
prompt is tokenized once, here: its length routes the request and its token ids go to the engine.

Overload (`serve_app.admission`).  Right after the key resolves its tier, the admission policy
decides from the replicas' latest feedback snapshots and what this ingress has in flight whether
to admit the request or shed it: 429, OpenAI error JSON with type ``server_overloaded`` and code
``overloaded``, a ``Retry-After`` header (seconds), counted as a rejection with reason
``overload`` (outcome ``shed``).  The snapshots come from a background task that calls
``record_routing_stats`` on every replica each ``feedback_period_s`` while requests arrive, with
``DeploymentHandle.broadcast`` (Ray Serve's supported fan-out to all running replicas; a normal
handle call would reach one replica through the router, and the routers' own copies of the
snapshots are refreshed by the controller only every ``router.feedback_period_s``).  A replica stream is read up to its
first chunk before the response starts, so that Serve's backpressure (``BackPressureError`` when
more than ``max_queued_requests`` requests wait for a replica slot) also becomes a 429, never a
500; the response headers of a stream therefore go out with its first token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from router.feedback import FeedbackError, ReplicaFeedback
from serve_app.admission import AdmissionPolicy, Decision, DelayHistory, InFlight, TBTHistory
from serve_app.auth import AuthError, KeyStore
from serve_app.config import AppConfig
from serve_app.metrics import IngressMetrics, RequestTimer, tier_slos
from serve_app.retry import DEFAULT_RETRIES, END, is_replica_death, open_replica_stream, retry_request_id
from serve_app.tokenizer import Tokenizer, tokenizer_for

__all__ = ["DEFAULT_MAX_CONTEXT_TOKENS", "ChatCompletionRequest", "CompletionRequest", "Ingress", "app"]

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_CONTEXT_TOKENS = 8192


# -------------------------------------------------------------------------------------- schemas

class _OpenAIRequest(BaseModel):
    """Fields common to both endpoints.  Unknown fields are ignored (never a tier source).
    Numbers and booleans are strict, as OpenAI's API has them: ``"16"``, ``true`` or ``16.0`` for
    ``max_tokens`` is a 400, not 16 or 1; floats must be finite."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    # sampling (passed to vLLM's SamplingParams; the simulated engine has no model and ignores them)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    ignore_eos: StrictBool | None = None  # vLLM's extension: generate exactly max_tokens tokens
    user: str | None = None  # accepted, ignored

    def sampling(self) -> dict[str, Any]:
        fields = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "ignore_eos")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[StrictInt]
    echo: StrictBool = False
    logprobs: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class RequestError(Exception):
    """A request rejected before it reaches a replica; rendered as OpenAI's error JSON."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class EngineAbort(Exception):
    """The engine finished a request with finish reason "abort" (e.g. its scheduler rejected it)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "no reason given")

    def to_request_error(self) -> RequestError:
        return RequestError(500, f"the engine aborted the request: {self}", type="server_error", code="engine_abort")


def overload_error(message: str) -> RequestError:
    """The 429 of a shed request (OpenAI's error JSON; the caller adds ``Retry-After``)."""
    return RequestError(429, message, type="server_overloaded", code="overloaded")


_END = object()


class _Prefetched:
    """A replica stream whose first chunk (or the exception reading it raised) was already read:
    iterates that first, then the rest; ``cancel()`` cancels the stream."""

    def __init__(self, gen: Any, first: Any, error: BaseException | None = None) -> None:
        self._gen, self._first, self._error, self._pending = gen, first, error, True

    def __aiter__(self) -> _Prefetched:
        return self

    async def __anext__(self) -> Any:
        if self._pending:
            self._pending = False
            if self._error is not None:
                raise self._error
            if self._first is _END:
                raise StopAsyncIteration
            return self._first
        if self._first is _END or self._error is not None:
            raise StopAsyncIteration
        return await self._gen.__anext__()

    def cancel(self) -> None:
        self._gen.cancel()


class _SSEResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends, also when the client left
    before Starlette began iterating the body: the body generator then never starts, so its
    ``finally`` (which releases the request) never runs."""

    def __init__(self, content: Any, *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _authorization(request: Request) -> str | None:
    """The request's one Authorization header (None if absent); more than one is refused (401):
    which of them a proxy or a framework would use is not defined, so none is."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise AuthError("More than one Authorization header: send exactly one "
                        "'Authorization: Bearer YOUR_KEY'.")
    return values[0] if values else None


def _error_response(err: RequestError | AuthError, headers: dict[str, str] | None = None) -> JSONResponse:
    h = dict(getattr(err, "headers", {}) or {})
    h.update(headers or {})
    return JSONResponse(err.to_openai(), status_code=err.status_code, headers=h)


def _chat_prompt(messages: list[ChatMessage]) -> str:
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


# ------------------------------------------------------------------------------------------ app

app = FastAPI(title="tiered-llm-serve", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """OpenAI-compatible front door.  ``replicas``: a DeploymentHandle to the `LLMReplica`
    deployment; ``config``: the `AppConfig`; ``max_context_tokens``: the longest accepted prompt."""

    def __init__(self, replicas: Any, config: AppConfig | dict[str, Any],
                 max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS) -> None:
        self.config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        self.replicas = replicas
        self.keys = KeyStore.from_config(self.config)
        self.tokenizer: Tokenizer = tokenizer_for(self.config.engine)
        self.max_context_tokens = int(max_context_tokens)
        self.model_name = str(self.config.model_name)
        self.created = int(time.time())
        # Prometheus metrics (serve_app.metrics): None when TIERED_METRICS=0
        self.metrics: IngressMetrics | None = IngressMetrics.create(tier_slos(self.config.tiers))
        # Overload control (serve_app.admission): None when admission.enabled is false
        self.admission: AdmissionPolicy | None = (AdmissionPolicy.from_app_config(self.config)
                                                  if self.config.admission.enabled else None)
        self.in_flight = InFlight()
        self.feedback: dict[str, ReplicaFeedback] = {}  # replica id -> its latest snapshot
        self.tbt_history = TBTHistory(self.config.admission.tbt_window_s)
        self.delay_history = DelayHistory(self.config.admission.delay_window_s)
        self._num_replicas: int = self.config.replicas.num_replicas  # as the last poll found them
        self._poller: asyncio.Task | None = None
        self._poll_failures = 0
        self._last_request_s = time.monotonic()
        logger.info("ingress: model %s, %r, %r, context %d", self.model_name, self.keys, self.tokenizer,
                    self.max_context_tokens)

    # --- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.keys.tier_for(_authorization(request))
        except AuthError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tiered-llm-serve",
             "max_model_len": self.max_context_tokens}]})

    # --- generation -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    def _reject(self, err: RequestError | AuthError, tier: str | None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        """The error response of a request turned away before a replica (counted by reason)."""
        if self.metrics is not None:
            self.metrics.rejected(tier, err.status_code, err.code)
        return _error_response(err, headers)

    # --- overload control -----------------------------------------------------------------------
    def _admit(self, tier: str) -> Decision | None:
        """The admission decision for a request of ``tier`` (None: admission is off)."""
        if self.admission is None:
            return None
        self._last_request_s = time.monotonic()
        self._ensure_poller()
        return self.admission.admit(tier, self.feedback.values(), self.in_flight, history=self.tbt_history,
                                    delays=self.delay_history, num_replicas=self._num_replicas)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_feedback())

    async def _poll_feedback(self) -> None:
        """Every ``feedback_period_s``: every replica's snapshot, by broadcasting
        ``record_routing_stats`` (the method Serve itself polls for the routers).  Stops once no
        request came for ``max_feedback_age_s`` (the next request starts it again)."""
        assert self.admission is not None
        period, timeout = self.admission.feedback_period_s, self.admission.feedback_timeout_s
        idle_s = self.admission.config.max_feedback_age_s
        while time.monotonic() - self._last_request_s <= idle_s or len(self.in_flight):
            try:
                await self.poll_feedback_once(timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - admission goes on with older snapshots
                self._poll_failures += 1
                if self._poll_failures in (1, 10, 100) or self._poll_failures % 1000 == 0:
                    logger.warning("ingress: polling the replicas' feedback failed (%d times): %r",
                                   self._poll_failures, e)
            await asyncio.sleep(period)

    async def poll_feedback_once(self, timeout_s: float = 5.0) -> list[ReplicaFeedback]:
        """One poll of every running replica; updates the snapshots admission reads."""
        results = await self.replicas.broadcast("record_routing_stats").results_async(
            timeout_s=timeout_s, return_exceptions=True)
        fresh = []
        for r in results:
            if isinstance(r, BaseException) or not r:
                continue
            try:
                fresh.append(ReplicaFeedback.from_snapshot(r))
            except (FeedbackError, ValueError):
                continue
        if results:
            self._num_replicas = len(results)
        for fb in fresh:
            self.feedback[fb.replica_id] = fb
        self.tbt_history.add(fresh)
        if self.admission is not None:  # forget replicas whose snapshots went stale (gone)
            now = time.time()
            stale = [rid for rid, fb in self.feedback.items()
                     if now - fb.timestamp_s > 2 * self.admission.config.max_feedback_age_s]
            for rid in stale:
                del self.feedback[rid]
            if stale:
                self.tbt_history.forget(self.feedback)
        return fresh

    def _shed(self, tier: str, message: str, retry_after_s: int, headers: dict[str, str]) -> JSONResponse:
        return self._reject(overload_error(message), tier, {**headers, "retry-after": str(int(retry_after_s))})

    def _backpressure_retry_s(self, e: BackPressureError) -> int:
        cfg = self.config.admission
        if e.retry_after_s is not None:
            return max(cfg.min_retry_after_s, math.ceil(e.retry_after_s))
        if self.admission is not None:
            return self.admission.retry_after_s(self.admission.assess(
                self.feedback.values(), self.in_flight, history=self.tbt_history, num_replicas=self._num_replicas))
        return cfg.min_retry_after_s

    async def _serve(self, request: Request, *, chat: bool):
        start = time.perf_counter()  # the request's arrival, for its TTFT
        try:
            tier = self.keys.tier_for(_authorization(request))
        except AuthError as e:
            return self._reject(e, None)
        headers = {"x-tier": tier}
        decision = self._admit(tier)
        if decision is not None and not decision.admit:
            return self._shed(tier, decision.message, decision.retry_after_s or 1, headers)
        try:
            req, prompt_ids, max_tokens = await self._parse(request, chat)
        except RequestError as e:
            return self._reject(e, tier, headers)
        t = self.config.tier(tier)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        prompt_len = len(prompt_ids)
        payload = {"request_id": rid, "prompt_len": prompt_len, "prompt_token_ids": prompt_ids,
                   "max_tokens": max_tokens, "tier": tier, "tbt_slo_s": t.tbt_slo_s, "tier_rank": t.rank or 0,
                   "ttft_target_s": t.ttft_target_s,
                   "sampling": req.sampling()}
        handle = self.replicas.options(stream=True)

        def call_replica(attempt: int) -> Any:
            return handle.generate.remote(
                payload if attempt == 0 else {**payload, "request_id": retry_request_id(rid, attempt)})

        self.in_flight.add(rid, tier, prompt_len)
        # Read up to the first chunk: Serve's backpressure (max_queued_requests) surfaces here, and a
        # request whose replica died before its first chunk is sent again, to another replica
        # (serve_app.retry).
        first: Any = _END
        error: BaseException | None = None
        try:
            opened = await open_replica_stream(call_replica, request_id=rid)
            raw, error = opened.stream, opened.error
            if opened.first is not END:
                first = opened.first
        except BackPressureError as e:
            self.in_flight.done(rid)
            logger.info("request %s shed by Serve's backpressure: %s", rid, e)
            return self._shed(tier, f"The server is overloaded: {e}", self._backpressure_retry_s(e), headers)
        except asyncio.CancelledError:  # client gone: open_replica_stream cancelled the replica stream
            self.in_flight.done(rid)
            timer = self.metrics.admitted(tier, start) if self.metrics is not None else RequestTimer(None, start)
            timer.finish("cancelled")
            raise
        t_first = time.perf_counter()
        gen = _Prefetched(raw, first, error)
        timer = self.metrics.admitted(tier, start) if self.metrics is not None else RequestTimer(None, start)
        if first is not _END and error is None:
            self.in_flight.first_token(rid)
            if isinstance(first, dict) and "index" in first:
                timer.tokens(int(first["index"]), t_first)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            def release() -> None:  # what _sse's `finally` does (idempotent), for a body never iterated
                self.in_flight.done(rid)
                if not timer.finished:
                    gen.cancel()  # client gone: abort the engine request
                    timer.finish("cancelled")

            return _SSEResponse(self._sse(gen, rid, chat, prompt_len, include_usage, timer), on_close=release,
                                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        async def restart(attempts_used: int) -> tuple[_Prefetched, int]:
            # a non-streaming request whose replica died mid-generation: nothing reached its client
            # yet, so it starts over (a new request id) on another replica, within the retry budget
            again = await open_replica_stream(lambda a: call_replica(attempts_used + a),
                                              retries=max(0, DEFAULT_RETRIES - attempts_used), request_id=rid)
            first_again = _END if again.first is END else again.first
            return _Prefetched(again.stream, first_again, again.error), attempts_used + again.attempts

        try:
            return await self._complete(gen, rid, chat, prompt_len, timer, headers,
                                        restart=restart, attempts_used=opened.attempts)
        finally:
            self.in_flight.done(rid)

    async def _complete(self, gen: Any, rid: str, chat: bool, prompt_len: int, timer: RequestTimer,
                        headers: dict[str, str], *, restart: Any = None, attempts_used: int = 1) -> JSONResponse:
        """The non-streaming response: every chunk read, one JSON body.  If the replica dies
        mid-generation and ``restart`` is given, the request starts over on another replica while
        the retry budget lasts (`serve_app.retry`; the client has received nothing yet)."""
        while True:
            died: BaseException | None = None
            try:
                n = 0
                parts = []
                finish = "length"
                async for chunk in gen:
                    parts.append(self._text(chunk))
                    n = int(chunk["index"])
                    timer.tokens(n)  # a restarted request counts only tokens past the ones already seen
                    finish = chunk.get("finish_reason") or finish
                if finish == "abort":
                    raise EngineAbort(chunk.get("stop_reason"))
            except asyncio.CancelledError:
                gen.cancel()  # client gone: abort the engine request
                timer.finish("cancelled")
                raise
            except EngineAbort as e:
                logger.warning("request %s aborted by the engine: %s", rid, e)
                timer.finish("aborted")
                return _error_response(e.to_request_error(), headers)
            except Exception as e:  # noqa: BLE001
                gen.cancel()
                if restart is None or attempts_used > DEFAULT_RETRIES or not is_replica_death(e):
                    logger.warning("request %s failed: %r", rid, e)
                    timer.finish("error")
                    return _error_response(RequestError(500, "the replica failed to serve the request",
                                                        type="server_error", code="internal_error"), headers)
                died = e
            if died is None:
                break
            logger.warning("request %s: its replica died after %d tokens (%s); starting over on another "
                           "replica", rid, n, type(died).__name__)
            try:
                gen, attempts_used = await restart(attempts_used)
            except asyncio.CancelledError:
                timer.finish("cancelled")
                raise
            except Exception as e:  # noqa: BLE001 - e.g. Serve's backpressure on the way back in
                logger.warning("request %s failed to restart: %r", rid, e)
                timer.finish("error")
                return _error_response(RequestError(500, "the replica failed to serve the request",
                                                    type="server_error", code="internal_error"), headers)
        timer.finish("completed")
        text = "".join(parts)
        usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
        base = {"id": rid, "created": int(time.time()), "model": self.model_name}
        if chat:
            body = {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish}], "usage": usage}
        else:
            body = {**base, "object": "text_completion", "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage}
        return JSONResponse(body, headers=headers)

    def _text(self, chunk: dict[str, Any]) -> str:
        """A chunk's new text: the engine's (vLLM), or the simulated token's (the sim backend
        produces one token per chunk and no text)."""
        text = chunk.get("text")
        return text if text is not None else self.tokenizer.sim_token_text(int(chunk["index"]))

    async def _parse(self, request: Request, chat: bool) -> tuple[_OpenAIRequest, list[int], int]:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
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
        if chat and req.max_completion_tokens is not None:  # type: ignore[attr-defined]
            max_tokens = req.max_completion_tokens  # type: ignore[attr-defined]
        if max_tokens is not None and max_tokens <= 0:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                               code="invalid_value")
        if chat:
            prompt_ids = self.tokenizer.encode(_chat_prompt(req.messages))  # type: ignore[attr-defined]
        else:
            prompt = req.prompt  # type: ignore[attr-defined]
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                if len(prompt) != 1:
                    raise RequestError(400, "batched prompts are not supported: send one prompt per request",
                                       param="prompt", code="invalid_value")
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt_ids = self.tokenizer.encode(prompt)
            else:
                prompt_ids = [int(t) for t in prompt]
                bad = next((t for t in prompt_ids if not 0 <= t < self.tokenizer.vocab_size), None)
                if bad is not None:
                    raise RequestError(400, f"token id {bad} is out of the vocabulary (0..{self.tokenizer.vocab_size - 1})",
                                       param="prompt", code="invalid_value")
        prompt_len = len(prompt_ids)
        param = "messages" if chat else "prompt"
        if prompt_len == 0:
            raise RequestError(400, "the prompt is empty", param=param, code="invalid_value")
        ctx = self.max_context_tokens
        if prompt_len >= ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                               f"{prompt_len} tokens, which leaves no room for a completion", param=param,
                               code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, ctx - prompt_len)
        elif prompt_len + max_tokens > ctx:
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                               f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the "
                               f"completion). Please reduce the length of the {param} or completion.",
                               param="max_tokens", code="context_length_exceeded")
        return req, prompt_ids, int(max_tokens)

    async def _sse(self, gen: Any, rid: str, chat: bool, prompt_len: int, include_usage: bool,
                   timer: RequestTimer) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model_name}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        n = 0
        done = False
        try:
            if chat:
                yield chunk("", None, first=True)
            finish = "length"
            async for c in gen:
                n = int(c["index"])
                timer.tokens(n)
                finish = c.get("finish_reason") or finish
                if finish == "abort":
                    raise EngineAbort(c.get("stop_reason"))
                text = self._text(c)
                if text or not c.get("finished"):
                    yield chunk(text, None)
            yield chunk(None if chat else "", finish)
            if include_usage:
                usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            timer.finish("completed")
            yield "data: [DONE]\n\n"
            done = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.warning("stream %s failed: %r", rid, e)
            timer.finish("aborted" if isinstance(e, EngineAbort) else "error")
            err = e.to_request_error() if isinstance(e, EngineAbort) else RequestError(
                500, "the replica failed to serve the request", type="server_error", code="internal_error")
            yield f"data: {json.dumps(err.to_openai())}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            self.in_flight.done(rid)
            if not done:
                gen.cancel()  # client disconnected mid-stream: abort the engine request
                timer.finish("cancelled")  # (a no-op if the stream had already finished)
