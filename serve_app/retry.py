"""Retrying a replica stream whose replica died before it produced anything.

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
        lambda attempt: handle.options(stream=True).generate.remote(payload_for(attempt)))
    # opened.stream, opened.first (or END), opened.error, opened.attempts

``BackPressureError`` and ``asyncio.CancelledError`` propagate (the stream is cancelled on the
latter: the client is gone), as they did from the first ``__anext__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_RETRIES", "END", "OpenedStream", "is_replica_death", "open_replica_stream", "retry_request_id"]

logger = logging.getLogger("ray.serve")

END: Any = object()  # `OpenedStream.first` of a stream that ended before its first chunk

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


@dataclass
class OpenedStream:
    """A replica stream and what reading its first chunk gave: ``first`` (`END` when the stream
    ended at once), or ``error`` (the exception that reading raised, after the retries)."""

    stream: Any
    first: Any = END
    error: BaseException | None = None
    attempts: int = 1


async def open_replica_stream(start: Callable[[int], Any], *, retries: int = DEFAULT_RETRIES,
                              request_id: str = "") -> OpenedStream:
    """Starts a replica stream with ``start(attempt)`` (attempt 0, 1, ...) and reads its first
    chunk; when that read fails because the replica died (`is_replica_death`), starts it again,
    at most ``retries`` more times.  Other errors are returned in `OpenedStream.error` (no
    retry); ``BackPressureError`` and ``CancelledError`` propagate (the latter after cancelling
    the stream)."""
    from ray.serve.exceptions import BackPressureError

    attempt = 0
    while True:
        stream = start(attempt)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return OpenedStream(stream, END, None, attempt + 1)
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
            return OpenedStream(stream, None, e, attempt + 1)
        return OpenedStream(stream, first, None, attempt + 1)


def _cancel(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # noqa: BLE001 - a dead stream may refuse; nothing to release then
            logger.debug("cancelling a replica stream failed", exc_info=True)
