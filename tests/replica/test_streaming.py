"""Tier-aware stream coalescing (`replica.streaming.coalesce`): tokens after the first are sent
together at most every interval; a token after a long engine gap, and a finished choice, go at
once; so the gap a client sees is at most max(interval, the engine's own gap).

The sources here emit on the event loop's clock; the assertions bound what coalescing does
(message counts, which tokens travel together, a send that must not wait for the interval) with
margins far above scheduling noise, not how fast anything runs."""

from __future__ import annotations

import asyncio
import time

import pytest

from replica.contract import StreamChunk, TokenLogprob
from replica.streaming import coalesce


async def _source(gaps_s: list[float], *, index: int = 0, log: list | None = None):
    """One token per gap (cumulative counts, token id = its number), the last one finished;
    ``log`` gets (token number, emission time)."""
    n = len(gaps_s)
    for k, gap in enumerate(gaps_s, start=1):
        await asyncio.sleep(gap)
        if log is not None:
            log.append((k, time.monotonic()))
        yield StreamChunk(num_tokens=k, text=f"t{k} ", finish_reason="length" if k == n else None, index=index,
                          token_ids=(k,))


async def _collect(chunks) -> list[tuple[float, StreamChunk]]:
    return [(time.monotonic(), c) async for c in chunks]


def test_tokens_faster_than_the_interval_travel_together_in_order():
    sent = asyncio.run(_collect(coalesce(_source([0.01] * 30), 0.1)))
    chunks = [c for _, c in sent]
    assert len(chunks) <= 8  # 30 tokens over ~0.3 s in 0.1 s batches, not 30 messages
    assert [t for c in chunks for t in c.token_ids] == list(range(1, 31))
    assert "".join(c.text for c in chunks) == "".join(f"t{k} " for k in range(1, 31))
    assert [c.num_tokens for c in chunks] == sorted({c.num_tokens for c in chunks}) and chunks[-1].num_tokens == 30
    assert chunks[-1].finish_reason == "length" and not any(c.finished for c in chunks[:-1])


def test_no_two_messages_come_closer_than_the_interval_but_a_finished_choice():
    sent = asyncio.run(_collect(coalesce(_source([0.005] * 60), 0.05)))
    gaps = [b - a for (a, _), (b, _) in zip(sent, sent[1:])]
    assert all(g >= 0.045 for g in gaps[:-1]), gaps  # the last one: the finish, at once


def test_a_token_after_a_long_engine_gap_goes_at_once():
    """The gap a client sees is never lengthened beyond the engine's: the token that ends a long
    engine gap is sent when it comes, not an interval later."""
    log: list = []
    sent = asyncio.run(_collect(coalesce(_source([0.01, 0.01, 0.6, 0.01, 0.01], log=log), 0.3)))
    emitted = dict(log)
    [(t_sent, chunk)] = [(t, c) for t, c in sent if 3 in c.token_ids]
    assert chunk.token_ids[0] == 3  # it did not wait for company
    assert t_sent - emitted[3] < 0.15  # at once (half the interval: far above scheduling noise)


def test_a_finished_choice_is_not_held_for_the_interval():
    log: list = []
    sent = asyncio.run(_collect(coalesce(_source([0.01, 0.01, 0.01], log=log), 1.0)))
    emitted = dict(log)
    assert sent[-1][1].finished and sent[-1][0] - emitted[3] < 0.5


def test_the_choices_of_one_request_are_merged_each_on_its_own():
    async def two_choices():
        a, b = _source([0.01] * 10, index=0), _source([0.012] * 10, index=1)
        # interleave the two sources as an engine step would
        pending = {asyncio.ensure_future(anext(a)): a, asyncio.ensure_future(anext(b)): b}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                src = pending.pop(fut)
                try:
                    yield fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(src))] = src

    chunks = [c for _, c in asyncio.run(_collect(coalesce(two_choices(), 0.05)))]
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert [t for c in mine for t in c.token_ids] == list(range(1, 11))
        assert mine[-1].finished and mine[-1].num_tokens == 10
    assert len(chunks) < 20


def test_interval_zero_passes_every_chunk_through():
    chunks = [c for _, c in asyncio.run(_collect(coalesce(_source([0.001] * 12), 0.0)))]
    assert [c.num_tokens for c in chunks] == list(range(1, 13))


def test_closing_the_coalescer_stops_its_read_so_the_source_can_be_closed():
    """A client that goes away: the coalescer is closed while it waits for the engine; its
    pending read is cancelled and finished, so the engine's stream closes (aborting the request)."""
    closed = asyncio.Event()

    async def engine():
        try:
            yield StreamChunk(num_tokens=1, text="a")
            await asyncio.sleep(30)  # the engine is busy
            yield StreamChunk(num_tokens=2, text="b")
        finally:
            closed.set()

    async def main():
        source = engine()
        stream = coalesce(source, 0.05)
        assert (await anext(stream)).num_tokens == 1
        reader = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.1)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await stream.aclose()
        await source.aclose()  # no "asynchronous generator is already running"
        return closed.is_set()

    assert asyncio.run(main())


def test_merged_chunks_keep_what_a_client_would_have_read():
    lp = TokenLogprob(7, "x", -1.0)
    parts = [StreamChunk(num_tokens=1, text="a", token_ids=(5,), logprobs=(lp,), prompt_logprobs=(None,)),
             StreamChunk(num_tokens=3, text="bc", token_ids=(6, 7), logprobs=(lp, lp)),
             StreamChunk(num_tokens=4, text="", finish_reason="stop", stop_reason="END", token_ids=(8,),
                         logprobs=(lp,))]
    m = StreamChunk.merge(parts)
    assert (m.num_tokens, m.text, m.token_ids, m.finish_reason, m.stop_reason) == (4, "abc", (5, 6, 7, 8), "stop",
                                                                                  "END")
    assert m.logprobs == (lp,) * 4 and m.prompt_logprobs == (None,)
    sim = StreamChunk.merge([StreamChunk(num_tokens=1), StreamChunk(num_tokens=2)])
    assert sim.text is None and sim.num_tokens == 2 and sim.logprobs is None  # the sim's text is the ingress's
    with pytest.raises(ValueError):
        StreamChunk.merge([StreamChunk(num_tokens=1, index=0), StreamChunk(num_tokens=1, index=1)])
