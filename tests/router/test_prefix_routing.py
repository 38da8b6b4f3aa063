"""Prefix-aware routing: the request's prefix hashes, the slo policy's prefix credit and its
hot-prefix guard, and the prefix-affinity (Ray's PrefixCacheAffinityRouter) policy."""

from collections import Counter
from dataclasses import replace

import pytest

from replica.contract import GenerateRequest, TierFacts
from router.feedback import ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.base import RoutingRequest
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.prefix_affinity import PrefixAffinityPolicy
from router.policies.registry import available_router_policies, make_router_policy
from router.policies.slo import SLONoPrefixPolicy, SLOPolicy
from routing_testkit import req, snap, view

B = 512  # tokens per hashed block
RATE = 512 / 0.04  # prefill tokens/s of a replica with no decodes and 40 ms batches (routing_testkit)


def preq(prompt: int, hashes, tier: str = "free", rid: str = "q") -> RoutingRequest:
    return replace(req(tier, prompt, rid), prefix_hashes=tuple(hashes), prefix_block_tokens=B)


def routed(policy, *records):
    """`policy` after it was told where earlier requests went: (replica, hashes) pairs."""
    for k, (rid, hashes) in enumerate(records):
        policy.on_routed(preq(len(hashes) * B, hashes, rid=f"old{k}"), rid)
    return policy


# --- the request's prefix ------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"prefix_hashes": (1, 2)}, "prefix_block_tokens must be > 0"),
    ({"prefix_hashes": (1, 2, 3), "prefix_block_tokens": 512, "prompt_len": 1024}, "cover more than"),
    ({"prefix_hashes": (1,), "prefix_block_tokens": 512, "prompt_len": 0}, "cover more than"),
    ({"prefix_block_tokens": -1}, "prefix_block_tokens"),
])
def test_prefix_hashes_are_validated(kw, match):
    base = dict(request_id="r", tier="free", tbt_slo_s=0.5, tier_rank=1, prompt_len=1000)
    with pytest.raises(ValueError, match=match):
        RoutingRequest(**{**base, **kw})


@pytest.mark.parametrize("prompt, blocks", [(1024, 2), (1025, 3), (513, 2), (512, 1)])
def test_hashes_may_end_with_a_partial_block_as_in_the_mooncake_trace(prompt, blocks):
    r = RoutingRequest("r", "free", 0.5, 1, prompt, prefix_hashes=tuple(range(blocks)), prefix_block_tokens=B)
    assert len(r.prefix_hashes) == blocks


def test_routing_request_of_reads_the_prefix_of_a_generate_request():
    tier = TierFacts(name="free", tbt_slo_s=0.5, ttft_target_s=2.0, rank=1)
    g = GenerateRequest(request_id="g", prompt_token_ids=list(range(1100)), max_tokens=4, tier=tier,
                        prefix_hashes=(11, 12), prefix_block_tokens=B)
    r = RoutingRequest.of(g)
    assert (r.prefix_hashes, r.prefix_block_tokens, r.prompt_len) == ((11, 12), B, 1100)
    plain = RoutingRequest.of(GenerateRequest(request_id="h", prompt_token_ids=[1, 2], max_tokens=1, tier=tier))
    assert (plain.prefix_hashes, plain.prefix_block_tokens) == ((), 0)


def test_policies_without_prefix_state_accept_the_hooks():
    p = PowerOfTwoPolicy(seed=1)
    p.on_routed(preq(1024, [1, 2]), "a")
    p.forget_replicas_except({"a"})
    assert sorted(p.rank(preq(1024, [1, 2]), [view("a"), view("b")])) == ["a", "b"]


# --- slo: the prefix credit ---------------------------------------------------------------------

def test_slo_sends_a_request_to_the_replica_holding_its_prefix_when_loads_are_equal():
    views = [view("a"), view("b"), view("c")]
    policy = routed(SLOPolicy(), ("b", [1, 2, 3, 4]), ("c", [1, 9]))
    assert policy.rank(preq(4096, [1, 2, 3, 4, 5, 6, 7, 8]), views)[0] == "b"
    est = {e.replica_id: e for e in policy.estimate(preq(4096, [1, 2, 3, 4, 5, 6, 7, 8]), views)}
    assert (est["a"].cached_tokens, est["b"].cached_tokens, est["c"].cached_tokens) == (0, 4 * B, B)
    assert est["b"].tokens_ahead == 4096 - 4 * B
    assert est["b"].predicted_ttft_s == pytest.approx((4096 - 4 * B) / RATE)


