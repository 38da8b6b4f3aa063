"""The real Ingress class in process, with a fake replica handle (no Ray): shared by the
security, fuzz and retry tests.

* `FakeStream`: a replica stream as the sim backend yields it (one chunk per token, no text);
  ``fail`` raises at once, ``die_after=k`` raises Ray's ``ActorDiedError`` after k chunks;
* `FakeReplicas`: stands in for the LLMReplica DeploymentHandle, records every request
  (`replica.contract.GenerateRequest`) in ``payloads``;
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
    def __init__(self, n: int, fail: bool = False, die_after: int | None = None) -> None:
        self._chunks = [StreamChunk(num_tokens=i, finish_reason="length" if i == n else None)
                        for i in range(1, n + 1)]
        self._n, self._fail, self._die_after = n, fail, die_after
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._fail:
            raise RuntimeError("replica died")
        if self._die_after is not None and self._n - len(self._chunks) >= self._die_after:
            from ray.exceptions import ActorDiedError

            raise ActorDiedError()  # the replica actor died after that many chunks
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplicas:
    def __init__(self) -> None:
        self.payloads: list[GenerateRequest] = []
        self.fail = False
        self.die_after: list[int | None] = []

    def options(self, **_: Any) -> FakeReplicas:
        return self

    @property
    def generate(self) -> FakeReplicas:
        return self

    def remote(self, payload: GenerateRequest) -> FakeStream:
        assert isinstance(payload, GenerateRequest), payload
        self.payloads.append(payload)
        return FakeStream(payload.max_tokens, self.fail, self.die_after.pop(0) if self.die_after else None)


def make_ingress(api_keys: str, overrides: dict[str, Any] | None = None,
                 max_context_tokens: int = 256) -> tuple[Any, FakeReplicas]:
    env = {"TIERED_METRICS": "0", "TIERED_API_KEYS": api_keys}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = load_config(DEFAULT_CONFIG_PATH, overrides={**(overrides or {}), "admission.enabled": False})
        replicas = FakeReplicas()
        ingress = Ingress.func_or_class.__bases__[0](replicas, config, max_context_tokens)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert ingress.metrics is None and ingress.admission is None
    return ingress, replicas


def make_request(raw: bytes, headers: list[tuple[str, str]], chat: bool, query: str = "") -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return Request({"type": "http", "method": "POST", "path": path, "headers": hdrs,
                    "query_string": query.encode()}, receive)


def call_inprocess(ingress: Any, raw: bytes, headers: list[tuple[str, str]], *, chat: bool = False,
                   query: str = "") -> tuple[int, dict[str, str], bytes]:
    async def go() -> tuple[int, dict[str, str], bytes]:
        resp = await ingress._serve(make_request(raw, headers, chat, query), chat=chat)
        if hasattr(resp, "body_iterator"):
            content = b"".join([c.encode() if isinstance(c, str) else c async for c in resp.body_iterator])
        else:
            content = resp.body
        return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, content

    return asyncio.run(go())
