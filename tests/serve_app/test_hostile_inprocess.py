"""Every bound has a deadline, in process (the real Ingress class, fake replicas, no Ray): hung
replicas, slow bodies, Serve's backpressure, no replica left, shutdown, cheap refusals, tier caps,
per-key limits and the fair share inside a tier.  The live, loopback versions of the hostile
cases are in test_hostile_live.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("ray")
from ingress_testkit import call_async, call_inprocess, make_ingress, snapshot  # noqa: E402

FREE_KEY = "fk-hostile-test-free-0123456789"
FREE_KEY2 = "fk-hostile-test-free-abcdefghij"
PREMIUM_KEY = "pk-hostile-test-premium-0123456789"
KEYS = f"{FREE_KEY}:free,{FREE_KEY2}:free,{PREMIUM_KEY}:premium"
FREE = 1  # the index of the free tier in serve_app/configs/sim.yaml


def _auth(key: str = FREE_KEY) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _body(ingress, **kw) -> bytes:
    return json.dumps({"model": ingress.model_name, "prompt": "hello there", "max_tokens": 6, **kw}).encode()


def _events(content: bytes) -> list:
    out = []
    for line in content.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _ingress(**overrides):
    return make_ingress(KEYS, overrides)


def _released(ingress) -> bool:
    return ingress.state() == {"in_flight": 0, "active_streams": 0, "key_slots": 0}


# --- replicas that hang ---------------------------------------------------------------------------

def test_a_replica_that_sends_no_first_chunk_is_given_up_and_the_request_runs_elsewhere():
    ingress, replicas = _ingress(**{f"tiers.{FREE}.first_token_timeout_s": 0.2})
    replicas.hang_after = [0, None]
    t0 = time.perf_counter()
    status, _, content = call_inprocess(ingress, _body(ingress), _auth())
    assert status == 200 and json.loads(content)["usage"]["completion_tokens"] == 6
    assert 0.2 <= time.perf_counter() - t0 < 2.0
    assert len(replicas.payloads) == 2 and replicas.payloads[0].request_id != replicas.payloads[1].request_id
    assert replicas.streams[0].cancelled and _released(ingress)


@pytest.mark.parametrize("stream", [False, True])
def test_when_every_replica_hangs_the_client_gets_a_504_in_openai_json(stream):
    ingress, replicas = _ingress(**{f"tiers.{FREE}.first_token_timeout_s": 0.1})
    replicas.hang_after = [0, 0]
    status, headers, content = call_inprocess(ingress, _body(ingress, stream=stream), _auth())
    assert status == 504, content
    err = json.loads(content)["error"]
    assert err["code"] == "timeout" and err["type"] == "server_error" and set(err) == {"message", "type", "param",
                                                                                         "code"}
    assert all(s.cancelled for s in replicas.streams) and _released(ingress)


def test_a_stream_whose_replica_goes_silent_ends_with_an_error_event_and_done():
    ingress, replicas = _ingress(**{f"tiers.{FREE}.idle_timeout_s": 0.2})
    replicas.hang_after = [3]
    status, _, content = call_inprocess(ingress, _body(ingress, stream=True), _auth())
    events = _events(content)
    assert status == 200 and events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] != "" for e in events[:3]] == [True] * 3
    assert events[-2]["error"]["code"] == "timeout"
    assert replicas.streams[0].cancelled and _released(ingress)


def test_a_non_streaming_request_whose_replica_goes_silent_starts_over_elsewhere():
    ingress, replicas = _ingress(**{f"tiers.{FREE}.idle_timeout_s": 0.2})
    replicas.hang_after = [3, None]
    status, _, content = call_inprocess(ingress, _body(ingress), _auth())
    assert status == 200 and json.loads(content)["usage"]["completion_tokens"] == 6
    assert len(replicas.payloads) == 2 and _released(ingress)


# --- clients that are slow or send too much -------------------------------------------------------

def test_a_body_slower_than_its_deadline_gets_408_and_frees_its_slot():
    ingress, replicas = _ingress(**{"http.body_timeout_s": 0.2})
    status, _, content = asyncio.run(call_async(ingress, _body(ingress), _auth(), trickle_s=5.0))
    assert status == 408 and json.loads(content)["error"]["code"] == "request_timeout"
    assert not replicas.payloads and _released(ingress)


def test_a_prompt_longer_than_the_context_by_its_bytes_alone_is_refused_without_tokenizing(monkeypatch):
    ingress, replicas = _ingress()

    def no(*_):
        raise AssertionError("tokenized")

    monkeypatch.setattr(ingress.tokenizer, "encode", no)
    t0 = time.perf_counter()
    status, _, content = call_inprocess(ingress, _body(ingress, prompt="x" * 900_000), _auth())
    assert status == 400 and json.loads(content)["error"]["code"] == "context_length_exceeded"
    assert "at least" in json.loads(content)["error"]["message"] and time.perf_counter() - t0 < 1.0
    assert _released(ingress)


def test_long_prompts_are_tokenized_off_the_event_loop():
    import threading

    ingress, _ = make_ingress(KEYS, max_context_tokens=100_000)
    threads = []
    encode = ingress.tokenizer.encode

    def spy(text, add_special_tokens=False):
        threads.append(threading.current_thread().name)
        return encode(text, add_special_tokens)

    ingress.tokenizer.encode = spy
    assert call_inprocess(ingress, _body(ingress, prompt="hi " * 7000), _auth())[0] == 200  # 21 kB
    assert call_inprocess(ingress, _body(ingress, prompt="short"), _auth())[0] == 200
    assert threads[0].startswith("tokenize-free") and threads[1] == threading.main_thread().name


@pytest.mark.parametrize("field, value, param", [
    ("stop", ["a", "b", "c", "d", "e"], "stop"), ("stop", "x" * 300, "stop"),
    ("max_tokens", 100, "max_tokens"), ("ignore_eos", True, "ignore_eos"),
])
def test_what_a_tier_does_not_allow_is_a_400_naming_the_field(field, value, param):
    ingress, replicas = _ingress(**{f"tiers.{FREE}.max_tokens": 50, f"tiers.{FREE}.allow_ignore_eos": False})
    status, _, content = call_inprocess(ingress, _body(ingress, **{field: value}), _auth())
    assert status == 400 and json.loads(content)["error"]["param"] == param, content
    assert not replicas.payloads and _released(ingress)


def test_a_tiers_max_tokens_caps_the_default_and_ignore_eos_passes_where_allowed():
    ingress, replicas = _ingress(**{f"tiers.{FREE}.max_tokens": 5, f"tiers.{FREE}.allow_ignore_eos": True})
    body = json.dumps({"model": ingress.model_name, "prompt": "hi", "ignore_eos": True}).encode()
    status, _, _ = call_inprocess(ingress, body, _auth())
    assert status == 200 and replicas.payloads[0].max_tokens == 5 and replicas.payloads[0].sampling.ignore_eos


# --- the cluster cannot serve, or is shutting down ------------------------------------------------

def test_serves_backpressure_is_a_429_with_its_retry_after():
    ingress, replicas = _ingress()
    replicas.backpressure = True
    status, headers, content = call_inprocess(ingress, _body(ingress), _auth())
    assert status == 429 and headers["retry-after"] == "3"  # Serve's 2.5 s, rounded up
    assert json.loads(content)["error"]["code"] == "overloaded" and _released(ingress)


def test_replicas_too_busy_to_answer_the_health_poll_are_not_taken_for_down():
    ingress, replicas = _ingress()
    replicas.snapshots = [None, None, None]  # alive, but none answers the poll within its deadline
    status, _, content = call_inprocess(ingress, _body(ingress), _auth())
    assert status == 200, content
    assert ingress.poller.healthy is None and replicas.payloads


def test_with_no_replica_answering_requests_get_503_at_once_and_health_says_so():
    ingress, replicas = _ingress()
    replicas.snapshots = []  # the broadcast reaches no running replica
    t0 = time.perf_counter()
    status, headers, content = call_inprocess(ingress, _body(ingress), _auth())
    assert status == 503 and int(headers["retry-after"]) >= 1 and time.perf_counter() - t0 < 1.0
    assert json.loads(content)["error"]["code"] == "service_unavailable" and not replicas.payloads
    health = asyncio.run(ingress.health())
    assert health.status_code == 503
    replicas.snapshots = [snapshot("r0")]
    ingress.poller.polled_s = -float("inf")  # the next check polls again
    assert asyncio.run(ingress.health()).status_code == 200
    assert call_inprocess(ingress, _body(ingress), _auth())[0] == 200


def test_draining_refuses_new_requests_and_ends_streams_at_the_deadline_with_an_error_event():
    ingress, replicas = _ingress()
    replicas.delay_s = [0.05]  # 100 tokens at 20 per second: 5 s, longer than the drain

    async def main():
        stream = asyncio.create_task(call_async(ingress, _body(ingress, stream=True, max_tokens=100), _auth()))
        await asyncio.sleep(0.3)  # streaming
        drained = asyncio.create_task(ingress.drain(0.5))
        await asyncio.sleep(0.05)
        refused = await call_async(ingress, _body(ingress), _auth())
        return await stream, refused, await drained

    (status, _, content), refused, drained = asyncio.run(main())
    events = _events(content)
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown"
    assert 3 <= len(events) - 2 < 100  # some tokens, not all
    assert refused[0] == 503 and json.loads(refused[2])["error"]["code"] == "server_shutdown"
    assert drained == {"in_flight": 1, "finished": 0, "ended": 1} and _released(ingress)


# --- per-key limits and the fair share --------------------------------------------------------------

def test_a_keys_concurrency_limit_is_a_429_rate_limit_error_and_its_neighbour_is_served():
    ingress, replicas = _ingress(**{f"tiers.{FREE}.key_limits.max_concurrent": 1})
    replicas.delay_s = [0.05] * 3

    async def main():
        first = asyncio.create_task(call_async(ingress, _body(ingress, max_tokens=10), _auth()))
        await asyncio.sleep(0.1)
        second = await call_async(ingress, _body(ingress), _auth())
        neighbour = await call_async(ingress, _body(ingress), _auth(FREE_KEY2))
        return await first, second, neighbour

    first, second, neighbour = asyncio.run(main())
    assert first[0] == 200 and neighbour[0] == 200
    assert second[0] == 429 and json.loads(second[2])["error"]["code"] == "rate_limit_exceeded"
    assert _released(ingress)


def test_every_response_of_a_limited_key_carries_openais_rate_limit_headers():
    ingress, _ = _ingress(**{f"tiers.{FREE}.key_limits.requests_per_minute": 2,
                             f"tiers.{FREE}.key_limits.tokens_per_minute": 10_000})
    statuses, remaining = [], []
    for _ in range(3):
        status, headers, _ = call_inprocess(ingress, _body(ingress), _auth())
        statuses.append(status)
        remaining.append(headers.get("x-ratelimit-remaining-requests"))
        assert headers.get("x-ratelimit-limit-tokens") == "10000" or status == 429
    assert statuses == [200, 200, 429] and remaining[:2] == ["1", "0"]


def test_one_key_cannot_take_its_whole_tier():
    # free's in-flight bound 10 (of 20), the last one kept for keys under their fair share
    ingress, replicas = make_ingress(KEYS, {"admission.max_in_flight": 20, "http.max_ongoing_requests": 20},
                                     admission=True)
    replicas.snapshots = [snapshot("r0")]
    replicas.delay_s = [0.1] * 20

    async def main():
        heavy = [asyncio.create_task(call_async(ingress, _body(ingress, max_tokens=10), _auth()))
                 for _ in range(12)]
        await asyncio.sleep(0.3)
        light = await call_async(ingress, _body(ingress), _auth(FREE_KEY2))
        return await asyncio.gather(*heavy), light

    heavy, light = asyncio.run(main())
    codes = [h[0] for h in heavy]
    assert codes.count(200) == 9 and codes.count(429) == 3, codes
    assert {json.loads(h[2])["error"]["code"] for h in heavy if h[0] == 429} == {"overloaded"}
    assert any("fair share" in json.loads(h[2])["error"]["message"] for h in heavy if h[0] == 429)
    assert light[0] == 200 and _released(ingress)
