"""`serve_app.stream`: a replica stream whose replica died before its first chunk is opened again,
once; anything else is reported as before (no Ray cluster: fake streams)."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from replica.contract import StreamChunk  # noqa: E402
from serve_app.stream import (ReplicaHung, is_replica_death, merge_runs,  # noqa: E402
                              open_replica_stream, retry_request_id)


class FakeStream:
    """A replica stream: raises ``error`` at the first ``__anext__`` or yields ``chunks``."""

    def __init__(self, chunks=(), error: BaseException | None = None, delay_s: float = 0.0) -> None:
        self.chunks, self.error, self.delay_s = list(chunks), error, delay_s
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        if not self.chunks:
            raise StopAsyncIteration
        if self.chunks[0] is None:  # a replica that stops answering
            await asyncio.Event().wait()
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def _starter(*streams: FakeStream):
    calls: list[int] = []

    def start(attempt: int) -> FakeStream:
        calls.append(attempt)
        return streams[len(calls) - 1]

    return start, calls


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("generate", "traceback", cause)


@pytest.mark.parametrize("error, death", [
    (ActorDiedError(), True),
    (ActorUnavailableError("connection lost", None), True),
    (RuntimeError("engine exploded"), False),
    (ValueError("duplicate request id"), False),
    (BackPressureError(num_queued_requests=3, max_queued_requests=2), False),
])
def test_is_replica_death(error, death):
    assert is_replica_death(error) is death


def test_is_replica_death_follows_causes():
    wrapped = RuntimeError("stream failed")
    wrapped.__cause__ = ActorDiedError()
    assert is_replica_death(wrapped)
    assert is_replica_death(_task_error(ActorDiedError()))
    assert not is_replica_death(_task_error(ValueError("bad input")))
    assert not is_replica_death(None)
    loop = RuntimeError("a")  # a cause cycle ends
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop
    assert not is_replica_death(loop)


def test_a_replica_death_before_the_first_chunk_is_retried_once_on_a_fresh_call():
    dead, live = FakeStream(error=ActorDiedError()), FakeStream(chunks=[StreamChunk(1), StreamChunk(2)])
    start, calls = _starter(dead, live)
    opened = asyncio.run(open_replica_stream(start, request_id="cmpl-1"))
    assert calls == [0, 1] and opened.attempts == 2
    assert opened.stream is live and opened.first == StreamChunk(1) and opened.error is None
    assert dead.cancelled and not live.cancelled


def test_at_most_retries_more_attempts_then_the_error_is_returned():
    streams = [FakeStream(error=ActorDiedError()) for _ in range(3)]
    start, calls = _starter(*streams)
    opened = asyncio.run(open_replica_stream(start, retries=1))
    assert calls == [0, 1] and opened.attempts == 2
    assert opened.stream is streams[1] and isinstance(opened.error, ActorDiedError) and opened.first is None
    start, calls = _starter(*[FakeStream(error=ActorUnavailableError("down", None)) for _ in range(3)])
    assert asyncio.run(open_replica_stream(start, retries=2)).attempts == 3 and calls == [0, 1, 2]
    start, calls = _starter(FakeStream(error=ActorDiedError()))
    assert asyncio.run(open_replica_stream(start, retries=0)).attempts == 1 and calls == [0]


def test_other_errors_are_not_retried():
    start, calls = _starter(FakeStream(error=RuntimeError("engine exploded")), FakeStream(chunks=[StreamChunk(1)]))
    opened = asyncio.run(open_replica_stream(start))
    assert calls == [0] and isinstance(opened.error, RuntimeError) and opened.attempts == 1


def test_first_chunk_and_an_empty_stream():
    start, _ = _starter(FakeStream(chunks=[StreamChunk(1)]))
    opened = asyncio.run(open_replica_stream(start))
    assert opened.first == StreamChunk(1) and opened.error is None and opened.attempts == 1
    start, _ = _starter(FakeStream())
    opened = asyncio.run(open_replica_stream(start))
    assert opened.first is None and opened.error is None


def test_backpressure_propagates_without_retry():
    start, calls = _starter(FakeStream(error=BackPressureError(num_queued_requests=3, max_queued_requests=2)))
    with pytest.raises(BackPressureError):
        asyncio.run(open_replica_stream(start))
    assert calls == [0]


def test_a_cancelled_client_cancels_the_stream():
    stream = FakeStream(chunks=[StreamChunk(1)], delay_s=10)
    start, _ = _starter(stream)

    async def main():
        task = asyncio.create_task(open_replica_stream(start))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert stream.cancelled


def test_retry_request_ids_are_distinct_per_attempt():
    assert retry_request_id("cmpl-abc", 0) == "cmpl-abc"
    ids = {retry_request_id("cmpl-abc", a) for a in range(4)}
    assert len(ids) == 4 and all(i.startswith("cmpl-abc") for i in ids)


# --- the ingress: a non-streaming request whose replica dies mid-generation starts over ---------------

def _complete_with_deaths(die_after: list[int | None]):
    from ingress_testkit import call_inprocess, make_ingress

    ingress, replicas = make_ingress("fk-retry-test-key-0123456789abcdef:free")
    replicas.die_after = list(die_after)
    body = json.dumps({"model": ingress.model_name, "prompt": "hello", "max_tokens": 6}).encode()
    status, _, content = call_inprocess(ingress, body, [("Authorization", "Bearer fk-retry-test-key-0123456789abcdef")])
    return status, json.loads(content), replicas.payloads, ingress


def test_a_non_streaming_request_starts_over_when_its_replica_dies_mid_generation():
    status, body, payloads, ingress = _complete_with_deaths([3, None])  # dies after 3 of 6 tokens
    assert status == 200 and body["usage"]["completion_tokens"] == 6, body
    assert len(payloads) == 2 and payloads[0].request_id != payloads[1].request_id
    assert len(ingress.in_flight) == 0


def test_a_second_death_mid_generation_is_a_500_with_openai_error_json():
    status, body, payloads, ingress = _complete_with_deaths([3, 2])
    assert status == 500 and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert len(payloads) == 2 and len(ingress.in_flight) == 0



def test_heartbeats_are_skipped_and_a_replica_that_stops_beating_is_given_up():
    hb = StreamChunk.heartbeat()
    start, calls = _starter(FakeStream(chunks=[hb, hb, StreamChunk(1)]))
    opened = asyncio.run(open_replica_stream(start, idle_timeout_s=1.0))
    assert opened.first == StreamChunk(1) and opened.attempts == 1
    # a replica that took the request (one heartbeat) and then went silent: retried
    silent = FakeStream(chunks=[hb], delay_s=0.0)
    silent.chunks.append(None)  # then hangs (see FakeStream: None = wait forever)
    start, calls = _starter(silent, FakeStream(chunks=[StreamChunk(1)]))
    opened = asyncio.run(open_replica_stream(start, idle_timeout_s=0.1))
    assert calls == [0, 1] and opened.first == StreamChunk(1) and silent.cancelled


def test_heartbeats_do_not_extend_the_first_token_deadline():
    hb = StreamChunk.heartbeat()
    beating = FakeStream(chunks=[hb] * 50, delay_s=0.02)  # alive, but no token for 1 s
    start, calls = _starter(beating)
    opened = asyncio.run(open_replica_stream(start, retries=0, first_timeout_s=0.3, idle_timeout_s=5.0))
    assert isinstance(opened.error, ReplicaHung) and "first token" in str(opened.error)


# --- chunks that have already arrived are taken with the one read, merged per choice -------------

class ArrivedStream:
    """A Serve stream whose chunks have ``arrived`` (in order); ``_to_object_ref_gen`` gives the
    object-ref generator view of the same items (``next_ready`` / ``next``), as Serve's does.  An
    exception in ``arrived`` is an error item."""

    def __init__(self, arrived) -> None:
        self.arrived = list(arrived)
        self.cancelled = False

    def __aiter__(self):
        return self

    def _pop(self):
        item = self.arrived.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def __anext__(self):
        if not self.arrived:
            raise StopAsyncIteration
        return self._pop()

    async def _to_object_ref_gen(self):
        stream = self

        class Gen:
            def next_ready(self):  # as Ray's: the end of the stream is ready too
                return True

            def __next__(self):
                if not stream.arrived:
                    raise StopIteration
                return stream._pop()

        return Gen()

    def cancel(self) -> None:
        self.cancelled = True


def _read_all(stream) -> list:
    async def main():
        opened = await open_replica_stream(lambda attempt: stream)
        return [c async for c in opened]

    return asyncio.run(main())


def _c(n, text, index=0, finish=None):
    return StreamChunk(num_tokens=n, text=text, index=index, token_ids=(n,), finish_reason=finish)


def test_a_backlog_of_one_choice_is_read_as_one_merged_chunk():
    chunks = _read_all(ArrivedStream([_c(1, "a"), _c(2, "b"), _c(3, "c"), _c(4, "d", finish="length")]))
    # the first chunk is the one opening read (its own event: time to first token), then the rest at once
    assert chunks == [_c(1, "a"), StreamChunk(num_tokens=4, text="bcd", token_ids=(2, 3, 4), finish_reason="length")]


def test_a_strict_stream_of_small_chunks_gets_as_many_tokens_per_read_as_a_bulk_one():
    small = _read_all(ArrivedStream([_c(k, "x") for k in range(1, 21)]))          # 1 token per chunk
    large = _read_all(ArrivedStream([_c(5 * k, "xxxxx") for k in range(1, 5)]))   # 5 tokens per chunk
    assert len(small) == len(large) == 2 and small[-1].num_tokens == large[-1].num_tokens == 20


def test_chunks_of_several_choices_keep_their_order_and_merge_only_in_runs():
    chunks = _read_all(ArrivedStream([_c(1, "a", 0), _c(1, "A", 1), _c(2, "B", 1), _c(2, "b", 0), _c(3, "c", 0),
                                      _c(3, "C", 1, finish="stop")]))
    assert [(c.index, c.text, c.num_tokens) for c in chunks] == [(0, "a", 1), (1, "AB", 2), (0, "bc", 3),
                                                                 (1, "C", 3)]


def test_an_error_item_is_raised_after_the_chunks_that_came_before_it():
    stream = ArrivedStream([_c(1, "a"), _c(2, "b"), _c(3, "c"), RuntimeError("replica broke")])

    async def main():
        opened = await open_replica_stream(lambda attempt: stream)
        got = []
        with pytest.raises(RuntimeError, match="replica broke"):
            async for c in opened:
                got.append(c)
        return got

    assert [c.text for c in asyncio.run(main())] == ["a", "bc"]


def test_a_stream_opened_without_take_arrived_is_read_chunk_by_chunk():
    chunks = [_c(1, "a"), _c(2, "b"), _c(3, "c")]
    stream = ArrivedStream(list(chunks))

    async def main():
        opened = await open_replica_stream(lambda attempt: stream, take_arrived=False)
        return [c async for c in opened]

    assert asyncio.run(main()) == chunks


def test_a_stream_without_an_object_ref_view_is_read_chunk_by_chunk():
    chunks = [_c(1, "a"), _c(2, "b"), _c(3, "c")]
    assert _read_all(FakeStream(chunks=list(chunks))) == chunks


def test_nothing_arrived_means_nothing_is_merged():
    stream = ArrivedStream([_c(1, "a")])

    async def main():
        opened = await open_replica_stream(lambda attempt: stream)
        got = [await opened.__anext__()]
        stream.arrived.append(_c(2, "b"))  # arrives later, alone (the fake's end is "ready" at once)
        got.append(await opened.__anext__())
        stream.arrived.append(_c(3, "c"))
        got.append(await opened.__anext__())
        return got

    assert asyncio.run(main()) == [_c(1, "a"), _c(2, "b"), _c(3, "c")]


def test_an_ended_stream_raises_before_its_queued_chunks():
    stream = ArrivedStream([_c(1, "a"), _c(1, "A", 1), _c(2, "b", 0)])

    async def main():
        opened = await open_replica_stream(lambda attempt: stream)
        await opened.__anext__()                         # "a"
        await opened.__anext__()                         # "A"; "b" queued
        opened.end(RuntimeError("draining"))
        with pytest.raises(RuntimeError, match="draining"):
            await opened.__anext__()

    asyncio.run(main())
    assert stream.cancelled


@pytest.mark.parametrize("chunks, expected", [
    ([], []),
    ([_c(1, "a")], [(0, "a", 1, None)]),
    ([_c(1, "a"), _c(2, "b")], [(0, "ab", 2, None)]),
    ([_c(1, "a", finish="stop"), _c(1, "A", 1)], [(0, "a", 1, "stop"), (1, "A", 1, None)]),
    ([StreamChunk.heartbeat(), _c(1, "a"), StreamChunk.heartbeat(), _c(2, "b")],
     [(0, None, 0, None), (0, "ab", 2, None)]),
])
def test_merge_runs(chunks, expected):
    assert [(c.index, c.text, c.num_tokens, c.finish_reason) for c in merge_runs(chunks)] == expected
