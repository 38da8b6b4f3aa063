"""The real Ingress class in process, with a fake replica handle (no Ray): shared by the
security, fuzz and retry tests.

* `FakeStream`: a replica stream as the sim backend yields it (one chunk per token, no text);
  ``fail`` raises at once, ``die_after=k`` raises Ray's ``ActorDiedError`` after k chunks,
  ``hang_after=k`` sends k chunks and then nothing, ever (a hung replica; cancelling it ends the
  wait with Serve's ``RequestCancelledError``), ``delay_s`` waits that long before each chunk;
* `FakeReplicas`: stands in for the LLMReplica DeploymentHandle, records every request
  (`replica.contract.GenerateRequest`) in ``payloads``; ``script`` (request -> chunks) answers
  with a `ScriptedStream` of those chunks instead; per call, in order, ``die_after``,
  ``hang_after`` and ``delay_s`` lists; ``snapshots`` (a list of feedback snapshot dicts, or None:
  a broadcast fails, so health is unknown; a None in it: that replica never answers) answers
  ``broadcast("record_routing_stats")``;
  ``backpressure`` raises Serve's ``BackPressureError`` on the next calls;
  ``die_after`` lists, per call in order, after how many chunks that call's replica dies;
* `make_ingress(api_keys, overrides, max_context_tokens)`: the Ingress (not Serve's wrapper) on
  the default config with ``overrides``, keys from ``api_keys`` (the ``TIERED_API_KEYS`` format), metrics and
  admission off;
* `call_inprocess(ingress, raw, headers, chat=, query=)`: `Ingress._serve` on one request;
  (status, lower-case headers, body bytes).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.requests import Request

from replica.contract import GenerateRequest, StreamChunk
from serve_app.config import DEFAULT_CONFIG_PATH, load_config
from serve_app.ingress import Ingress


class FakeStream:
    def __init__(self, n: int, fail: bool = False, die_after: int | None = None, hang_after: int | None = None,
                 delay_s: float = 0.0) -> None:
        self._chunks = [StreamChunk(num_tokens=i, finish_reason="length" if i == n else None)
                        for i in range(1, n + 1)]
        self._n, self._fail, self._die_after, self._hang_after, self._delay_s = n, fail, die_after, hang_after, delay_s
        self.cancelled = False
        self._cancel_event: asyncio.Event | None = None

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> StreamChunk:
        sent = self._n - len(self._chunks)
        if self._fail:
            raise RuntimeError("replica died")
        if self._die_after is not None and sent >= self._die_after:
            from ray.exceptions import ActorDiedError

            raise ActorDiedError()  # the replica actor died after that many chunks
        if self._hang_after is not None and sent >= self._hang_after or self.cancelled:
            from ray.serve.exceptions import RequestCancelledError

            if not self.cancelled:
                self._cancel_event = asyncio.Event()
                await self._cancel_event.wait()  # until cancelled: a replica that never answers
            raise RequestCancelledError("fake")
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True
        if self._cancel_event is not None:
            self._cancel_event.set()


class ScriptedStream:
    """A replica stream that yields the given chunks (as a vLLM backend would: several choices,
    token ids, logprobs), then ends."""

    def __init__(self, chunks: list[StreamChunk]) -> None:
        self._chunks = list(chunks)
        self.cancelled = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class _ReplicaResult:
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    async def get_async(self) -> dict[str, Any]:
        if self.snapshot is None:  # a replica too busy to answer (alive: no error, no answer)
            await asyncio.Event().wait()
        return self.snapshot


class _Broadcast:
    """Serve's broadcast response as `serve_app.cluster_feedback.broadcast_each` reads it."""

    def __init__(self, snapshots: list[dict[str, Any]] | None) -> None:
        self.snapshots = snapshots

    async def _fetch_replica_results_async(self) -> list[_ReplicaResult]:
        if self.snapshots is None:
            raise RuntimeError("no broadcast in this fake")
        return [_ReplicaResult(s) for s in self.snapshots]


