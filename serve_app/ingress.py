"""The HTTP ingress: an OpenAI-compatible FastAPI app in a Serve deployment (`Ingress`).

HTTP -> Ingress -> DeploymentHandle -> `replica.deployment.LLMReplica` (routed by
`router.ray_router.TierAwareRouter`, which reads tier and prompt length from the
`replica.contract.GenerateRequest`; Serve's HTTP proxy would give the router no body, hence this
hop).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming SSE or one JSON with
``usage``, whose ``prompt_tokens_details.cached_tokens`` is the engine's first report of the prompt
tokens its prefix cache held, `replica.contract.StreamChunk.num_cached_tokens`), ``GET /v1/models``,
``GET /health`` (503 when no replica can serve or while draining).
No OpenAPI document or docs pages are served.

One request, by job; every step has a bound and a deadline:

1. auth: the tier comes from the API key (``Authorization: Bearer KEY`` ->
   `serve_app.auth.KeyStore`, which also gives the key's id, a digest prefix used in logs and
   limits; 401 otherwise); body fields such as ``priority``, ``vllm_xargs`` or ``tier`` are
   refused (400), and OpenAI's ``service_tier`` may only ask for a cheaper tier
   (`serve_app.service_tier`: the key's tier is the ceiling), so a client can never raise its
   tier.  The tier that serves the request is returned in the ``x-tier`` header and, as a
   ``service_tier`` value, in every response and stream chunk.
2. availability: while draining (shutdown) or when no replica answered the last health poll
   (`serve_app.cluster_feedback`), 503 with ``Retry-After`` at once.
3. admission, in one step with no await, before the body is read: the tier's admission
   (`serve_app.admission`: overload shedding, the in-flight bound, the fair share between a
   tier's keys) and the key's own limits (`serve_app.ratelimit`: concurrency, requests per
   minute); the request counts as in flight from here, so slow bodies count against their tier.
   429 with OpenAI's error JSON and ``Retry-After``; OpenAI's ``x-ratelimit-*`` headers on every
   response of a key with limits.
4. parse (`serve_app.openai_api`): the body within ``http.body_timeout_s`` (408), validation
   (every field honoured or refused); the service tier: a request its body moves to a cheaper
   tier is admitted again as that tier (a ``flex`` request is shed first); the served tier's
   caps, the backend's abilities, a cheap length check, the prompt rendered (chat template) and
   tokenized once (off the event loop when long); then the key's tokens per minute are charged
   (prompt + n x max_tokens; unused refunded; limits are the key's, whatever tier serves).
5. serve: a `GenerateRequest` to a replica (with the prompt's chained block hashes for the
   router's prefix matching, `router.prefix_block_tokens`, `replica.prefix_hash`, computed once:
   a retry keeps them); the stream is opened by reading its first chunk
   (`serve_app.stream`): Serve's backpressure becomes a 429, a replica that died or sent no first
   chunk within the tier's ``first_token_timeout_s`` is retried on another replica, else 504;
   a stream silent for the tier's ``idle_timeout_s`` ends with an error event (a non-streaming
   request starts over elsewhere, else 504).
6. render (`serve_app.render`): SSE events or one JSON body (choices by index, logprobs,
   echo; a request the engine refuses as invalid, `replica.contract.EngineRejected`, is a 400).  A client that disconnects has its
   replica stream cancelled, which aborts the engine request.

Shutdown (`drain`, called by the launcher on SIGTERM): new requests get 503; streams in flight may
finish for ``http.drain_timeout_s``, then end with an error event (code ``server_shutdown``) and
``[DONE]``; non-streaming ones get a 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from replica.backend import BACKEND_REFUSES
from replica.contract import GenerateRequest, StreamChunk
from replica.prefix_hash import chained_block_hashes
from router.feedback import ReplicaFeedback
from serve_app.admission import AdmissionPolicy, Decision, DelayHistory, InFlight
from serve_app.auth import AuthError, KeyStore
from serve_app.cluster_feedback import FeedbackPoller
from serve_app.config import SERVE_DEFAULT_ROUTER, AppConfig, ServingTier
from serve_app.metrics import IngressMetrics, RequestTimer, tier_slos
from serve_app.openai_api import ParsedRequest, RequestError, RequestParser, overload_error
from serve_app.ratelimit import KeyLimiter, LimitRefusal
from serve_app.service_tier import ServiceTiers
from serve_app.render import DONE_EVENT, Choice, Renderer, usage
from serve_app.stream import (DEFAULT_RETRIES, ReplicaHung, ReplicaStream, engine_rejection, is_replica_failure,
                              open_replica_stream, retry_request_id)
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


class ShuttingDown(Exception):
    """The ingress is draining and the request's time ran out."""

    def to_request_error(self) -> RequestError:
        return RequestError(503, "the server is shutting down; retry the request", type="server_error",
                            code="server_shutdown")


