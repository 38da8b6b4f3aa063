"""The RequestRouter adapter on a real (local, loopback-only) Ray Serve."""

import asyncio
import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from replica.contract import GenerateRequest  # noqa: E402
from replica.tiers import paper_tiers  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
TIERS = {t.name: t.facts() for t in paper_tiers().tiers}


class FakeReplica:
    """Reports a fixed snapshot: the first replica to start claims `marker` and reports overload."""

    def __init__(self, marker: str) -> None:
        self.rid = serve.get_replica_context().replica_id.unique_id
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
            os.close(fd)
            self.overloaded = True
        except FileExistsError:
            self.overloaded = False

    async def generate(self, request: GenerateRequest):
        yield {"replica": self.rid, "overloaded": self.overloaded}

    def record_routing_stats(self) -> dict:
        p99 = 0.3 if self.overloaded else 0.03
        tier = lambda tbt: {"ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tbt_p50_s": tbt / 2, "tbt_p99_s": tbt,  # noqa: E731
                             "tbt_miss_frac": 0.0, "ttft_misses_total": 0, "tbt_misses_total": 0, "tokens_total": 100}
        return {
            "version": 1, "replica_id": self.rid, "timestamp_s": time.time(), "num_waiting": 0, "num_running": 4,
            "waiting_prefill_tokens": 0,
            "waiting_prompt_histogram": {"edges": [0, 512, 1024, 2048, 4096, 8192], "counts": [0] * 6},
            "running_decodes_by_tier": {"premium": 4 if self.overloaded else 0, "free": 0},
            "kv_usage": 0.99 if self.overloaded else 0.2, "mean_batch_time_s": 0.05,
            "tiers": {"premium": tier(p99), "free": tier(p99)},
        }


@pytest.fixture(scope="module")
def routed_handle(local_serve, tmp_path_factory):
    dep = serve.deployment(FakeReplica).options(
        num_replicas=2, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class="router.ray_router.TierAwareRouter",
            request_router_kwargs={"policy": "slo", "context": {"tier_tbt_slo_s": {"premium": 0.1, "free": 0.5}}},
            request_routing_stats_period_s=0.5,
        ),
    )
    return serve.run(dep.bind(str(tmp_path_factory.mktemp("m") / "overloaded")), name="routed", route_prefix=None)


def _send(handle, n, tier):
    async def one(i):
        async for c in handle.options(stream=True).generate.remote(
            GenerateRequest(request_id=f"{tier}{i}", prompt_token_ids=[3] * 200, max_tokens=1, tier=TIERS[tier])
        ):
            return c

    async def main():
        return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(main())


def test_a_replica_reporting_overload_receives_no_new_premium_work(routed_handle):
    _send(routed_handle, 4, "free")  # warm both replicas up
    time.sleep(2.0)  # a few feedback periods: every router has both snapshots
    landed = _send(routed_handle, 20, "premium")
    assert all(not c["overloaded"] for c in landed), [c["replica"] for c in landed]


# ------------------------------------------------------------------------- replicas that are gone

def _replica(rid: str):
    from types import SimpleNamespace

    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid))


def test_the_router_forgets_replicas_serve_removed_or_reported_dead(monkeypatch):
    """No Serve needed: Serve's own bookkeeping in the base class is stubbed out; what is checked is
    that the router drops the ledger, the feedback cache and the in-flight ids of gone replicas."""
    from ray.serve.request_router import RequestRouter

    from router.ray_router import TierAwareRouter
    from routing_testkit import req

    calls = []
    monkeypatch.setattr(RequestRouter, "update_replicas", lambda self, replicas: calls.append(len(replicas)))
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", lambda self, replica_id: calls.append(replica_id))
    router = TierAwareRouter.__new__(TierAwareRouter)
    router.initialize_state(policy="slo")
    for i, rid in enumerate(["a", "b", "c"]):
        router.ledger.record(rid, req("free", 10, f"q{i}"))
        router.ledger.on_snapshot(rid, 0.5)
        router._feedback[rid] = (1.0, None)
        router._ledger_ids[f"internal-{i}"] = (rid, f"q{i}")

    router.update_replicas([_replica("b"), _replica("c"), _replica("d")])  # "a" scaled down, "d" new
    assert calls == [3]
    assert router.ledger.known() == {"b", "c"} and set(router._feedback) == {"b", "c"}
    assert set(router._ledger_ids) == {"internal-1", "internal-2"}
    router.on_request_completed(None, "internal-0")  # a late completion for a gone replica: harmless

    router.on_replica_actor_died(_replica("c").replica_id)
    assert router.ledger.known() == {"b"} and set(router._feedback) == {"b"}
    assert set(router._ledger_ids) == {"internal-1"} and len(calls) == 2


# ------------------------------------------------------------------------------ the policy's hooks

class _RecordingPolicy:
    """A policy recording its hooks (`RoutingPolicy.on_routed`, `forget_replicas_except`)."""

    name = "recording"

    def __init__(self) -> None:
        self.routed: list[tuple[object, str]] = []
        self.live: list[set[str]] = []

    def rank(self, request, replicas):
        return [v.replica_id for v in replicas]

    def on_routed(self, request, replica_id: str) -> None:
        self.routed.append((request, replica_id))

    def forget_replicas_except(self, live: set[str]) -> None:
        self.live.append(set(live))


def test_the_policy_learns_every_routed_request_and_forgets_the_replicas_that_are_gone(monkeypatch):
    """No Serve needed (Serve's bookkeeping in the base class stubbed out): `on_request_routed` tells
    the policy which replica took the request (with its prefix hashes), and the policy forgets
    replicas with the router, on a new replica set and on a dead actor."""
    from types import SimpleNamespace

    from ray.serve.request_router import RequestRouter

    from replica.prefix_hash import chained_block_hashes
    from router.policies.base import RoutingRequest
    from router.ray_router import TierAwareRouter

    monkeypatch.setattr(RequestRouter, "update_replicas", lambda self, replicas: None)
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", lambda self, replica_id: None)
    router = TierAwareRouter.__new__(TierAwareRouter)
    router.initialize_state(policy="slo")
    router.policy = policy = _RecordingPolicy()
    router.update_replicas([_replica("a"), _replica("b"), _replica("c")])
    assert policy.live == [{"a", "b", "c"}]

    ids = list(range(3, 403))
    gen = GenerateRequest(request_id="r1", prompt_token_ids=ids, max_tokens=1, tier=TIERS["free"],
                          prefix_hashes=chained_block_hashes(ids, 128), prefix_block_tokens=128)
    pending = SimpleNamespace(args=[gen], kwargs={}, metadata=SimpleNamespace(internal_request_id="i1"))
    router.on_request_routed(pending, _replica("b").replica_id, None)
    [(request, rid)] = policy.routed
    assert rid == "b" and request.request_id == "r1" and router.ledger.known() == {"b"}
    assert isinstance(request, RoutingRequest)
    assert request.prefix_hashes == gen.prefix_hashes and request.prefix_block_tokens == 128
    probe = SimpleNamespace(args=[], kwargs={}, metadata=SimpleNamespace(internal_request_id="i2"))
    router.on_request_routed(probe, _replica("a").replica_id, None)  # no routing metadata: not the policy's
    assert len(policy.routed) == 1

    router.update_replicas([_replica("b"), _replica("c")])  # "a" scaled down
    router.on_replica_actor_died(_replica("c").replica_id)
    assert policy.live[1:] == [{"b", "c"}, {"b"}]
    router.on_replica_actor_died(_replica("c").replica_id)  # told twice: nothing more to forget
    assert len(policy.live) == 3
