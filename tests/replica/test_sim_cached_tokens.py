"""The simulated backend reports the prompt tokens its engine's prefix cache held, on the first chunk
(`replica.contract.StreamChunk.num_cached_tokens`), as the vLLM backend does."""

from __future__ import annotations

import asyncio

from replica.contract import GenerateRequest, TierFacts
from replica.sim.backend import SimBackend

FREE = TierFacts("free", 0.5, 0.5, 1)


def _chunks(backend: SimBackend, rid: str) -> list:
    async def main():
        req = GenerateRequest(request_id=rid, prompt_token_ids=[7] * 300, max_tokens=3, tier=FREE)
        out = [c async for c in backend.generate(req)]
        await backend.engine.close()
        return out

    return asyncio.run(main())


def test_without_a_prefix_cache_the_first_chunk_says_none_was_cached():
    chunks = _chunks(SimBackend(tiers=[FREE], replica_id="r0", time_scale=0.01), "a")
    assert [c.num_tokens for c in chunks] == [1, 2, 3]
    assert [c.num_cached_tokens for c in chunks] == [0, None, None]


def test_the_first_chunk_carries_the_engines_cached_prompt_tokens():
    backend = SimBackend(tiers=[FREE], replica_id="r0", time_scale=0.01)

    class HitOnArrival:  # the engine, with what a prefix cache's lookup on arrival sets
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def add_request(self, req):
            req.num_cached_tokens = 256
            self._engine.add_request(req)

    backend.engine.engine = HitOnArrival(backend.engine.engine)
    assert [c.num_cached_tokens for c in _chunks(backend, "b")] == [256, None, None]
    assert backend.engine.num_cached_tokens("b") == 0  # a request no longer generating: unknown
