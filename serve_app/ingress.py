"""The HTTP ingress: an OpenAI-compatible FastAPI app in a Serve deployment (`Ingress`).

HTTP -> Ingress -> DeploymentHandle -> `replica.deployment.LLMReplica` (routed by
`router.ray_router.TierAwareRouter`, which reads tier and prompt length from the
`replica.contract.GenerateRequest`; Serve's HTTP proxy would give the router no body, hence this
hop).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming SSE or one JSON with
``usage``), ``GET /v1/models``, ``GET /health``.

One request, by job:

1. auth: the tier comes only from the API key (``Authorization: Bearer KEY`` ->
   `serve_app.auth.KeyStore`; 401 otherwise); body fields such as ``priority``, ``vllm_xargs``,
   ``user`` or ``tier`` are accepted and ignored, so a client can never choose its tier.  The
   resolved tier is returned in the ``x-tier`` header.
2. admission (`serve_app.admission`): from the replicas' latest snapshots (`FeedbackPoller`) and
   what this ingress has in flight, admit or shed: 429, OpenAI error JSON with type
   ``server_overloaded`` and code ``overloaded``, a ``Retry-After`` header, counted as a rejection
   with reason ``overload``.
3. parse (`serve_app.openai_api`): body, validation, the prompt tokenized once (its length
   routes the request, its token ids go to the engine); 4xx with OpenAI's error JSON.
4. serve: a `GenerateRequest` to a replica; the replica stream is opened by reading its first
   chunk (`serve_app.stream`): Serve's backpressure (``BackPressureError`` when more than
   ``max_queued_requests`` requests wait for a replica slot) becomes a 429, never a 500, and a
   request whose replica died before its first token is retried on another replica; the
   response headers of a stream therefore go out with its first token.
5. render (`serve_app.render`): SSE events or one JSON body.  A client that disconnects has its
   replica stream cancelled, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from replica.contract import GenerateRequest, StreamChunk
from router.feedback import ReplicaFeedback
from serve_app.admission import AdmissionPolicy, Decision, DelayHistory, InFlight
from serve_app.auth import AuthError, KeyStore
from serve_app.cluster_feedback import FeedbackPoller
from serve_app.config import AppConfig
from serve_app.metrics import IngressMetrics, RequestTimer, tier_slos
from serve_app.openai_api import ParsedRequest, RequestError, RequestParser, overload_error
from serve_app.render import DONE_EVENT, Renderer
from serve_app.stream import DEFAULT_RETRIES, ReplicaStream, is_replica_death, open_replica_stream, retry_request_id
from serve_app.tokenizer import Tokenizer, tokenizer_for

__all__ = ["DEFAULT_MAX_CONTEXT_TOKENS", "Ingress", "app"]

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_CONTEXT_TOKENS = 8192


class EngineAbort(Exception):
    """The engine finished a request with finish reason "abort" (e.g. its scheduler rejected it)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "no reason given")

    def to_request_error(self) -> RequestError:
        return RequestError(500, f"the engine aborted the request: {self}", type="server_error", code="engine_abort")