def _replica_failed() -> RequestError:
    return RequestError(500, "the replica failed to serve the request", type="server_error", code="internal_error")


def _replica_timeout(e: ReplicaHung) -> RequestError:
    return RequestError(504, f"no replica answered in time: {e}", type="server_error", code="timeout")


def _stream_error(e: BaseException) -> RequestError:
    if isinstance(e, (EngineAbort, ShuttingDown)):
        return e.to_request_error()
    rejected = engine_rejection(e)
    if rejected is not None:  # the engine found the request invalid: the client's 400
        return RequestError(400, f"the engine refused the request: {rejected}", param=rejected.param,
                            code="invalid_value")
    if isinstance(e, ReplicaHung):
        return _replica_timeout(e)
    return _replica_failed()


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


class _Ticket:
    """An admitted request's hold on the ingress's bounds: its in-flight entry and its key's
    slot and tokens.  `release` gives them back exactly once, however the request ends."""

    __slots__ = ("ingress", "request_id", "key_id", "queue_delay_s", "prompt_tokens", "max_tokens", "charged",
                 "released")

    def __init__(self, ingress: Ingress, request_id: str, key_id: str, queue_delay_s: float | None) -> None:
        self.ingress, self.request_id, self.key_id = ingress, request_id, key_id
        self.queue_delay_s = queue_delay_s  # admission's predicted queueing delay (None: admission off)
        self.prompt_tokens = self.max_tokens = 0
        self.charged = False
        self.released = False

    def release(self, completion_tokens: int = 0) -> None:
        if self.released:
            return
        self.released = True
        ing = self.ingress
        ing.in_flight.done(self.request_id)
        ing.active.pop(self.request_id, None)
        refund = max(0, self.max_tokens - completion_tokens) if self.charged else 0
        ing.limiter.release(self.key_id, refund)
        if ing.metrics is not None and self.charged:
            ing.metrics.key_usage(self.key_id, self.prompt_tokens, completion_tokens)


def _own_deployment() -> Any:
    """A handle to the deployment this replica belongs to (the ingress's peers)."""
    ctx = serve.get_replica_context()
    return serve.get_deployment_handle(ctx.deployment, ctx.app_name)


def _replica_tag() -> str | None:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests)
        return None


# ------------------------------------------------------------------------------------------ app

