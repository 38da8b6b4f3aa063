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

Deadlines: a replica that hangs without dying is no better than a dead one.  A replica sends a
heartbeat chunk when it takes a request and every second until the first token
(`replica.contract.StreamChunk.heartbeat`; skipped here), so two deadlines tell queueing from
hanging: nothing at all, heartbeat or token, for ``idle_timeout_s``, or no first token within
``first_timeout_s``, counts as a failure of that replica (`ReplicaHung`): the stream is cancelled
and opened again on another replica while the retry budget lasts (Serve's router skips a replica
that does not answer its queue-length probe).  Once open, a gap of more than ``idle_timeout_s``
between chunks raises `ReplicaHung` from the iteration.  `ReplicaStream.end(error)` ends a stream
from outside (the ingress draining at shutdown): the underlying stream is cancelled and the
iteration raises ``error``.

Under load a stream's chunks queue at the ingress faster than its event loop reads them, one loop
turn per chunk: a stream whose replica sends many small chunks (a strict tier's short stream
interval, `replica.streaming`) would then get fewer tokens per second than one that sends few
large ones, the strict tier last.  So with the ``object_ref`` transport (`StreamingConfig`) each
read also takes every further chunk that has already arrived (Ray's
``ObjectRefGenerator.next_ready``: no wait, no loop turn) and merges those of one choice into one (`StreamChunk.merge`): the client gets one event with everything there is, and
a stream's share of the ingress is in tokens, not in chunks.  With no backlog nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from replica.contract import EngineRejected, StreamChunk

__all__ = ["DEFAULT_RETRIES", "ReplicaHung", "ReplicaStream", "engine_rejection", "is_replica_death",
           "is_replica_failure", "merge_runs", "open_replica_stream", "ready_taker", "retry_request_id"]

logger = logging.getLogger("ray.serve")

DEFAULT_RETRIES = 1


class ReplicaHung(TimeoutError):
    """The replica sent no chunk within the deadline (it may be alive, but it is not serving)."""


def _actor_error_types() -> tuple[type[BaseException], ...]:
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency of the app
        return ()
    return (RayActorError,)  # ActorDiedError and ActorUnavailableError are subclasses


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and what caused it (``RayTaskError.cause``, ``__cause__``/``__context__``),
    followed a few levels deep."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 8:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        todo.extend(c for c in (cause, e.__cause__, e.__context__) if isinstance(c, BaseException))


def is_replica_death(error: BaseException | None) -> bool:
    """Whether ``error`` says the replica actor serving the request died or is unreachable:
    a `RayActorError` (``ActorDiedError``, ``ActorUnavailableError``), or an error caused by one."""
    types = _actor_error_types()
    return bool(types) and any(isinstance(e, types) for e in _causes(error))


def engine_rejection(error: BaseException | None) -> EngineRejected | None:
    """The `replica.contract.EngineRejected` that ``error`` is or wraps (Ray's ``RayTaskError``
    carries the original as ``cause``), or None."""
    return next((e for e in _causes(error) if type(e) is EngineRejected), None)


def is_replica_failure(error: BaseException | None) -> bool:
    """Whether ``error`` is the replica's fault (it died or it hung): the request may be run
    again elsewhere if its client has received nothing yet."""
    return isinstance(error, ReplicaHung) or is_replica_death(error)


def retry_request_id(request_id: str, attempt: int) -> str:
    """The engine request id of attempt ``attempt`` (0: the first): distinct per attempt, so a
    replica that was only unreachable, still running the first attempt, never sees a duplicate."""
    return request_id if attempt == 0 else f"{request_id}-retry{attempt}"