def _replica_failed() -> RequestError:
    return RequestError(500, "the replica failed to serve the request", type="server_error", code="internal_error")


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
        self.parser = RequestParser(tokenizer=self.tokenizer, model_name=self.model_name,
                                    max_context_tokens=self.max_context_tokens,
                                    max_request_bytes=self.config.max_request_bytes,
                                    default_max_tokens=self.config.default_max_tokens)
        self.renderers = {chat: Renderer(self.model_name, self.tokenizer, chat=chat) for chat in (False, True)}
        self.tiers = {t.name: t.facts() for t in self.config.tiers}
        # Prometheus metrics (serve_app.metrics): None when TIERED_METRICS=0
        self.metrics: IngressMetrics | None = IngressMetrics.create(tier_slos(self.config.tiers))
        # Overload control (serve_app.admission): None when admission.enabled is false
        self.admission: AdmissionPolicy | None = (AdmissionPolicy.from_app_config(self.config)
                                                  if self.config.admission.enabled else None)
        self.in_flight = InFlight()
        self.delay_history = DelayHistory(self.config.admission.delay_window_s)
        adm = self.config.admission
        self.poller = FeedbackPoller(
            replicas, period_s=self.admission.feedback_period_s if self.admission else 1.0,
            timeout_s=self.admission.feedback_timeout_s if self.admission else 5.0,
            idle_s=adm.max_feedback_age_s, forget_after_s=2 * adm.max_feedback_age_s, tbt_window_s=adm.tbt_window_s,
            num_replicas=self.config.replicas.num_replicas, busy=lambda: len(self.in_flight) > 0)
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
        self.poller.on_request()
        p = self.poller
        return self.admission.admit(tier, p.feedback.values(), self.in_flight, history=p.tbt_history,
                                    delays=self.delay_history, num_replicas=p.num_replicas)

    async def poll_feedback_once(self, timeout_s: float = 5.0) -> list[ReplicaFeedback]:
        """One poll of every running replica (`FeedbackPoller.poll_once`); tests and operators."""
        return await self.poller.poll_once(timeout_s)

    def _shed(self, tier: str, message: str, retry_after_s: int, headers: dict[str, str]) -> JSONResponse:
        return self._reject(overload_error(message), tier, {**headers, "retry-after": str(int(retry_after_s))})

    def _backpressure_retry_s(self, e: BackPressureError) -> int:
        cfg = self.config.admission
        if e.retry_after_s is not None:
            return max(cfg.min_retry_after_s, math.ceil(e.retry_after_s))
        if self.admission is not None:
            p = self.poller
            return self.admission.retry_after_s(self.admission.assess(
                p.feedback.values(), self.in_flight, history=p.tbt_history, num_replicas=p.num_replicas))
        return cfg.min_retry_after_s

    # --- one request ----------------------------------------------------------------------------
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
            parsed = self.parser.parse(await self.parser.read(request), chat=chat)
        except RequestError as e:
            return self._reject(e, tier, headers)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen_request = GenerateRequest(request_id=rid, prompt_token_ids=parsed.prompt_token_ids,
                                      max_tokens=parsed.max_tokens, tier=self.tiers[tier],
                                      sampling=parsed.body.sampling)
        handle = self.replicas.options(stream=True)

        def call_replica(attempt: int) -> Any:
            req = gen_request if attempt == 0 else gen_request.with_request_id(retry_request_id(rid, attempt))
            return handle.generate.remote(req)

        self.in_flight.add(rid, tier, parsed.prompt_len)
        try:
            stream = await open_replica_stream(call_replica, request_id=rid)
        except BackPressureError as e:
            self.in_flight.done(rid)
            logger.info("request %s shed by Serve's backpressure: %s", rid, e)
            return self._shed(tier, f"The server is overloaded: {e}", self._backpressure_retry_s(e), headers)
        except asyncio.CancelledError:  # client gone: open_replica_stream cancelled the replica stream
            self.in_flight.done(rid)
            self._timer(tier, start).finish("cancelled")
            raise
        t_first = time.perf_counter()
        timer = self._timer(tier, start)
        if stream.first is not None and stream.error is None:
            self.in_flight.first_token(rid)
            timer.tokens(stream.first.num_tokens, t_first)
        if parsed.body.stream:
            def release() -> None:  # what _sse's `finally` does (idempotent), for a body never iterated
                self.in_flight.done(rid)
                if not timer.finished:
                    stream.cancel()  # client gone: abort the engine request
                    timer.finish("cancelled")

            include_usage = bool((parsed.body.stream_options or {}).get("include_usage"))
            return _SSEResponse(self._sse(stream, rid, parsed, include_usage, timer), on_close=release,
                                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

        async def restart(attempts_used: int) -> ReplicaStream:
            # a non-streaming request whose replica died mid-generation: nothing reached its client
            # yet, so it starts over (a new request id) on another replica, within the retry budget
            again = await open_replica_stream(lambda a: call_replica(attempts_used + a),
                                              retries=max(0, DEFAULT_RETRIES - attempts_used), request_id=rid)
            again.attempts += attempts_used
            return again

        try:
            return await self._complete(stream, rid, parsed, timer, headers, restart=restart)
        finally:
            self.in_flight.done(rid)

    def _timer(self, tier: str, start: float) -> RequestTimer:
        return self.metrics.admitted(tier, start) if self.metrics is not None else RequestTimer(None, start)

    async def _complete(self, stream: ReplicaStream, rid: str, parsed: ParsedRequest, timer: RequestTimer,
                        headers: dict[str, str], *,
                        restart: Callable[[int], Awaitable[ReplicaStream]] | None = None) -> JSONResponse:
        """The non-streaming response: every chunk read, one JSON body.  If the replica dies
        mid-generation and ``restart`` is given, the request starts over on another replica while
        the retry budget lasts (`serve_app.stream`; the client has received nothing yet)."""
        renderer = self.renderers[parsed.chat]
        while True:
            died: BaseException | None = None
            try:
                n = 0
                parts = []
                finish = "length"
                last: StreamChunk | None = None
                async for chunk in stream:
                    parts.append(renderer.text(chunk, n))
                    n = chunk.num_tokens
                    timer.tokens(n)  # a restarted request counts only tokens past the ones already seen
                    finish = chunk.finish_reason or finish
                    last = chunk
                if finish == "abort":
                    raise EngineAbort(last.stop_reason if last is not None else None)
            except asyncio.CancelledError:
                stream.cancel()  # client gone: abort the engine request
                timer.finish("cancelled")
                raise
            except EngineAbort as e:
                logger.warning("request %s aborted by the engine: %s", rid, e)
                timer.finish("aborted")
                return _error_response(e.to_request_error(), headers)
            except Exception as e:  # noqa: BLE001
                stream.cancel()
                if restart is None or stream.attempts > DEFAULT_RETRIES or not is_replica_death(e):
                    logger.warning("request %s failed: %r", rid, e)
                    timer.finish("error")
                    return _error_response(_replica_failed(), headers)
                died = e
            if died is None:
                break
            logger.warning("request %s: its replica died after %d tokens (%s); starting over on another "
                           "replica", rid, n, type(died).__name__)
            try:
                stream = await restart(stream.attempts)
            except asyncio.CancelledError:
                timer.finish("cancelled")
                raise
            except Exception as e:  # noqa: BLE001 - e.g. Serve's backpressure on the way back in
                logger.warning("request %s failed to restart: %r", rid, e)
                timer.finish("error")
                return _error_response(_replica_failed(), headers)
        timer.finish("completed")
        body = renderer.response(rid, "".join(parts), finish, parsed.prompt_len, n)
        return JSONResponse(body, headers=headers)

    async def _sse(self, stream: ReplicaStream, rid: str, parsed: ParsedRequest, include_usage: bool,
                   timer: RequestTimer) -> AsyncIterator[str]:
        renderer = self.renderers[parsed.chat]
        chat = parsed.chat
        created = int(time.time())
        n = 0
        done = False
        try:
            if chat:
                yield renderer.chunk_event(rid, created, "", None, first=True)
            finish = "length"
            async for c in stream:
                text = renderer.text(c, n)
                n = c.num_tokens
                timer.tokens(n)
                finish = c.finish_reason or finish
                if finish == "abort":
                    raise EngineAbort(c.stop_reason)
                if text or not c.finished:
                    yield renderer.chunk_event(rid, created, text, None)
            yield renderer.chunk_event(rid, created, None if chat else "", finish)
            if include_usage:
                yield renderer.usage_event(rid, created, parsed.prompt_len, n)
            timer.finish("completed")
            yield DONE_EVENT
            done = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.warning("stream %s failed: %r", rid, e)
            timer.finish("aborted" if isinstance(e, EngineAbort) else "error")
            err = e.to_request_error() if isinstance(e, EngineAbort) else _replica_failed()
            yield renderer.error_event(err)
            yield DONE_EVENT
            done = True
        finally:
            self.in_flight.done(rid)
            if not done:
                stream.cancel()  # client disconnected mid-stream: abort the engine request
                timer.finish("cancelled")  # (a no-op if the stream had already finished)