class FakeReplicas:
    def __init__(self) -> None:
        self.payloads: list[GenerateRequest] = []
        self.fail = False
        self.die_after: list[int | None] = []
        self.hang_after: list[int | None] = []
        self.delay_s: list[float] = []
        self.snapshots: list[dict[str, Any]] | None = None
        self.backpressure = False
        self.streams: list[FakeStream] = []
        self.script: Any = None  # GenerateRequest -> list of StreamChunk: a ScriptedStream instead

    def options(self, **_: Any) -> FakeReplicas:
        return self

    @property
    def generate(self) -> FakeReplicas:
        return self

    def broadcast(self, method: str) -> _Broadcast:
        assert method == "record_routing_stats"
        return _Broadcast(self.snapshots)

    def remote(self, payload: GenerateRequest) -> FakeStream:
        assert isinstance(payload, GenerateRequest), payload
        if self.backpressure:
            from ray.serve.exceptions import BackPressureError

            raise BackPressureError(num_queued_requests=9, max_queued_requests=8, status_code=503, retry_after_s=2.5)
        self.payloads.append(payload)
        if self.script is not None:
            return ScriptedStream(self.script(payload))
        stream = FakeStream(payload.max_tokens, self.fail, self.die_after.pop(0) if self.die_after else None,
                            self.hang_after.pop(0) if self.hang_after else None,
                            self.delay_s.pop(0) if self.delay_s else 0.0)
        self.streams.append(stream)
        return stream


def snapshot(replica_id: str = "r0") -> dict[str, Any]:
    """A fresh, idle replica's feedback snapshot."""
    import time

    return {"version": 1, "replica_id": replica_id, "timestamp_s": time.time(), "num_waiting": 0, "num_running": 0,
            "waiting_prefill_tokens": 0, "kv_usage": 0.0, "mean_batch_time_s": 0.03, "tiers": {}}


def make_ingress(api_keys: str, overrides: dict[str, Any] | None = None,
                 max_context_tokens: int = 256, admission: bool = False) -> tuple[Any, FakeReplicas]:
    env = {"TIERED_METRICS": "0", "TIERED_API_KEYS": api_keys}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = load_config(DEFAULT_CONFIG_PATH, overrides={"admission.enabled": admission, **(overrides or {})})
        replicas = FakeReplicas()
        ingress = Ingress.func_or_class.__bases__[0](replicas, config, max_context_tokens)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert ingress.metrics is None and (ingress.admission is None) != admission
    return ingress, replicas


def make_request(raw: bytes, headers: list[tuple[str, str]], chat: bool, query: str = "",
                 trickle_s: float | None = None) -> Request:
    """A POST request with body ``raw``; ``trickle_s``: the first byte comes at once, the rest
    after that many seconds (a slow client)."""
    parts = [raw] if trickle_s is None else [raw[:1], raw[1:]]

    async def receive() -> dict[str, Any]:
        if not parts:
            return {"type": "http.disconnect"}
        if len(parts) == 1 and trickle_s is not None:
            await asyncio.sleep(trickle_s)
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return Request({"type": "http", "method": "POST", "path": path, "headers": hdrs,
                    "query_string": query.encode()}, receive)


async def call_async(ingress: Any, raw: bytes, headers: list[tuple[str, str]], *, chat: bool = False,
                     query: str = "", trickle_s: float | None = None) -> tuple[int, dict[str, str], bytes]:
    """`Ingress._serve` on one request in the running event loop, its whole body read."""
    resp = await ingress._serve(make_request(raw, headers, chat, query, trickle_s), chat=chat)
    if hasattr(resp, "body_iterator"):
        content = b"".join([c.encode() if isinstance(c, str) else c async for c in resp.body_iterator])
    else:
        content = resp.body
    return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, content


def call_inprocess(ingress: Any, raw: bytes, headers: list[tuple[str, str]], *, chat: bool = False,
                   query: str = "") -> tuple[int, dict[str, str], bytes]:
    return asyncio.run(call_async(ingress, raw, headers, chat=chat, query=query))
