"""LLMReplica.tbt_gaps_since: the engine's per-tier TBT gaps since a mark (for loadtest.stream_path)."""

import asyncio

import pytest

from replica.contract import GenerateRequest
from replica.deployment import LLMReplica
from replica.tiers import paper_tiers

TIERS = {t.name: t.facts() for t in paper_tiers().tiers}


def _request(rid: str, tier: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=[5] * 32, max_tokens=max_tokens, tier=TIERS[tier])


async def _drain(replica: LLMReplica, request: GenerateRequest) -> None:
    async for _ in replica.backend.generate(request):
        pass


def test_gaps_since_a_mark_are_the_engines_own_per_tier_and_exclude_earlier_ones(monkeypatch):
    monkeypatch.setenv("TIERED_METRICS", "0")

    async def main():
        replica = LLMReplica("sim", time_scale=0.05)
        await _drain(replica, _request("before", "free", 6))  # 5 gaps before the mark
        mark = await replica.tbt_gaps_since()
        assert set(mark) == {"replica_id", "clock_s"}
        await asyncio.gather(_drain(replica, _request("p", "premium", 8)), _drain(replica, _request("f", "free", 4)))
        got = await replica.tbt_gaps_since({mark["replica_id"]: mark["clock_s"]})
        other = await replica.tbt_gaps_since({"another-replica": 0.0})  # no mark of its own: its mark only
        return mark, got, other

    mark, got, other = asyncio.run(main())
    assert got["replica_id"] == mark["replica_id"] and got["clock_s"] >= mark["clock_s"]
    assert got["tiers"]["premium"]["num_gaps"] == 7 and got["tiers"]["free"]["num_gaps"] == 3
    gaps = got["tiers"]["premium"]["gaps_s"]
    assert len(gaps) == 7 and (gaps > 0).all() and (gaps < 1.0).all()
    assert got["tiers"]["premium"]["complete"] and not got["tiers"]["premium"]["sampled"]
    assert "tiers" not in other


def test_a_backend_without_gaps_says_so():
    from replica.backend import ReplicaBackend

    class Bare(ReplicaBackend):
        replica_id = "bare"

        def generate(self, request):  # pragma: no cover - not called
            raise AssertionError

        async def snapshot(self):  # pragma: no cover - not called
            return {}

        num_unfinished = 0

        async def check_health(self):  # pragma: no cover - not called
            pass

    with pytest.raises(NotImplementedError):
        asyncio.run(Bare().tbt_gaps_since(None, 10))
