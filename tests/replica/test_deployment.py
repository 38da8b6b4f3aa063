"""The replica deployment on a real (local, loopback-only) Ray Serve, sim backend."""

import asyncio
import dataclasses
import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from replica.contract import GenerateRequest  # noqa: E402
from replica.deployment import LLMReplica  # noqa: E402
from replica.tiers import paper_tiers  # noqa: E402

TIERS = {t.name: t.facts() for t in paper_tiers().tiers}


@pytest.fixture(scope="module")
def replica_handle(local_serve):
    dep = serve.deployment(LLMReplica).options(
        num_replicas=2, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_routing_stats_period_s=0.5),
    )
    return serve.run(dep.bind(time_scale=0.25), name="replicas", route_prefix=None)


def _request(rid, prompt_len=300, max_tokens=12, tier="free"):
    return GenerateRequest(request_id=rid, prompt_token_ids=[5] * prompt_len, max_tokens=max_tokens, tier=TIERS[tier])


def test_a_replica_streams_every_token_of_a_request(replica_handle):
    async def main():
        chunks = []
        async for c in replica_handle.options(stream=True).generate.remote(_request("one", max_tokens=9)):
            chunks.append(c)
        return chunks

    everything = asyncio.run(main())
    assert everything[0].is_heartbeat  # the replica took the request (StreamChunk.heartbeat)
    chunks = [c for c in everything if not c.is_heartbeat]
    assert [c.num_tokens for c in chunks] == list(range(1, 10))
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length" and all(c.text is None for c in chunks)


def test_concurrent_requests_over_two_replicas_all_complete(replica_handle):
    async def one(i):
        n = 0
        async for c in replica_handle.options(stream=True).generate.remote(
            _request(f"c{i}", prompt_len=100 + 50 * i, max_tokens=5 + i % 3, tier="premium" if i % 5 == 0 else "free")
        ):
            n += not c.is_heartbeat
        return n

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(main()) == [5 + i % 3 for i in range(16)]


def test_a_replica_sends_heartbeats_while_a_request_waits_for_its_first_token(replica_handle):
    from replica.deployment import HEARTBEAT_S

    async def main():  # at time_scale 0.25 a long prompt behind others waits seconds for its first token
        blockers = [asyncio.create_task(_collect(_request(f"hb-block{i}", prompt_len=6000, max_tokens=2)))
                    for i in range(4)]
        waited = await _collect(_request("hb-waits", prompt_len=6000, max_tokens=2))
        await asyncio.gather(*blockers)
        return waited

    async def _collect(req):
        out = []
        async for c in replica_handle.options(stream=True).generate.remote(req):
            out.append((time.monotonic(), c))
        return out

    chunks = asyncio.run(main())
    beats = [t for t, c in chunks if c.is_heartbeat]
    signs = beats + [next(t for t, c in chunks if not c.is_heartbeat)]  # heartbeats, then the first token
    assert beats and max(b - a for a, b in zip(signs, signs[1:])) <= HEARTBEAT_S + 0.5, signs


def test_a_replica_sends_the_first_token_at_once_and_coalesces_the_rest_by_its_tiers_interval(replica_handle):
    """At time_scale 0.25 the simulated GPU makes a token every ~6-10 ms: with the free tier's
    interval at 0.2 s, the stream is its first token alone, then batches of several tokens, every
    token counted once, the finish on the last."""
    tier = dataclasses.replace(TIERS["free"], stream_interval_s=0.2)
    req = GenerateRequest(request_id="coalesced", prompt_token_ids=[5] * 300, max_tokens=60, tier=tier)

    async def main():
        return [c async for c in replica_handle.options(stream=True).generate.remote(req)]

    chunks = [c for c in asyncio.run(main()) if not c.is_heartbeat]
    assert chunks[0].num_tokens == 1  # the first token alone, at once
    steps = [b.num_tokens - a.num_tokens for a, b in zip(chunks, chunks[1:])]
    assert sum(steps) == 59 and max(steps) > 1 and len(chunks) < 30, [c.num_tokens for c in chunks]
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def test_replica_reports_its_feedback_snapshot(replica_handle):
    snap = replica_handle.record_routing_stats.remote().result()
    assert snap["version"] == 1 and snap["replica_id"].startswith("replica-")
    assert {"kv_usage", "mean_batch_time_s", "tiers", "waiting_prefill_tokens"} <= set(snap)
