"""The ingress's one replica-stream abstraction: a stream opened by reading its first chunk,
retried on another replica when its replica died before producing anything.

`open_replica_stream(start)` calls ``start(attempt)`` (a handle call returning a replica stream
of `replica.contract.StreamChunk` s), reads the first chunk and returns a `ReplicaStream`: it
iterates that first chunk, then the rest, and says what opening found (``first``: the first
chunk, None when the stream ended at once; ``error``: what reading it raised, after the retries;
``attempts``).  Reading up to the first chunk before the response starts is what turns Serve's
backpressure into a 429 and makes the retry below possible.

A request that a replica accepted but had not started streaming when that replica died (killed,
out of memory, its node gone) fails at the first ``__anext__`` of the replica stream with a Ray
actor error (`ray.exceptions.ActorDiedError`, ``ActorUnavailableError``, or a ``RayTaskError``
caused by one).  Nothing has reached the client yet, and generating is free of side effects, so
the ingress opens the stream again: a fresh handle call, which Serve's router sends to another
replica (the router drops a replica from its candidates on the first ``ActorDiedError`` it sees
from it, before the controller notices the death).  Serve itself retries only requests that the
replica had not accepted yet.

Once a chunk has been read a stream is not retried: its client already has tokens (it gets an
SSE error event).  A non-streaming request is: its client has received nothing, so the ingress
starts it over on another replica when its replica dies mid-generation (`serve_app.ingress`,
within the same budget of ``DEFAULT_RETRIES`` extra attempts).

    opened = await open_replica_stream(
        lambda attempt: handle.options(stream=True).generate.remote(request.with_request_id(
            retry_request_id(request.request_id, attempt))))
    async for chunk in opened: ...      # the first chunk, then the rest (or ``opened.error``)

``BackPressureError`` and ``asyncio.CancelledError`` propagate (the stream is cancelled on the
latter: the client is gone), as they did from the first ``__anext__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from replica.contract import StreamChunk

__all__ = ["DEFAULT_RETRIES", "ReplicaStream", "is_replica_death", "open_replica_stream", "retry_request_id"]

logger = logging.getLogger("ray.serve")

DEFAULT_RETRIES = 1


def _actor_error_types() -> tuple[type[BaseException], ...]:
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency of the app
        return ()
    return (RayActorError,)  # ActorDiedError and ActorUnavailableError are subclasses


def is_replica_death(error: BaseException | None) -> bool:
    """Whether ``error`` says the replica actor serving the request died or is unreachable:
    a `RayActorError` (``ActorDiedError``, ``ActorUnavailableError``), or an error caused by one
    (``RayTaskError.cause``, ``__cause__``/``__context__``; followed a few levels deep)."""
    types = _actor_error_types()
    if not types:
        return False
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 8:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            return True
        cause = getattr(e, "cause", None)
        todo.extend(c for c in (cause, e.__cause__, e.__context__) if isinstance(c, BaseException))
    return False


def retry_request_id(request_id: str, attempt: int) -> str:
    """The engine request id of attempt ``attempt`` (0: the first): distinct per attempt, so a
    replica that was only unreachable, still running the first attempt, never sees a duplicate."""
    return request_id if attempt == 0 else f"{request_id}-retry{attempt}"


class ReplicaStream:
    """A replica stream whose first chunk was read when it was opened (`open_replica_stream`):
    ``stream`` (the underlying one), ``first`` (that chunk; None when the stream ended before
    one), ``error`` (what reading it raised, after the retries; iterating raises it),
    ``attempts`` (streams opened).  Iterates ``first``, then the rest; `cancel` cancels the
    underlying stream (which aborts the engine request)."""

    __slots__ = ("stream", "first", "error", "attempts", "_pending")

    def __init__(self, stream: Any, first: StreamChunk | None = None, error: BaseException | None = None,
                 attempts: int = 1) -> None:
        self.stream, self.first, self.error, self.attempts = stream, first, error, attempts
        self._pending = True

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._pending:
            self._pending = False
            if self.error is not None:
                raise self.error
            if self.first is None:
                raise StopAsyncIteration
            return self.first
        if self.first is None or self.error is not None:
            raise StopAsyncIteration
        return await self.stream.__anext__()

    def cancel(self) -> None:
        _cancel(self.stream)


async def open_replica_stream(start: Callable[[int], Any], *, retries: int = DEFAULT_RETRIES,
                              request_id: str = "") -> ReplicaStream:
    """Starts a replica stream with ``start(attempt)`` (attempt 0, 1, ...) and reads its first
    chunk; when that read fails because the replica died (`is_replica_death`), starts it again,
    at most ``retries`` more times.  Other errors are returned in `ReplicaStream.error` (no
    retry); ``BackPressureError`` and ``CancelledError`` propagate (the latter after cancelling
    the stream)."""
    from ray.serve.exceptions import BackPressureError

    attempt = 0
    while True:
        stream = start(attempt)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return ReplicaStream(stream, None, None, attempt + 1)
        except BackPressureError:
            raise
        except asyncio.CancelledError:
            _cancel(stream)  # client gone: abort the engine request
            raise
        except Exception as e:  # noqa: BLE001 - returned to the caller, which reports it
            if attempt < retries and is_replica_death(e):
                attempt += 1
                logger.warning("request %s: its replica died before the first token (%s); retrying "
                               "(attempt %d of %d)", request_id, type(e).__name__, attempt + 1, retries + 1)
                _cancel(stream)
                continue
            return ReplicaStream(stream, None, e, attempt + 1)
        return ReplicaStream(stream, first, None, attempt + 1)


def _cancel(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # noqa: BLE001 - a dead stream may refuse; nothing to release then
            logger.debug("cancelling a replica stream failed", exc_info=True)
