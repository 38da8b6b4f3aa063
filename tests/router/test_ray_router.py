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
