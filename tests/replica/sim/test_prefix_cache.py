"""The simulator's block pool with prefix caching behaves as vLLM V1's: shared blocks are counted
once and reference-counted, a finished request's full prompt blocks stay cached and are reused,
free cached blocks are evicted least recently freed first (a request's tail first), a lookup never
covers the last known token, and the engine starts an admitted request's computation after its
cached prefix."""

from __future__ import annotations

import pytest

from replica.cost.model import CostModel
from replica.policy import BatchPlan, Request, SchedulingPolicy, make_policy
from replica.policy.slai import SLAIPolicy
from replica.policy.state import KVCache, PrefixHit
from replica.sim.engine import SimEngine
from replica.sim.prefix_cache import PrefixBlockPool

BS = 16


def req(rid: str, prompt_len: int, hashes, out: int = 4) -> Request:
    return Request(req_id=rid, prompt_len=prompt_len, arrival_s=0.0, max_output_tokens=out,
                   block_hashes=list(hashes))


def computed(pool: PrefixBlockPool, r: Request) -> None:
    """Admit `r` and mark its whole prompt computed."""
    pool.admit(r)
    pool.on_computed(r, r.num_computed_tokens, r.prompt_len)
    r.num_computed_tokens = r.prompt_len


def test_finished_requests_prompt_blocks_are_reused_by_the_next_request():
    pool = PrefixBlockPool(KVCache(100, BS))
    a = req("a", 4 * BS, [1, 2, 3, 4])
    computed(pool, a)
    pool.free_request(a)
    b = req("b", 4 * BS + 5, [1, 2, 3, 9])
    assert pool.lookup(b) == PrefixHit(3 * BS, 0)  # cached but held by nobody: in the free queue
    pool.admit(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 3 * BS
    assert b.num_blocks == 5


def test_a_lookup_never_covers_the_last_known_token():
    pool = PrefixBlockPool(KVCache(100, BS))
    a = req("a", 4 * BS, [1, 2, 3, 4])
    computed(pool, a)
    pool.free_request(a)
    same = req("same", 4 * BS, [1, 2, 3, 4])  # identical prompt: its last token is computed again
    assert pool.lookup(same).num_cached_tokens == 3 * BS


def test_shared_blocks_are_counted_once_and_held_until_the_last_holder_frees_them():
    kv = KVCache(100, BS)
    pool = PrefixBlockPool(kv)
    a = req("a", 4 * BS, [1, 2, 3, 4])
    computed(pool, a)
    b = req("b", 4 * BS + 1, [1, 2, 3, 4])
    assert pool.lookup(b) == PrefixHit(4 * BS, 4)  # held by a: reusing them takes no free block
    pool.admit(b)
    assert kv.num_used_blocks == 4 + 1  # a's 4 blocks once, plus b's own last block
    assert pool.blocks_freed_by_preempting(a) == 0
    assert pool.blocks_freed_by_preempting(b) == 1
    pool.free_request(a)
    assert kv.num_used_blocks == 5
    pool.free_request(b)
    assert kv.num_used_blocks == 0


def test_eviction_takes_the_least_recently_freed_block_and_a_requests_tail_first():
    pool = PrefixBlockPool(KVCache(4, BS))
    a = req("a", 2 * BS + 1, [1, 2])
    computed(pool, a)  # 3 blocks: 1, 2 and a partial one
    pool.free_request(a)
    # one never-used block is at the head; then a's blocks, freed tail first: partial, 2, 1
    x = req("x", 3 * BS, [7, 8, 9])
    pool.admit(x)  # takes the never-used block, a's partial block and the block of hash 2
    assert pool.num_evictions == 1
    probe = req("probe", 3 * BS, [1, 2, 5])
    assert pool.lookup(probe).num_cached_tokens == BS  # hash 1 survives, hash 2 was evicted


def test_a_hash_already_cached_is_not_entered_twice():
    pool = PrefixBlockPool(KVCache(100, BS))
    a, b = req("a", 2 * BS + 1, [1, 2]), req("b", 2 * BS + 1, [1, 2])
    pool.admit(a)
    pool.admit(b)  # concurrent: nothing cached yet, each computes its own copy
    for r in (a, b):
        pool.on_computed(r, 0, r.prompt_len)
    assert len(pool.cached) == 2
    pool.free_request(a)
    pool.free_request(b)
    assert pool.lookup(req("c", 3 * BS, [1, 2, 3])).num_cached_tokens == 2 * BS


class OneSecond(CostModel):
    def iteration_time_s(self, shape) -> float:
        return 1.0


def run_to_end(engine: SimEngine, reqs: list[Request]) -> None:
    for r in reqs:
        engine.add_request(r)
    now = 0.0
    while engine.has_work:
        now = engine.step(now)[1]


def test_engine_computes_only_the_uncached_tokens_of_a_request_sharing_a_prefix():
    shared = list(range(1, 33))  # 32 blocks = 512 tokens
    chunks = []

    class Spy(SLAIPolicy):  # the prefill chunks of each plan, as the engine is handed it
        def schedule(self, state):
            plan = super().schedule(state)
            chunks.extend((r.req_id, n, r.num_computed_tokens) for r, n in plan.prefills)
            return plan

    engine = SimEngine(Spy(make_policy("slai-spf-dynamic").config), OneSecond(), num_kv_blocks=2000, prefix_caching=True)
    first = req("first", 32 * BS + 100, shared + [100, 101, 102, 103, 104, 105], out=2)
    run_to_end(engine, [first])
    chunks.clear()
    second = req("second", 32 * BS + 100, shared + [200, 201, 202, 203, 204, 205], out=2)
    run_to_end(engine, [second])
    assert second.num_cached_tokens == 32 * BS
    assert chunks == [("second", 100, 0)]  # one chunk of the 100 uncached tokens (admitted at 0)
    assert engine.state.kv.num_used_blocks == 0
    assert engine.pool.hit_rate == pytest.approx(32 * BS / (2 * (32 * BS + 100)))


def test_shortest_prompt_first_orders_by_uncached_tokens():
    engine = SimEngine(make_policy("slai-spf-dynamic"), OneSecond(), num_kv_blocks=2000, prefix_caching=True)
    warm = req("warm", 64 * BS + 1, list(range(1, 65)), out=1)
    run_to_end(engine, [warm])
    long_cached = req("long-cached", 64 * BS + 40, list(range(1, 65)) + [99], out=1)  # 40 tokens to compute
    short = req("short", 100, [500, 501, 502, 503, 504, 505], out=1)  # 100 tokens, nothing cached
    engine.add_request(short)
    engine.add_request(long_cached)
    assert [r.req_id for r in engine.state.waiting] == ["long-cached", "short"]


class AdmitAll(SchedulingPolicy):
    name = "admit-all"

    def schedule(self, state) -> BatchPlan:
        from replica.policy.base import PlanBuilder

        b = PlanBuilder(state, 10_000, 100, 100)
        for r in state.running:
            if r.is_prefill:
                b.add_started_prefill(r)
            else:
                b.add_decode(r, [])
        for r in list(state.waiting):
            b.try_admit(r)
        return b.plan


def test_admission_needs_no_free_block_for_blocks_running_requests_hold():
    # 10 blocks, watermark 0: a holds 8 prompt blocks; b shares 8 of its 9 and fits in the 2 left
    engine = SimEngine(AdmitAll(), OneSecond(), num_kv_blocks=10, kv_watermark=0.0, prefix_caching=True)
    a = req("a", 8 * BS, range(1, 9), out=50)
    engine.add_request(a)
    now = engine.step(0.0)[1]
    assert not a.is_prefill
    b = req("b", 8 * BS + 10, list(range(1, 9)), out=2)
    engine.add_request(b)
    plan, _ = engine.step(now)
    assert b in plan.admitted and b.num_cached_tokens == 7 * BS + BS  # all 8 shared blocks
    assert engine.state.kv.num_used_blocks == 8 + 1 + 1  # a's blocks once, a's decode block, b's last


@pytest.mark.parametrize("scheduler", ["slai-spf-dynamic", "sarathi-fcfs"])
def test_fast_forwarded_decode_stretches_give_the_same_run_with_prefix_caching(scheduler):
    from loadtest.metrics import summarize
    from loadtest.simulate.replica import Workload, run_replica
    from replica.cost.profile import load_profile
    from replica.tiers import paper_tiers
    from replica.traces import load_trace

    trace = load_trace("mooncake")
    wl = Workload.build(trace, 120, 1.0, paper_tiers())
    prof = load_profile("h100-mistral7b")
    fast = summarize(run_replica(wl, make_policy(scheduler), prof, num_kv_blocks=3000, fast_forward=True))
    slow = summarize(run_replica(wl, make_policy(scheduler), prof, num_kv_blocks=3000, fast_forward=False))
    assert fast["prefix_cache_hit_rate"] > 0
    assert fast["iterations"] == slow["iterations"]
    for key in ("ttft_p50_s", "ttft_p99_s", "makespan_s", "prefix_cache_hit_rate", "prefix_hit_tokens", "preemptions"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-9), key
    for tier in ("premium", "free"):
        for key in ("tbt_p99_s", "tbt_mean_s", "tbt_count"):
            assert fast["tiers"][tier][key] == pytest.approx(slow["tiers"][tier][key], rel=1e-9), (tier, key)
