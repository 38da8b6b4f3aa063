"""The policies' fast paths decide exactly what their general paths decide: SLAI's decode-only
step (no `PlanBuilder` when nothing waits, no prefill runs and no decode is critical), its
one-batch `on_batch_end` (the learning of `on_batches_end` folded into one pass), and the decode
KV count the two share (`KVCache.new_blocks_for_decodes`)."""

from __future__ import annotations

import copy
import random

import pytest

from policy_testkit import BS, decoding, state, waiting
from replica.policy import BatchPlan, EngineLimits, KVCache, Request, make_policy
from replica.policy.slai import SLAIPolicy


def _decodes(rng: random.Random, n: int) -> list[Request]:
    lsts = [rng.choice([0.5, 1.0, 1.0, 2.0, 3.5]) for _ in range(n)]  # ties on purpose
    return [decoding(f"d{i}", lst_s=lsts[i], arrival_s=rng.choice([0.0, 0.1, 0.2, 0.3]),
                     needs_block=rng.random() < 0.3, tbt_slo_s=rng.choice([0.1, 0.5]))
            for i in range(n)]


@pytest.mark.parametrize("name", ["slai-spf-dynamic", "slai-fcfs-fixed", "slai-spf-tier-dynamic"])
def test_slai_decode_only_step_plans_what_the_general_path_plans(name):
    """The reference takes the general path: one waiting prompt that cannot be admitted (every
    request slot is taken) sends the step through steps 1-4 and changes nothing else."""
    rng = random.Random(7)
    taken = 0
    for _ in range(400):
        n = rng.randint(1, 20)
        reqs = _decodes(rng, n)
        held = sum(r.num_blocks for r in reqs)
        kv_blocks = held + rng.randint(0, 4) + 5  # a few free blocks: some steps must preempt
        budget, max_decodes = rng.choice([4, 8, 16, 512]), rng.choice([3, 10, 128])
        now = rng.choice([0.0, 0.7, 1.5])  # none, some or most decodes critical
        limits = EngineLimits(max_batch_tokens=budget, max_active_requests=n, max_decodes=max_decodes)
        fast = make_policy(name, engine=limits).schedule(state(now, running=reqs, kv_blocks=kv_blocks))
        blocked = waiting("w", 8, arrival_s=0.0)
        general = make_policy(name, engine=limits).schedule(
            state(now, running=reqs, waiting=[blocked], kv_blocks=kv_blocks))
        assert fast.summary() == general.summary()
        assert not general.admitted
        taken += fast.num_critical_decodes == 0 and not fast.preempted
    assert taken > 50  # the fast path's case came up


class _GeneralBatchEnd(SLAIPolicy):
    """SLAI whose `on_batch_end` goes through `on_batches_end` (an overridden hook)."""

    def on_batches_end(self, state, plan, starts_s, ends_s):
        super().on_batches_end(state, plan, starts_s, ends_s)


@pytest.mark.parametrize("name", ["slai-spf-dynamic", "slai-spf-fixed"])
def test_slai_one_batch_on_batch_end_learns_exactly_what_on_batches_end_learns(name):
    rng = random.Random(3)
    preset = make_policy(name)
    inline, general = SLAIPolicy(preset.config), _GeneralBatchEnd(preset.config)
    assert inline._inline_batch_end and not general._inline_batch_end
    reqs = _decodes(rng, 12) + [decoding(f"p{i}", prompt_len=40) for i in range(4)]
    reqs_b = copy.deepcopy(reqs)
    kv = KVCache(200, BS)
    t = 0.0
    for _ in range(300):
        for r in reqs:  # some finished, some without blocks, some prefills still prefilling
            r.is_finished = rng.random() < 0.1
            r.num_blocks = rng.choice([0, 3, 3, 3])
            r.num_computed_tokens = r.prompt_len + r.num_output_tokens - rng.choice([1, 1, 1, 5])
        for a, b in zip(reqs, reqs_b):
            b.is_finished, b.num_blocks, b.num_computed_tokens = a.is_finished, a.num_blocks, a.num_computed_tokens
        idx = rng.sample(range(len(reqs)), rng.randint(0, len(reqs)))
        split = rng.randint(0, len(idx))
        kv.num_used_blocks = rng.choice([10, 190, 199])  # dynamic theta on both sides of 96 %
        start, t = t + rng.random() * 1e-3, t + rng.random() * 0.05
        for pol, rs in ((inline, reqs), (general, reqs_b)):
            plan = BatchPlan([rs[i] for i in idx[:split]], [(rs[i], 1) for i in idx[split:]])
            pol.on_batch_end(state(t, kv_blocks=200, used=kv.num_used_blocks), plan, start, t)
        assert (inline.mean_batch_time_s, inline.num_batches, inline.theta, inline._offset_s) == \
               (general.mean_batch_time_s, general.num_batches, general.theta, general._offset_s)
        assert [r.lst_s for r in reqs] == [r.lst_s for r in reqs_b]


def test_variants_overriding_a_learning_hook_take_on_batches_end():
    for name in ("slai-plus", "slai-next"):
        assert not make_policy(name)._inline_batch_end
    assert make_policy("slai-spf-dynamic")._inline_batch_end


def test_new_blocks_for_decodes_counts_the_decodes_on_a_block_boundary():
    kv = KVCache(100, BS)
    reqs = [decoding("a"), decoding("b", needs_block=True), decoding("c", needs_block=True)]
    assert kv.new_blocks_for_decodes(reqs) == 2 == sum(kv.extra_blocks_for_step(r) for r in reqs)
    assert kv.new_blocks_for_decodes([]) == 0