app = FastAPI(title="tiered-llm-serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """OpenAI-compatible front door.  ``replicas``: a DeploymentHandle to the `LLMReplica`
    deployment; ``config``: the `AppConfig`; ``max_context_tokens``: the longest accepted prompt."""

    def __init__(self, replicas: Any, config: AppConfig | dict[str, Any],
                 max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS) -> None:
        self.config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        self.replicas = replicas
        # generate calls: streams, by value over Serve's gRPC or as Ray objects (StreamingConfig)
        by_value = self.config.streaming.transport == "grpc"
        self.stream_replicas = replicas.options(stream=True, **({"_by_reference": False} if by_value else {}))
        self.keys = KeyStore.from_config(self.config)
        self.tokenizer: Tokenizer = tokenizer_for(self.config.engine)
        self.max_context_tokens = int(max_context_tokens)
        self.model_name = str(self.config.model_name)
        self.created = int(time.time())
        http = self.config.http
        self.parser = RequestParser(tokenizer=self.tokenizer, model_name=self.model_name,
                                    max_context_tokens=self.max_context_tokens,
                                    max_request_bytes=self.config.max_request_bytes,
                                    default_max_tokens=self.config.default_max_tokens,
                                    body_timeout_s=http.body_timeout_s,
                                    refuses=BACKEND_REFUSES[self.config.engine.backend])
        self.service_tiers = ServiceTiers(self.config.service_tier_map(), self.config.shed_sequence)
        self.renderers = {chat: Renderer(self.model_name, self.tokenizer, chat=chat) for chat in (False, True)}
        self.tier_configs: dict[str, ServingTier] = {t.name: t for t in self.config.tiers}
        self.tiers = {t.name: t.facts() for t in self.config.tiers}
        # the prompt's prefix hashes for the router (0: none; Serve's own router reads none)
        router = self.config.router
        self.prefix_block_tokens = router.prefix_block_tokens if router.policy != SERVE_DEFAULT_ROUTER else 0
        # Prometheus metrics (serve_app.metrics): None when TIERED_METRICS=0
        self.metrics: IngressMetrics | None = IngressMetrics.create(
            tier_slos(self.config.tiers), per_key_max_keys=self.config.metrics.per_key_max_keys)
        # Overload control (serve_app.admission): None when admission.enabled is false
        self.admission: AdmissionPolicy | None = (AdmissionPolicy.from_app_config(self.config)
                                                  if self.config.admission.enabled else None)
        self.limiter = KeyLimiter({t.name: t.key_limits for t in self.config.tiers}, self.config.api_keys.limits,
                                  ingress_replicas=self.config.ingress.num_replicas)
        self.in_flight = InFlight()
        self.active: dict[str, ReplicaStream] = {}  # request id -> its open replica stream
        self.delay_history = DelayHistory(self.config.admission.delay_window_s)
        self.draining_until: float | None = None  # time.monotonic() deadline once draining
        self._rng = random.Random()
        adm = self.config.admission
        self.poller = FeedbackPoller(
            replicas, period_s=self.admission.feedback_period_s if self.admission else 1.0,
            timeout_s=self.admission.feedback_timeout_s if self.admission else 5.0,
            idle_s=adm.max_feedback_age_s, forget_after_s=2 * adm.max_feedback_age_s, tbt_window_s=adm.tbt_window_s,
            num_replicas=self.config.replicas.num_replicas, busy=lambda: len(self.in_flight) > 0,
            # several ingress replicas share the bounds: count them (serve_app.admission.ingress_share)
            peers=_own_deployment if self.config.ingress.max_count > 1 else None,
            peers_period_s=self.config.ingress.count_period_s, on_peers=self._share_bounds)
        logger.info("ingress: model %s, %r, %r, context %d", self.model_name, self.keys, self.tokenizer,
                    self.max_context_tokens)

    # --- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while this ingress can serve; 503 while it drains or when no replica answers."""
        if self.draining_until is not None:
            return JSONResponse({"status": "draining"}, status_code=503)
        healthy = await self.poller.healthy_replicas(self.config.admission.max_feedback_age_s)
        if healthy == 0:
            return JSONResponse({"status": "unavailable", "replicas": 0}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": healthy})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.keys.identify(_authorization(request))
        except AuthError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tiered-llm-serve",
             "root": self.model_name, "parent": None, "max_model_len": self.max_context_tokens}]})

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

    # --- availability and shutdown --------------------------------------------------------------
    async def _unavailable(self, tier: str, headers: dict[str, str]) -> JSONResponse | None:
        """A 503 while draining, or when no replica answered the latest health poll."""
        cfg = self.config.admission
        if self.draining_until is not None:
            err = RequestError(503, "the server is shutting down; retry the request", type="server_error",
                               code="server_shutdown")
            return self._reject(err, tier, {**headers, "retry-after": str(cfg.min_retry_after_s)})
        healthy = await self.poller.healthy_replicas(cfg.max_feedback_age_s)
        if healthy == 0:
            retry = self._rng.randint(cfg.min_retry_after_s, max(cfg.min_retry_after_s, 2 * cfg.min_retry_after_s))
            err = RequestError(503, "no replica can serve the request now (all are down or starting); retry "
                               f"after {retry} s", type="server_error", code="service_unavailable")
            return self._reject(err, tier, {**headers, "retry-after": str(retry)})
        return None

    def state(self) -> dict[str, int]:
        """What this ingress holds now (tests and operators, through a DeploymentHandle; not an
        HTTP route): requests in flight, open replica streams, key slots held."""
        return {"in_flight": len(self.in_flight), "active_streams": len(self.active),
                "key_slots": self.limiter.total_in_flight()}

    def sharing(self) -> dict[str, Any]:
        """How this ingress shares the bounds (tests and operators, like `state`): its Serve
        replica id, how many ingress replicas it counts, its share of ``admission.max_in_flight``
        (None: admission off) and the bound they share."""
        return {"replica": _replica_tag(), "ingress_replicas": self.limiter.ingress_replicas,
                "in_flight_share": self.admission.ingress_max_in_flight if self.admission is not None else None,
                "max_in_flight": self.admission.max_in_flight if self.admission is not None else None}

    def _share_bounds(self, ingress_replicas: int) -> None:
        """``ingress_replicas`` run now: this ingress's share of the bounds follows."""
        if ingress_replicas != self.limiter.ingress_replicas:
            logger.info("ingress: %d ingress replicas share the admission bounds and key limits", ingress_replicas)
        if self.admission is not None:
            self.admission.set_ingress_replicas(ingress_replicas)
        self.limiter.set_ingress_replicas(ingress_replicas)

    async def count_ingress_replicas(self, timeout_s: float = 5.0) -> int | None:
        """Count the running ingress replicas now and share the bounds by the count
        (`FeedbackPoller.count_peers`; None with one configured ingress); tests and operators."""
        return await self.poller.count_peers(timeout_s)

    async def poll_feedback_once(self, timeout_s: float = 5.0) -> list[ReplicaFeedback]:
        """One poll of every running replica (`FeedbackPoller.poll_once`); tests and operators."""
        return await self.poller.poll_once(timeout_s)

    async def drain(self, timeout_s: float | None = None) -> dict[str, int]:
        """Stop admitting (503) and wait for the requests in flight to finish, at most
        ``timeout_s`` (default ``http.drain_timeout_s``); then end the streams still open with an
        error event.  Returns how many finished and how many were ended."""
        timeout_s = self.config.http.drain_timeout_s if timeout_s is None else float(timeout_s)
        self.draining_until = time.monotonic() + timeout_s
        before = len(self.in_flight)
        while len(self.in_flight) and time.monotonic() < self.draining_until:
            await asyncio.sleep(0.05)
        ended = 0
        for stream in list(self.active.values()):
            stream.end(ShuttingDown())
            ended += 1
        logger.info("ingress drained: %d of %d requests finished in time, %d ended", before - ended, before, ended)
        return {"in_flight": before, "finished": before - ended, "ended": ended}

    # --- admission ------------------------------------------------------------------------------
    def _decide(self, tier: str, key_id: str) -> Decision | None:
        """The tier's admission decision for a request of ``key_id`` now (None: admission off)."""
        if self.admission is None:
            return None
        p = self.poller
        return self.admission.admit(tier, p.feedback.values(), self.in_flight, history=p.tbt_history,
                                    delays=self.delay_history, num_replicas=p.num_replicas, key_id=key_id,
                                    record_delay=False, jitter=self._rng.random())

    def _admit(self, tier: str, key_id: str, rid: str, headers: dict[str, str]) -> JSONResponse | _Ticket:
        """The tier's admission and the key's limits, then the in-flight entry: one step, no
        await in between (so concurrent arrivals cannot all pass a bound)."""
        if self.admission is not None:
            self.poller.on_request()
        decision = self._decide(tier, key_id)
        if decision is not None and not decision.admit:
            return self._shed(tier, decision.message, decision.retry_after_s or 1, headers)
        refusal = self.limiter.acquire(key_id, tier)
        if refusal is not None:
            return self._rate_limited(tier, refusal, headers)
        self.in_flight.add(rid, tier, 0, key_id=key_id)
        return _Ticket(self, rid, key_id, decision.queue_delay_s if decision is not None else None)

    def _readmit(self, ticket: _Ticket, tier: str, headers: dict[str, str]) -> JSONResponse | None:
        """Move an admitted request to ``tier`` (a cheaper service tier than its key's, which its
        body asked for): the tier's admission decides again, as for a request of that tier (a
        ``flex`` request is shed first).  The shed response, or None once moved."""
        rid, key_id = ticket.request_id, ticket.key_id
        self.in_flight.done(rid)
        decision = self._decide(tier, key_id)
        if decision is not None:
            if not decision.admit:
                return self._shed(tier, decision.message, decision.retry_after_s or 1, headers)
            ticket.queue_delay_s = decision.queue_delay_s
        self.in_flight.add(rid, tier, 0, key_id=key_id)
        return None

    def _shed(self, tier: str, message: str, retry_after_s: int, headers: dict[str, str]) -> JSONResponse:
        return self._reject(overload_error(message), tier, {**headers, "retry-after": str(int(retry_after_s))})

    def _rate_limited(self, tier: str, refusal: LimitRefusal, headers: dict[str, str]) -> JSONResponse:
        err = RequestError(429, refusal.message, type="requests" if refusal.kind != "tokens" else "tokens",
                           code="rate_limit_exceeded")
        h = dict(headers)
        if refusal.retry_after_s is not None:
            h["retry-after"] = str(max(1, math.ceil(refusal.retry_after_s)))
        return self._reject(err, tier, h)

    def _backpressure_retry_s(self, e: BackPressureError) -> int:
        cfg = self.config.admission
        if e.retry_after_s is not None:
            return max(cfg.min_retry_after_s, math.ceil(e.retry_after_s))
        if self.admission is not None:
            p = self.poller
            return self.admission.retry_after_s(self.admission.assess(
                p.feedback.values(), self.in_flight, history=p.tbt_history, num_replicas=p.num_replicas),
                self._rng.random())
        return cfg.min_retry_after_s

    # --- one request ----------------------------------------------------------------------------
    async def _serve(self, request: Request, *, chat: bool):
        start = time.perf_counter()  # the request's arrival, for its TTFT
        try:
            key_tier, key_id = self.keys.identify(_authorization(request))
        except AuthError as e:
            return self._reject(e, None)
        tier = key_tier  # until the body says which service tier it asks for
        headers = {"x-tier": tier}
        unavailable = await self._unavailable(tier, headers)
        if unavailable is not None:
            return unavailable
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        ticket = self._admit(tier, key_id, rid, headers)
        if isinstance(ticket, JSONResponse):
            return ticket
        try:
            body = self.parser.validate(await self.parser.read(request), chat=chat)
            served = self.service_tiers.serve(key_tier, body.service_tier)
            if served.tier != tier:  # cheaper service than the key's: admitted (or shed) as that tier
                tier = served.tier
                headers["x-tier"] = tier
                shed = self._readmit(ticket, tier, {**headers, **self.limiter.headers(key_id, key_tier)})
                if shed is not None:
                    ticket.release()
                    return shed
            parsed = await self.parser.prepare(body, tier=self.tier_configs[tier])
        except RequestError as e:
            ticket.release()
            return self._reject(e, tier, {**headers, **self.limiter.headers(key_id, key_tier)})
        except BaseException:
            ticket.release()
            raise
        tier_cfg = self.tier_configs[tier]
        refusal = self.limiter.charge(key_id, key_tier, parsed.prompt_len + parsed.max_completion_tokens)
        if refusal is not None:
            ticket.release()
            return self._rate_limited(tier, refusal, {**headers, **self.limiter.headers(key_id, key_tier)})
        ticket.charged, ticket.prompt_tokens = True, parsed.prompt_len
        ticket.max_tokens = parsed.max_completion_tokens
        headers.update(self.limiter.headers(key_id, key_tier))
        self.in_flight.set_prompt_len(rid, parsed.prompt_len)
        if ticket.queue_delay_s is not None:  # only requests dispatched count in the recent delays
            self.delay_history.add(time.time(), ticket.queue_delay_s)
        logger.debug("request %s: key %s (%s), served as %s, %d prompt tokens", rid, key_id, key_tier, tier,
                     parsed.prompt_len)
        block = self.prefix_block_tokens  # hashed once here (~0.5 ms for 32k tokens); retries keep them
        gen_request = GenerateRequest(request_id=rid, prompt_token_ids=parsed.prompt_token_ids,
                                      max_tokens=parsed.max_tokens, tier=self.tiers[tier],
                                      sampling=parsed.body.sampling, options=parsed.options,
                                      prefix_hashes=(chained_block_hashes(parsed.prompt_token_ids, block)
                                                     if block else ()),
                                      prefix_block_tokens=block)
        service_tier = served.service_tier
        handle = self.stream_replicas

        def call_replica(attempt: int) -> Any:
            req = gen_request if attempt == 0 else gen_request.with_request_id(retry_request_id(rid, attempt))
            return handle.generate.remote(req)

        async def open_stream(first_attempt: int = 0, retries: int = DEFAULT_RETRIES) -> ReplicaStream:
            stream = await open_replica_stream(lambda a: call_replica(first_attempt + a), retries=retries,
                                               request_id=rid, first_timeout_s=tier_cfg.first_token_timeout_s,
                                               idle_timeout_s=tier_cfg.stream_idle_timeout_s,
                                               take_arrived=self.config.streaming.transport == "object_ref")
            stream.attempts += first_attempt
            self.active[rid] = stream
            return stream

        try:
            stream = await open_stream()
        except BackPressureError as e:
            ticket.release()
            logger.info("request %s shed by Serve's backpressure: %s", rid, e)
            return self._shed(tier, f"The server is overloaded: {e}", self._backpressure_retry_s(e), headers)
        except asyncio.CancelledError:  # client gone: open_replica_stream cancelled the replica stream
            ticket.release()
            self._timer(tier, start).finish("cancelled")
            raise
        except BaseException:
            ticket.release()
            raise
        t_first = time.perf_counter()
        timer = self._timer(tier, start)
        if stream.first is not None and stream.error is None:
            self.in_flight.first_token(rid)
            timer.tokens(stream.first.num_tokens, t_first)
        if parsed.body.stream:
            def release() -> None:  # what _sse's `finally` does (idempotent), for a body never iterated
                ticket.release(timer.n)
                if not timer.finished:
                    stream.cancel()  # client gone: abort the engine request
                    timer.finish("cancelled")

            if stream.error is not None and stream.first is None:  # failed before any token: a plain error
                release()
                timer.finish("error")
                err = _stream_error(stream.error)
                return _error_response(err, headers)
            include_usage = parsed.body.stream_options is not None and bool(parsed.body.stream_options.include_usage)
            return _SSEResponse(self._sse(stream, rid, parsed, include_usage, timer, ticket, service_tier),
                                on_close=release,
                                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

        async def restart(attempts_used: int) -> ReplicaStream:
            # a non-streaming request whose replica died or hung mid-generation: nothing reached
            # its client yet, so it starts over (a new request id) elsewhere, within the retry budget
            return await open_stream(attempts_used, max(0, DEFAULT_RETRIES - attempts_used))

        try:
            return await self._complete(stream, rid, parsed, timer, headers, service_tier, restart=restart)
        finally:
            ticket.release(timer.n)

    def _timer(self, tier: str, start: float) -> RequestTimer:
        return self.metrics.admitted(tier, start) if self.metrics is not None else RequestTimer(None, start)

    def _take(self, choices: list[Choice], chunk: StreamChunk, parsed: ParsedRequest, total: int) -> tuple[str, int]:
        """Add ``chunk`` to its choice: its new text, and the request's completion tokens so far
        (all choices).  `EngineAbort` when the engine gave up on the request."""
        if not 0 <= chunk.index < len(choices):
            raise RuntimeError(f"the replica sent choice {chunk.index} of a request for {len(choices)}")
        c = choices[chunk.index]
        text = self.renderers[parsed.chat].text(chunk, c.num_tokens)
        total += chunk.num_tokens - c.num_tokens
        c.num_tokens = chunk.num_tokens
        if chunk.finish_reason == "abort":
            raise EngineAbort(chunk.stop_reason)
        if chunk.finish_reason is not None:
            c.finish_reason, c.stop_reason = chunk.finish_reason, chunk.stop_reason
        if parsed.top_logprobs is not None:
            if chunk.prompt_logprobs is not None and not c.entries and self._echo_logprobs(parsed):
                c.token_ids.extend(parsed.prompt_token_ids)
                c.entries.extend(chunk.prompt_logprobs)
            c.token_ids.extend(chunk.token_ids)
            c.entries.extend(chunk.logprobs or [None] * len(chunk.token_ids))
        c.parts.append(text)
        return text, total

    @staticmethod
    def _echo_logprobs(parsed: ParsedRequest) -> bool:
        """Whether the choice's logprobs start with the prompt's (completions' echo with logprobs)."""
        return not parsed.chat and parsed.options.prompt_logprobs is not None

    async def _complete(self, stream: ReplicaStream, rid: str, parsed: ParsedRequest, timer: RequestTimer,
                        headers: dict[str, str], service_tier: str, *,
                        restart: Callable[[int], Awaitable[ReplicaStream]] | None = None) -> JSONResponse:
        """The non-streaming response: every chunk read, one JSON body.  If the replica dies or
        hangs mid-generation and ``restart`` is given, the request starts over on another replica
        while the retry budget lasts (`serve_app.stream`; the client has received nothing yet)."""
        renderer = self.renderers[parsed.chat]
        while True:
            failed: BaseException | None = None
            choices = [Choice(i) for i in range(parsed.n)]
            total = 0
            cached: int | None = None  # the prompt tokens the engine's prefix cache held (its first report)
            try:
                async for chunk in stream:
                    _, total = self._take(choices, chunk, parsed, total)
                    if cached is None:
                        cached = chunk.num_cached_tokens
                    timer.tokens(total)  # a restarted request counts only tokens past the ones already seen
            except asyncio.CancelledError:
                stream.cancel()  # client gone: abort the engine request
                timer.finish("cancelled")
                raise
            except (EngineAbort, ShuttingDown) as e:
                stream.cancel()
                logger.warning("request %s ended: %s", rid, e)
                timer.finish("aborted" if isinstance(e, EngineAbort) else "error")
                return _error_response(e.to_request_error(), headers)
            except Exception as e:  # noqa: BLE001
                stream.cancel()
                if restart is None or stream.attempts > DEFAULT_RETRIES or not is_replica_failure(e) \
                        or self.draining_until is not None:
                    logger.warning("request %s failed: %r", rid, e)
                    timer.finish("error")
                    return _error_response(_stream_error(e), headers)
                failed = e
            if failed is None:
                break
            logger.warning("request %s: its replica failed after %d tokens (%s); starting over on another "
                           "replica", rid, total, type(failed).__name__)
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
        for c in choices:
            c.finish_reason = c.finish_reason or "length"
        logprobs = None
        if parsed.top_logprobs is not None:
            logprobs = [renderer.logprobs(c.token_ids, c.entries, parsed.top_logprobs) for c in choices]
        body = renderer.response(rid, choices, parsed.prompt_len, service_tier=service_tier,
                                 echo_text=parsed.echo_text, logprobs=logprobs, cached_tokens=cached or 0)
        return JSONResponse(body, headers=headers)

    async def _sse(self, stream: ReplicaStream, rid: str, parsed: ParsedRequest, include_usage: bool,
                   timer: RequestTimer, ticket: _Ticket, service_tier: str) -> AsyncIterator[str]:
        renderer = self.renderers[parsed.chat]
        chat = parsed.chat
        created = int(time.time())
        choices = [Choice(i) for i in range(parsed.n)]
        total = 0
        cached: int | None = None  # the prompt tokens the engine's prefix cache held (its first report)
        done = False
        options = parsed.body.stream_options
        continuous_usage = options is not None and bool(options.continuous_usage_stats)

        fast = renderer.stream_events(rid, created, service_tier)

        def event(text: str | None, finish: str | None, index: int, *, logprobs: dict[str, Any] | None = None,
                  tokens: tuple[int, int, int] | None = None, first: bool = False) -> str:
            """``tokens``: (prompt, completion so far, cached prompt tokens) for continuous usage stats."""
            if logprobs is None and not first:  # the common case, preformatted
                return fast.text(index, text, finish, tokens)
            return renderer.chunk_event(rid, created, text, finish, index=index, service_tier=service_tier,
                                        logprobs=logprobs, usage=None if tokens is None else usage(*tokens),
                                        first=first)

        try:
            if chat:
                for c in choices:
                    yield event("", None, c.index, first=True)
                    if parsed.echo_text:
                        yield event(parsed.echo_text, None, c.index)
            async for chunk in stream:
                c = choices[chunk.index] if 0 <= chunk.index < len(choices) else None
                seen = len(c.entries) if c is not None else 0
                text, total = self._take(choices, chunk, parsed, total)
                timer.tokens(total)
                if cached is None:
                    cached = chunk.num_cached_tokens
                assert c is not None  # _take raised otherwise
                logprobs = None
                if parsed.top_logprobs is not None:
                    logprobs = renderer.logprobs(c.token_ids[seen:], c.entries[seen:], parsed.top_logprobs,
                                                 c.text_offset)
                    if not chat and logprobs["tokens"]:
                        c.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                if not chat and parsed.echo_text and not c.started:
                    text = parsed.echo_text + text
                c.started = True
                # the finish reason rides on the choice's last tokens, as vLLM sends it
                tokens_now = (parsed.prompt_len, total, cached or 0) if continuous_usage else None
                yield event(text if text or not chunk.finished or not chat else None, c.finish_reason, c.index,
                            logprobs=logprobs, tokens=tokens_now)
            for c in choices:
                if c.finish_reason is None:  # the stream ended without the choice's last chunk
                    c.finish_reason = "length"
                    yield event(None if chat else "", "length", c.index)
            if include_usage:
                yield renderer.usage_event(rid, created, parsed.prompt_len, total, service_tier=service_tier,
                                           cached_tokens=cached or 0)
            timer.finish("completed")
            yield DONE_EVENT
            done = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.warning("stream %s failed: %r", rid, e)
            stream.cancel()
            timer.finish("aborted" if isinstance(e, EngineAbort) else "error")
            yield renderer.error_event(_stream_error(e))
            yield DONE_EVENT
            done = True
        finally:
            ticket.release(total)
            if not done:
                stream.cancel()  # client disconnected mid-stream: abort the engine request
                timer.finish("cancelled")  # (a no-op if the stream had already finished)
