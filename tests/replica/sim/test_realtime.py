"""The simulated engine on the wall clock (the serving backend without a GPU)."""

import asyncio
import time

import pytest

from replica.contract import GenerateRequest, TierFacts
from replica.cost.model import CostModel
from replica.cost.shape import BatchShape
from replica.policy import make_policy
from replica.sim.realtime import RealtimeSimEngine
from replica.slo import SLOTracker


class LinearCost(CostModel):
    """2 ms per iteration plus 10 us per token."""

    def iteration_time_s(self, shape: BatchShape) -> float:
        return 0.002 + 1e-5 * shape.num_tokens if shape.num_tokens else 0.0


def _engine(scheduler: str = "slai-spf-dynamic", **kw):
    slo = SLOTracker({"premium": 0.1, "free": 0.5})
    return RealtimeSimEngine(make_policy(scheduler), LinearCost(), num_kv_blocks=2000, slo=slo, **kw)


TIERS = {"premium": TierFacts("premium", 0.1, 0.5, 0), "free": TierFacts("free", 0.5, 0.5, 1)}


def _request(rid: str, prompt_len: int, max_tokens: int, tier: str = "free") -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=[7] * prompt_len, max_tokens=max_tokens,
                           tier=TIERS[tier])


async def _collect(engine, rid, prompt_len, max_tokens, **kw):
    times = []
    async for n in engine.generate(_request(rid, prompt_len, max_tokens, **kw)):
        times.append((n, time.monotonic()))
    return times


def test_tokens_stream_at_the_pace_of_the_cost_profile():
    async def main():
        eng = _engine()
        t0 = time.monotonic()
        toks = await _collect(eng, "a", 100, 20, tier="free")
        await eng.close()
        return t0, toks

    t0, toks = asyncio.run(main())
    assert [n for n, _ in toks] == list(range(1, 21))
    elapsed = toks[-1][1] - t0
    assert elapsed >= 20 * 0.002  # 20 iterations of at least 2 ms each
    gaps = [b - a for (_, a), (_, b) in zip(toks, toks[1:])]
    assert min(gaps) >= 0.0015


@pytest.mark.parametrize("scheduler", ["slai-spf-dynamic", "slai-plus"])
def test_many_concurrent_requests_all_finish_with_their_token_counts(scheduler):
    async def main():
        eng = _engine(scheduler)
        jobs = [_collect(eng, f"r{i}", 50 + 30 * i, 5 + i, tier="premium" if i % 4 == 0 else "free")
                for i in range(12)]
        res = await asyncio.gather(*jobs)
        snap = eng.snapshot("replica-0")
        await eng.close()
        return res, snap

    res, snap = asyncio.run(main())
    assert [len(r) for r in res] == [5 + i for i in range(12)]
    assert snap["num_running"] == 0 and snap["num_waiting"] == 0
    assert snap["tiers"]["premium"]["tokens_total"] == sum(5 + i for i in range(0, 12, 4))
    assert snap["tiers"]["free"]["ttft_p50_s"] > 0


def test_client_gone_aborts_the_request_and_frees_its_kv():
    async def main():
        eng = _engine(time_scale=5.0)
        agen = eng.generate(_request("gone", 200, 1000))
        assert await agen.__anext__() == 1
        await agen.aclose()  # the client disconnects mid-stream
        await asyncio.sleep(0.05)
        other = await _collect(eng, "next", 20, 3)
        state = eng.engine.state
        await eng.close()
        return state, other

    state, other = asyncio.run(main())
    assert len(other) == 3
    assert state.kv.num_used_blocks == 0 and not state.running and not state.waiting


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="empty"):
        _request("x", 0, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        _request("x", 5, 0)

    async def main():
        eng = _engine()
        agen = eng.generate(_request("dup", 20, 1000))
        await agen.__anext__()
        with pytest.raises(ValueError, match="duplicate"):
            async for _ in eng.generate(_request("dup", 20, 5)):
                pass
        await agen.aclose()
        await eng.close()

    asyncio.run(main())
