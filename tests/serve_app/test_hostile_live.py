"""Hostile clients against the real app on a loopback Ray Serve (sim backend, 3 replicas): the
strict tier keeps being served while free keys misbehave and replicas hang or die, every hostile
request gets its documented status, and nothing leaks afterwards (ingress in flight 0, engine
requests 0, KV 0).  The attacks are `loadtest.hostile`'s, scaled down to bound the test's time;
``python -m loadtest.hostile --serve`` runs them at full size (docs/BENCHMARKS.md).

What is asserted about premium is what holds on this 2-core machine: every premium request is
answered 200 (none refused, none failed) and its median time to first token is within the 0.5 s
target.  Its token gaps are recorded, not asserted: with hundreds of free streams the HTTP path's
CPU (not the scheduler) delays premium tokens here (docs/BENCHMARKS.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from loadtest import hostile  # noqa: E402
from serve_app.app import build_app  # noqa: E402

KEYS = {"premium": "hl-premium-key-0123456789", "free": "hl-free-key-0123456789ab", "free2": "hl-free-key-2-abcdefghij"}
SERVE_ENV_VARS = {"TIERED_API_KEYS": f"{KEYS['premium']}:premium,{KEYS['free']}:free,{KEYS['free2']}:free",
                  "TIERED_METRICS": "0"}
APP = "hostile"
MODEL = "sim-hostile"
TTFT_TARGET_S = 0.5
OVERRIDES = {"model_name": MODEL, "replicas.num_replicas": 3, "replicas.cpus_per_replica": 0,
             "http.body_timeout_s": 2.0, "admission.max_in_flight": 64, "router.feedback_period_s": 0.5,
             # a hung replica is given up after 3 s of silence (heartbeats come every second)
             "tiers.0.idle_timeout_s": 3.0, "tiers.1.idle_timeout_s": 3.0,
             "tiers.0.first_token_timeout_s": 30.0, "tiers.1.first_token_timeout_s": 30.0}


@pytest.fixture(scope="module")
def target(local_serve):
    serve.run(build_app({"overrides": OVERRIDES}), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{local_serve}"
    return hostile.Target(base, MODEL, KEYS["premium"], [KEYS["free"], KEYS["free2"]])


def _replicas():
    return serve.get_deployment_handle("LLMReplica", app_name=APP)


def _engine_states() -> list[dict]:
    return [s for s in _replicas().broadcast("engine_state").results(timeout_s=30, return_exceptions=True)
            if isinstance(s, dict)]


def _assert_nothing_leaks(timeout_s: float = 30.0) -> None:
    ingress = serve.get_deployment_handle("Ingress", app_name=APP)
    deadline = time.monotonic() + timeout_s
    while True:
        state = ingress.state.remote().result(timeout_s=10)
        engines = _engine_states()
        clean = state == {"in_flight": 0, "active_streams": 0, "key_slots": 0} and engines and all(
            e["num_unfinished"] == 0 and e["kv_usage"] == 0.0 for e in engines)
        if clean:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: ingress {state}, engines {engines}")
        time.sleep(0.5)


def _run(target, attack) -> tuple[dict, dict]:
    async def main():
        stop = asyncio.Event()
        probe = hostile.PremiumProbe()
        premium = asyncio.create_task(probe.run(target, stop, 0.5))
        await asyncio.sleep(0.5)
        try:
            result = await attack(target)
        finally:
            stop.set()
            await asyncio.wait_for(premium, 70)
        return result, probe.summary()

    result, premium = asyncio.run(main())
    print(f"{attack.__name__}: {result}; premium {premium}")
    return result, premium


def _premium_served(p: dict) -> None:
    assert p["requests"] >= 2 and p["statuses"] == {200: p["requests"]}, p
    assert p["ttft_p50_s"] <= TTFT_TARGET_S, p


async def slow_bodies(t):
    body = hostile._body(t, "x" * (16 * 1024))
    conns = []
    for _ in range(100):
        reader, writer = await hostile._open(t)
        writer.write(hostile._head(t, t.free_keys[0], len(body)) + body[:1])
        conns.append((reader, writer))
    results = await asyncio.gather(*(hostile._response(r, 15.0) for r, _ in conns))
    for _, w in conns:
        w.close()
    return {"statuses": sorted({s for s, _, _ in results})}


def test_slow_bodies_time_out_or_are_refused_and_premium_is_served(target):
    result, premium = _run(target, slow_bodies)
    assert set(result["statuses"]) <= {408, 429}, result  # the tier's bound, then the body deadline
    _premium_served(premium)
    _assert_nothing_leaks()


async def burst(t):
    body = hostile._body(t, "a burst", 30, stream=True)
    conns = []
    for _ in range(60):
        reader, writer = await hostile._open(t)
        writer.write(hostile._head(t, t.free_keys[0], len(body)) + body[:1])
        conns.append((reader, writer))
    await asyncio.sleep(1.0)
    for _, w in conns:
        w.write(body[1:])
    results = await asyncio.gather(*(hostile._response(r, 60.0) for r, _ in conns))
    for _, w in conns:
        w.close()
    return [s for s, _, _ in results]


def test_a_synchronised_burst_is_admitted_only_up_to_the_tiers_bound(target):
    statuses, premium = _run(target, burst)
    # free's bound is 32 of the 64 in flight, the last 10 % kept for other keys: 28 for one key
    assert statuses.count(200) <= 28 and set(statuses) <= {200, 429}, statuses
    _premium_served(premium)
    _assert_nothing_leaks()


async def key_hog(t):
    body = hostile._body(t, "the hog", 400, stream=True)
    conns = []
    for _ in range(40):
        reader, writer = await hostile._open(t)
        writer.write(hostile._head(t, t.free_keys[0], len(body)) + body)
        conns.append((reader, writer))
    await asyncio.sleep(2.0)
    neighbour = await hostile.request(t, t.free_keys[1], hostile._body(t, "the neighbour", 8), 60.0)
    for _, w in conns:
        w.close()
    return neighbour[0]


def test_one_key_cannot_take_its_whole_tier(target):
    neighbour_status, premium = _run(target, key_hog)
    assert neighbour_status == 200
    _premium_served(premium)
    _assert_nothing_leaks()


async def big_prompts(t):
    body = hostile._body(t, "word " * 200_000)  # 1 MB
    t0 = time.perf_counter()
    results = await asyncio.gather(*(hostile.request(t, t.free_keys[0], body, 30.0) for _ in range(8)))
    return [s for s, _, _ in results], time.perf_counter() - t0


def test_prompts_too_long_by_their_bytes_are_refused_at_once(target):
    (statuses, seconds), premium = _run(target, big_prompts)
    assert statuses == [400] * 8 and seconds < 2.0, (statuses, seconds)
    _premium_served(premium)
    _assert_nothing_leaks()


def test_a_hung_replica_costs_its_requests_seconds_not_the_request(target):
    pid = _engine_states()[0]["pid"]

    async def attack(t):
        os.kill(pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(*(hostile.request(t, t.free_keys[1], hostile._body(t, f"free {i}", 8), 40)
                                             for i in range(12)))
        finally:
            os.kill(pid, signal.SIGCONT)
        return [s for s, _, _ in results]

    statuses, premium = _run(target, attack)
    assert statuses == [200] * 12, statuses  # those sent to the stopped replica were retried elsewhere
    assert premium["statuses"] == {200: premium["requests"]}, premium
    _assert_nothing_leaks()


def test_with_every_replica_killed_requests_get_503_at_once_until_serve_replaces_them(target):
    pids = [s["pid"] for s in _engine_states()]

    async def attack(t):
        for p in pids:
            os.kill(p, signal.SIGKILL)
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        status, headers, _ = await hostile.request(t, t.free_keys[0], hostile._body(t), 30.0)
        took = time.perf_counter() - t0
        health, _, _ = await hostile._get(t, "/health")
        return status, headers.get("retry-after"), took, health

    async def main():
        return await attack(target)

    status, retry_after, took, health = asyncio.run(main())
    assert (status, health) == (503, 503) and retry_after is not None and took < 2.0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve starts new replicas; requests are served again
        if asyncio.run(hostile.request(target, target.free_keys[0], hostile._body(target), 30.0))[0] == 200:
            break
        time.sleep(1.0)
    else:
        raise AssertionError("no replica came back in 90 s")
    _assert_nothing_leaks(60.0)


def test_draining_ends_streams_with_an_error_event_and_done_and_refuses_new_requests(target):
    ingress = serve.get_deployment_handle("Ingress", app_name=APP)

    async def main():
        body = hostile._body(target, "a long stream", 2000, stream=True)
        streams = [asyncio.create_task(hostile.request(target, target.free_keys[0], body, 60.0)) for _ in range(5)]
        await asyncio.sleep(2.0)
        drained = asyncio.get_running_loop().run_in_executor(None, lambda: ingress.drain.remote(1.0).result(timeout_s=30))
        await asyncio.sleep(0.2)
        refused = await hostile.request(target, target.free_keys[1], hostile._body(target), 10.0)
        return await asyncio.gather(*streams), refused, await drained

    streams, refused, drained = asyncio.run(main())
    assert refused[0] == 503 and b"server_shutdown" in refused[2]
    for status, _, content in streams:
        assert status == 200 and content.rstrip().endswith(b"data: [DONE]"), content[-200:]
        assert b"server_shutdown" in content
    assert drained["ended"] == 5
    _assert_nothing_leaks()
