"""Tier-aware stream coalescing at the replica: a stream's first token goes at once, later ones
are sent together at most every ``interval_s`` (the tier's `TierFacts.stream_interval_s`).

Each message from a replica to the ingress is a Ray object, an SSE event and an ASGI message
through Serve's proxy: CPU per message, whatever it carries.  Coalescing sends fewer, larger
messages.  The rule, per stream: after a message at time t, the next goes at t + interval_s with
whatever the engine produced meanwhile (one merged `StreamChunk` per choice,
`StreamChunk.merge`), or, when nothing was waiting then, at once with the next engine output; a
finished choice goes at once.  So the gap a client sees between messages is at most
max(interval_s, the engine's own gap): coalescing never stretches a gap beyond the interval, and
the gap after a long engine gap is not lengthened at all (`replica.contract`,
`STREAM_INTERVAL_SLO_FRACTION`, says how the interval is chosen).

`coalesce(chunks, interval_s)` wraps any backend's chunk stream (the sim engine's per-token
chunks, vLLM's per-step DELTA outputs).  Closing it cancels its pending read of ``chunks`` (the
caller then closes ``chunks``, which aborts the engine request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from replica.contract import StreamChunk

__all__ = ["cancel_read", "coalesce"]


async def coalesce(chunks: AsyncIterator[StreamChunk], interval_s: float, *,
                   clock: Callable[[], float] = time.monotonic) -> AsyncIterator[StreamChunk]:
    """``chunks`` (after the stream's first, which the caller has sent: the interval starts now)
    sent at most every ``interval_s`` (merged per choice); ``interval_s`` <= 0: as they come."""
    if interval_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    waiting: dict[int, list[StreamChunk]] = {}  # choice index -> chunks not sent yet, in order
    next_send = clock() + interval_s
    pending: asyncio.Future[StreamChunk] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            timeout = max(0.0, next_send - clock()) if waiting else None
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if not done:  # the interval is over: send what waits
                for index in list(waiting):
                    yield StreamChunk.merge(waiting.pop(index))
                next_send = clock() + interval_s
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                pending = None
                for index in list(waiting):
                    yield StreamChunk.merge(waiting.pop(index))
                return
            pending = None
            waiting.setdefault(chunk.index, []).append(chunk)
            if chunk.finished:  # a finished choice goes at once (with what waited of it)
                yield StreamChunk.merge(waiting.pop(chunk.index))
            elif clock() >= next_send:  # nothing waited through the interval: at once
                for index in list(waiting):
                    yield StreamChunk.merge(waiting.pop(index))
                next_send = clock() + interval_s
    finally:
        await cancel_read(pending)


async def cancel_read(pending: asyncio.Future | None) -> None:
    """Cancel a pending read of an async generator and wait until it has stopped (the generator
    can be closed only once no read of it is running)."""
    if pending is not None and not pending.done():
        pending.cancel()
        await asyncio.wait({pending})