class ReplicaStream:
    """A replica stream whose first chunk was read when it was opened (`open_replica_stream`):
    ``stream`` (the underlying one), ``first`` (that chunk; None when the stream ended before
    one), ``error`` (what reading it raised, after the retries; iterating raises it),
    ``attempts`` (streams opened).  Iterates ``first``, then the rest, each within
    ``idle_timeout_s`` of the one before (`ReplicaHung`); `cancel` cancels the underlying stream
    (which aborts the engine request); `end` does too, and makes the iteration raise."""

    __slots__ = ("stream", "first", "error", "attempts", "idle_timeout_s", "_pending", "_ended", "_queue",
                 "_take_ready", "_error_next")

    def __init__(self, stream: Any, first: StreamChunk | None = None, error: BaseException | None = None,
                 attempts: int = 1, idle_timeout_s: float | None = None, take_arrived: bool = True) -> None:
        self.stream, self.first, self.error, self.attempts = stream, first, error, attempts
        self.idle_timeout_s = idle_timeout_s
        self._pending = True
        self._ended: BaseException | None = None
        self._queue: deque[StreamChunk] = deque()  # merged chunks not returned yet (other choices)
        # None: not looked up yet; False: read chunk by chunk (not asked for, or the stream cannot tell)
        self._take_ready: Callable[[], list[Any]] | None | bool = None if take_arrived else False
        self._error_next: BaseException | None = None  # what taking the ready chunks raised

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._ended is not None:
            raise self._ended
        if self._queue:
            return self._queue.popleft()
        if self._error_next is not None:
            error, self._error_next = self._error_next, None
            raise error
        if self._pending:
            self._pending = False
            if self.error is not None:
                raise self.error
            if self.first is None:
                raise StopAsyncIteration
            return self._with_ready(self.first)
        if self.first is None or self.error is not None:
            raise StopAsyncIteration
        if self._take_ready is None:
            self._take_ready = await ready_taker(self.stream) or False
        try:
            if self.idle_timeout_s is None:
                chunk = await self.stream.__anext__()
            else:
                async with asyncio.timeout(self.idle_timeout_s):
                    chunk = await self.stream.__anext__()
        except TimeoutError:
            if self._ended is not None:
                raise self._ended from None
            raise ReplicaHung(f"the replica sent nothing for {self.idle_timeout_s:g} s") from None
        except StopAsyncIteration:
            raise
        except Exception:
            if self._ended is not None:  # ended from outside: what the underlying stream raised is ours
                raise self._ended from None
            raise
        return self._with_ready(chunk)

    def _with_ready(self, chunk: StreamChunk) -> StreamChunk:
        """``chunk`` merged with the chunks of its choice that have arrived after it (see the
        module's docstring); chunks of other choices wait in the queue, in order."""
        if not self._take_ready:
            return chunk
        try:
            ready = self._take_ready()
        except Exception as e:  # noqa: BLE001 - raised by the next read, after what came before it
            ready, self._error_next = getattr(e, "chunks_before", []), e
        if not ready:
            return chunk
        merged = merge_runs([chunk, *ready])
        self._queue.extend(merged[1:])
        return merged[0]

    def cancel(self) -> None:
        _cancel(self.stream)

    def end(self, error: BaseException) -> None:
        """End the stream from outside: cancel it; the iteration raises ``error`` from now on
        (also a wait already in progress, once the cancelled stream gives up)."""
        self._ended = error
        _cancel(self.stream)


async def open_replica_stream(start: Callable[[int], Any], *, retries: int = DEFAULT_RETRIES,
                              request_id: str = "", first_timeout_s: float | None = None,
                              idle_timeout_s: float | None = None, take_arrived: bool = True) -> ReplicaStream:
    """Starts a replica stream with ``start(attempt)`` (attempt 0, 1, ...) and reads its first
    chunk; when that read fails because the replica died (`is_replica_death`) or sent nothing
    within ``first_timeout_s`` (`ReplicaHung`), starts it again, at most ``retries`` more times.
    Other errors are returned in `ReplicaStream.error` (no retry); ``BackPressureError`` and
    ``CancelledError`` propagate (the latter after cancelling the stream).  ``take_arrived``: each
    later read also takes the chunks that have already arrived (a by-reference Serve stream)."""
    from ray.serve.exceptions import BackPressureError

    attempt = 0
    while True:
        stream = start(attempt)
        try:
            first = await _first_chunk(stream, first_timeout_s, idle_timeout_s)
        except StopAsyncIteration:
            return ReplicaStream(stream, None, None, attempt + 1, idle_timeout_s, take_arrived)
        except BackPressureError:
            raise
        except asyncio.CancelledError:
            _cancel(stream)  # client gone: abort the engine request
            raise
        except Exception as e:  # noqa: BLE001 - returned to the caller, which reports it
            if attempt < retries and is_replica_failure(e):
                attempt += 1
                logger.warning("request %s: its replica %s before the first token (%s); retrying "
                               "(attempt %d of %d)", request_id, "hung" if isinstance(e, ReplicaHung) else "died",
                               type(e).__name__, attempt + 1, retries + 1)
                _cancel(stream)
                continue
            if isinstance(e, ReplicaHung):
                _cancel(stream)
            return ReplicaStream(stream, None, e, attempt + 1, idle_timeout_s, take_arrived)
        return ReplicaStream(stream, first, None, attempt + 1, idle_timeout_s, take_arrived)