@pytest.mark.parametrize("name, kw", [("slo", {"prefix_affinity": False}), ("slo-no-prefix", {})])
def test_slo_without_prefix_affinity_ignores_prefixes(name, kw):
    policy = routed(make_router_policy(name, **kw), ("b", [1, 2, 3, 4]))
    assert policy.rank(preq(4096, [1, 2, 3, 4]), [view("a"), view("b")])[0] == "a"  # tie: by id
    assert all(e.cached_tokens == 0 for e in policy.estimate(preq(4096, [1, 2, 3, 4]), [view("a"), view("b")]))


@pytest.mark.parametrize("prompt, held_blocks, cached", [
    (4096, 8, 4095),   # the whole prompt is held: vLLM still computes its last token
    (4097, 8, 4096),   # a partial last block: the 8 full ones are held
    (4000, 8, 3999),   # hashes covering a partial last block (Mooncake): capped at the prompt
    (4096, 3, 1536),
    (2, 1, 1),
    (1, 1, 0),
])
def test_cached_tokens_never_exceed_the_prompt_less_one_token(prompt, held_blocks, cached):
    blocks = list(range(1, -(-prompt // B) + 1))
    policy = routed(SLOPolicy(), ("a", blocks[:held_blocks]))
    (est,) = policy.estimate(preq(prompt, blocks), [view("a")])
    assert est.cached_tokens == cached
    assert est.tokens_ahead == prompt - cached


def test_blocks_every_replica_holds_are_credited_to_all():
    views = [view("a", waiting=[300]), view("b")]
    policy = routed(SLOPolicy(), ("a", [0]), ("b", [0]))  # a shared system prompt
    est = {e.replica_id: e for e in policy.estimate(preq(2048, [0, 5, 6, 7]), views)}
    assert est["a"].cached_tokens == est["b"].cached_tokens == B
    assert not est["a"].prefix_guarded and not est["b"].prefix_guarded


def test_a_replica_the_index_does_not_know_gets_no_credit_for_the_common_blocks():
    policy = routed(SLOPolicy(), ("a", [0, 1]), ("b", [0]))
    views = [view("a"), view("b"), view("new")]
    est = {e.replica_id: e for e in policy.estimate(preq(2048, [0, 1, 2, 3]), views)}
    assert (est["a"].cached_tokens, est["b"].cached_tokens, est["new"].cached_tokens) == (2 * B, B, 0)
    # and so again on the next decision, now that the index knows the new replica
    est = {e.replica_id: e for e in policy.estimate(preq(2048, [0, 1, 2, 3]), views)}
    assert (est["a"].cached_tokens, est["b"].cached_tokens, est["new"].cached_tokens) == (2 * B, B, 0)


# --- slo: the hot-prefix guard --------------------------------------------------------------------

# "b" holds the whole 4096-token prompt (credit 4095 tokens = 0.32 s of prefill); "a" is idle.
# b's queue ahead (a 3000-token prompt, 0.23 s) is less than the saving, more than half of it.
@pytest.mark.parametrize("b_waiting, share, first", [
    ([], 0.5, "b"),            # equal loads: the holder
    ([1000], 0.5, "b"),        # 0.08 s behind, within half the saving
    ([3000], 0.5, "a"),        # 0.23 s behind: the guard withholds the credit
    ([3000], 1.0, "b"),        # without the guard (plain TTFT minimisation) the holder still wins
    ([3000], 0.0, "a"),
    ([3000, 3000], 1.0, "a"),  # behind by more than the saving: no TTFT gain at all
])
def test_the_hot_prefix_guard_keeps_a_busy_holder_from_attracting_its_prefix(b_waiting, share, first):
    hashes = list(range(1, 9))
    policy = routed(SLOPolicy(prefix_guard_share=share), ("b", hashes), ("a", [99]))
    views = [view("a"), view("b", waiting=b_waiting)]
    assert policy.rank(preq(4096, hashes), views)[0] == first
    est = {e.replica_id: e for e in policy.estimate(preq(4096, hashes), views)}
    guarded = sum(b_waiting) / RATE > share * 4095 / RATE
    assert est["b"].prefix_guarded == guarded
    assert est["b"].cached_tokens == (0 if guarded else 4095)


def test_the_guard_measures_the_backlog_against_the_least_loaded_feasible_replica():
    hashes = list(range(1, 9))
    policy = routed(SLOPolicy(), ("b", hashes), ("a", [99]), ("c", [98]))
    # a is idle but infeasible for premium (KV full): b's 0.23 s is measured against c's 0.16 s
    views = [view("a", kv=0.99), view("b", waiting=[3000]), view("c", waiting=[2048])]
    assert policy.rank(preq(4096, hashes, tier="premium"), views)[0] == "b"
    # for free requests a counts, and b is too far behind it
    assert policy.rank(preq(4096, hashes, tier="free"), views)[0] == "a"


def test_a_hot_prefix_spreads_over_replicas_instead_of_herding():
    hashes = tuple(range(1, 9))
    snapshots = {rid: ReplicaFeedback.from_snapshot(snap(rid, t=0.0)) for rid in ("r0", "r1", "r2", "r3")}
    sent = {}
    for share in (0.5, 1.0):
        policy = SLOPolicy(prefix_guard_share=share)
        ledger = InFlightLedger(clock=lambda: 1.0)
        counts = Counter()
        for i in range(12):
            request = preq(4096, hashes, rid=f"q{i}")
            choice = policy.rank(request, build_views(sorted(snapshots), snapshots, ledger, now_s=1.0))[0]
            policy.on_routed(request, choice)
            ledger.record(choice, request)
            counts[choice] += 1
        sent[share] = counts
    assert sorted(sent[0.5].values()) == [3, 3, 3, 3]
    assert set(sent[1.0]) == {"r0", "r1", "r2", "r3"}  # the ledger alone already stops a herd


def test_slo_forgets_replicas_that_are_gone():
    policy = routed(SLOPolicy(), ("a", [1, 2]), ("b", [1, 2]))
    policy.forget_replicas_except({"b"})
    assert policy.prefix_index.known.keys() == {"b"}
    assert policy.prefix_index.match([1, 2]) == {"b": 2}


# --- prefix-affinity (Ray Serve's PrefixCacheAffinityRouter) -------------------------------------

def test_prefix_affinity_picks_the_replica_with_the_longest_prefix():
    policy = routed(PrefixAffinityPolicy(seed=0), ("a", [1, 2]), ("b", [1, 2, 3]), ("c", [7]))
    views = [view("a"), view("b"), view("c")]
    assert policy.choose(preq(2048, [1, 2, 3, 4]), views, {"a": 0, "b": 0, "c": 0}) == ("match", ["b"])
    assert policy.rank(preq(2048, [1, 2, 3, 4]), views)[0] == "b"


def test_among_equal_matches_prefix_affinity_takes_the_shortest_queue():
    policy = routed(PrefixAffinityPolicy(seed=0), ("a", [1, 2]), ("b", [1, 2]), ("c", [1, 2]))
    views = [view("a", waiting=[10] * 3), view("b", waiting=[10]), view("c", waiting=[10] * 2)]
    assert policy.rank(preq(2048, [1, 2, 3, 4]), views) == ["b", "c", "a"]


@pytest.mark.parametrize("threshold, prompt, rule", [
    (0.1, 4096, "match"),      # 1024 of 4096 tokens held: 25 %
    (0.3, 4096, "smallest"),
    (0.1, 10240, "match"),     # 10 %
    (0.1, 10752, "smallest"),  # 9.5 %
])
def test_below_the_match_rate_threshold_prefix_affinity_spreads_to_the_smallest_cache(threshold, prompt, rule):
    policy = routed(PrefixAffinityPolicy(match_rate_threshold=threshold, seed=0),
                    ("a", [1, 2]), ("b", [5, 6, 7]), ("b", [8]))
    views = [view("a"), view("b"), view("c")]
    hashes = [1, 2] + list(range(100, 100 + -(-prompt // B) - 2))
    got, group = policy.choose(preq(prompt, hashes), views, {"a": 0, "b": 0, "c": 0})
    assert got == rule
    assert group == (["a"] if rule == "match" else ["c"])  # c holds nothing yet: the smallest cache


def test_new_prefixes_spread_over_the_replicas_by_cache_size():
    policy = PrefixAffinityPolicy(seed=3)
    views = [view(r) for r in ("a", "b", "c", "d")]
    firsts = []
    for k in range(8):  # eight unrelated prompts of two blocks
        request = preq(1024, [1000 + 2 * k, 1001 + 2 * k], rid=f"q{k}")
        first = policy.rank(request, views)[0]
        policy.on_routed(request, first)
        firsts.append(first)
    assert Counter(firsts) == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert {policy.prefix_index.size(r) for r in "abcd"} == {4}


@pytest.mark.parametrize("threshold, rule", [(3, "match"), (2, "pow2"), (0, "pow2")])
def test_imbalanced_queues_fall_back_to_power_of_two_choices(threshold, rule):
    policy = routed(PrefixAffinityPolicy(imbalanced_threshold=threshold, seed=0), ("a", [1, 2]))
    views = [view("a", waiting=[10] * 3), view("b"), view("c", waiting=[10])]
    qlen = {"a": 3, "b": 0, "c": 1}
    got, group = policy.choose(preq(1024, [1, 2]), views, qlen)
    assert got == rule and (group == ["a"] if rule == "match" else len(group) == 2)


def test_prefix_affinity_without_prefix_hashes_is_power_of_two_choices():
    policy = PrefixAffinityPolicy(seed=0)
    views = [view("a", waiting=[10] * 3), view("b"), view("c", waiting=[10])]
    for _ in range(10):
        rule, group = policy.choose(req("free", 100), views, {"a": 3, "b": 0, "c": 1})
        assert rule == "pow2" and len(set(group)) == 2


def test_prefix_affinity_learns_where_it_routed():
    policy = PrefixAffinityPolicy(seed=0)
    views = [view("a"), view("b")]
    policy.on_routed(preq(1024, [1, 2]), "b")
    assert policy.prefix_index.match([1, 2]) == {"b": 2}
    assert policy.rank(preq(1024, [1, 2]), views)[0] == "b"
    policy.forget_replicas_except({"a"})
    assert policy.prefix_index.match([1, 2]) == {}


def test_prefix_affinity_is_repeatable_with_a_seed():
    views = [view(r, waiting=[10] * (i % 3)) for i, r in enumerate("abcdef")]
    runs = []
    for _ in range(2):
        p = make_router_policy("prefix-affinity", seed=11)
        order = []
        for k in range(30):
            request = preq(1024, [k % 4, 100 + k], rid=f"q{k}")
            ranked = p.rank(request, views)
            p.on_routed(request, ranked[0])
            order.append(ranked)
        runs.append(order)
    assert runs[0] == runs[1]
    assert all(sorted(r) == sorted("abcdef") for r in runs[0])


# --- the registry ---------------------------------------------------------------------------------

def test_the_registry_has_the_prefix_policies():
    names = available_router_policies()
    assert {"slo-no-prefix", "prefix-affinity"} <= set(names)
    assert type(make_router_policy("slo_no_prefix")) is SLONoPrefixPolicy
    assert make_router_policy("slo-no-prefix").prefix_index is None
    assert make_router_policy("slo-no-prefix", prefix_affinity=True).config.prefix_affinity is False
    assert make_router_policy("slo", prefix_guard_share=0.25).config.prefix_guard_share == 0.25
    assert make_router_policy("prefix-affinity", match_rate_threshold=0.3).config.match_rate_threshold == 0.3
    with pytest.raises(ValueError, match="prefix_guard_share"):
        make_router_policy("slo", prefix_guard_share=1.5)
    with pytest.raises(ValueError, match="match_rate_thresh"):
        make_router_policy("prefix-affinity", match_rate_thresh=0.3)


# --- slo: the fast path computes the model ---------------------------------------------------------

def test_slo_estimates_follow_the_model_formula_on_random_views():
    import random
    rng = random.Random(2)
    policy = SLOPolicy(tier_tbt_slo_s={"premium": 0.1, "free": 0.5})
    for _ in range(60):
        views = [view(f"r{i}", waiting=[rng.randint(1, 9000) for _ in range(rng.randint(0, 5))],
                      decodes={"premium": rng.randint(0, 9), "free": rng.randint(0, 30)},
                      batch=rng.uniform(0.02, 0.08), ledger=[("free", rng.randint(1, 900))] * rng.randint(0, 2))
                 for i in range(rng.randint(1, 6))]
        request = req(rng.choice(["premium", "free"]), rng.randint(1, 12000))
        for est, v in zip(policy.estimate(request, views), views):
            fb = v.feedback
            ahead = fb.waiting_tokens_at_most(request.prompt_len) + v.pending.prefill_tokens + request.prompt_len
            assert est.tokens_ahead == pytest.approx(ahead, rel=1e-12)
            assert est.prefill_rate_tps == pytest.approx(policy.prefill_rate_tps(fb), rel=1e-12)
            assert est.predicted_ttft_s == pytest.approx(ahead / est.prefill_rate_tps, rel=1e-12)