async def _first_chunk(stream: Any, first_timeout_s: float | None, idle_timeout_s: float | None) -> StreamChunk:
    """The stream's first chunk with a token (or its last chunk), heartbeats skipped; `ReplicaHung`
    when nothing comes for ``idle_timeout_s`` or no token within ``first_timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = None if first_timeout_s is None else loop.time() + first_timeout_s
    while True:
        timeout = idle_timeout_s
        if deadline is not None:
            left = deadline - loop.time()
            timeout = left if timeout is None else min(timeout, left)
        try:
            if timeout is None:
                chunk = await stream.__anext__()
            else:
                async with asyncio.timeout(max(timeout, 0.0)):
                    chunk = await stream.__anext__()
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise ReplicaHung(f"no first token within {first_timeout_s:g} s") from None
            raise ReplicaHung(f"the replica gave no sign of life for {idle_timeout_s:g} s") from None
        if not chunk.is_heartbeat:
            return chunk


MAX_READY_CHUNKS = 1024  # taken at most per read: a bound on the work of one loop turn


async def ready_taker(stream: Any) -> Callable[[], list[Any]] | None:
    """A function returning the chunks of ``stream`` that have already arrived, without waiting
    (at most `MAX_READY_CHUNKS`), or None where the stream cannot tell (not a Serve stream).
    Reads Ray's ``ObjectRefGenerator`` under Serve's ``DeploymentResponseGenerator`` (its
    developer API ``_to_object_ref_gen``); the stream's own ``__anext__`` reads the same
    generator, so the two never reorder.  An error item raises, with the chunks taken before it
    in its ``chunks_before``."""
    to_gen = getattr(stream, "_to_object_ref_gen", None)
    if to_gen is None:
        return None
    try:
        gen = await to_gen()
    except Exception:  # noqa: BLE001 - e.g. a by-value handle: no draining, nothing else changes
        logger.debug("replica stream: no object-ref generator; chunks are read one by one", exc_info=True)
        return None
    import ray

    # ray.get below only ever reads objects that next_ready() says are here (no wait): Ray's
    # warning about blocking gets inside an async actor does not apply.
    os.environ.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")

    def take() -> list[Any]:
        out: list[Any] = []
        while len(out) < MAX_READY_CHUNKS and gen.next_ready():
            try:
                item = next(gen)
                out.append(ray.get(item) if isinstance(item, ray.ObjectRef) else item)
            except StopIteration:  # the end is "ready" too: the stream's next read ends it
                break
            except Exception as e:
                e.chunks_before = out  # type: ignore[attr-defined]
                raise
        return out

    return take


def merge_runs(chunks: list[StreamChunk]) -> list[StreamChunk]:
    """``chunks`` (in arrival order) with every run of consecutive chunks of one choice merged
    into one (`StreamChunk.merge`), heartbeats after the first dropped; order kept."""
    runs: list[list[StreamChunk]] = []
    for c in chunks:
        if runs and c.is_heartbeat:
            continue
        last = runs[-1][-1] if runs else None
        if last is not None and not last.is_heartbeat and last.index == c.index and last.finish_reason is None:
            runs[-1].append(c)
        else:
            runs.append([c])
    return [StreamChunk.merge(r) for r in runs]


def _cancel(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # noqa: BLE001 - a dead stream may refuse; nothing to release then
            logger.debug("cancelling a replica stream failed", exc_info=True)
