"""slai-plus (replica/policy/slai_plus.py): SLAI's iteration with bounded waiting, an adaptive
tile-aligned budget, an offset from the measured worst case and recent batch-time statistics;
one behaviour per test, on hand-built engine states."""

from __future__ import annotations

import numpy as np
import pytest

from policy_testkit import chunks, decoding, ids, started, state, waiting
from replica.policy import BatchPlan, make_policy
from replica.policy.slai_plus import BatchTimeModel, SLAIPlusPolicy

PREMIUM, FREE = 0.1, 0.5


def plus(name: str = "slai-plus", **overrides) -> SLAIPlusPolicy:
    p = make_policy(name, **overrides)
    assert isinstance(p, SLAIPlusPolicy)
    return p


def cost_s(plan: BatchPlan) -> float:
    """A GPU-like iteration time with the cost profile's five terms: 20 ms + 0.04 ms per token
    + 0.2 ms per 1000 decode-context tokens + 5 ms per Mtoken^2 of squared chunks + 2 ms per
    Mtoken^2 of chunk x prior context."""
    sh = plan.shape()
    return (0.020 + 4e-5 * sh.num_tokens + 2e-4 * sh.sum_decode_ctx / 1e3
            + 5e-3 * sh.sum_prefill_sq / 1e6 + 2e-3 * sh.sum_prefill_ctx / 1e6)


TRUTH = np.array([0.020, 4e-5, 2e-4, 5e-3, 2e-3])  # `cost_s`'s terms, in the time model's units


def ran(plan: BatchPlan) -> BatchPlan:
    """The plan as a mechanism hands it to `on_batch_end`: its shape recorded when it started."""
    plan.record_shape()
    return plan


def train(p: SLAIPlusPolicy, sizes=(64, 128, 256, 384, 512, 640), rounds: int = 10) -> None:
    """Feed the policy measured batches of several shapes: a prefill chunk at a varying prior
    context and one decode whose context varies, each run as the engine runs it (shape recorded,
    time measured on a GPU that `cost_s` describes, progress advanced, then `on_batch_end`)."""
    st = state(0.0)
    t = 0.0
    for k in range(rounds):
        for n in sizes:
            dec = decoding(f"d{k}{n}", prompt_len=20 + 1000 * (k % 4), tbt_slo_s=FREE)
            pre = started(f"s{k}{n}", 8000, 16 + 512 * (k % 5) + n)
            plan = BatchPlan(decodes=[dec], prefills=[(pre, n)])
            plan.record_shape()
            d = cost_s(plan)
            pre.num_computed_tokens += n
            dec.num_computed_tokens += 1
            dec.num_output_tokens += 1
            p.on_batch_end(st, plan, t, t + d)
            t += d


# --- bounded waiting ----------------------------------------------------------------------------

def test_overdue_long_prompt_is_admitted_before_shorter_ones():
    old = waiting("long", 6000, arrival_s=0.0)  # waited 2.5 s > 4 x 0.5 s
    new = [waiting(f"s{i}", 50 + i, arrival_s=2.4) for i in range(3)]
    plan = plus().schedule(state(2.5, waiting=[*new, old]))
    assert ids(plan.admitted)[0] == "long"


def test_before_its_deadline_a_long_prompt_waits_behind_shorter_ones():
    old = waiting("long", 6000, arrival_s=0.6)  # waited 1.9 s < 2 s
    new = [waiting(f"s{i}", 50 + i, arrival_s=2.4) for i in range(3)]
    plan = plus().schedule(state(2.5, waiting=[*new, old]))
    assert ids(plan.admitted)[:3] == ["s0", "s1", "s2"]


def test_overdue_requests_go_oldest_first_and_the_deadline_scales_with_the_tier_target():
    a = waiting("a", 3000, arrival_s=1.0, ttft_target_s=0.5)  # waited 4 s: overdue
    b = waiting("b", 2000, arrival_s=0.0, ttft_target_s=0.5)  # waited 5 s: overdue, older
    c = waiting("c", 1000, arrival_s=0.0, ttft_target_s=2.0)  # 5 s < 4 x 2 s: not overdue
    d = waiting("d", 10, arrival_s=4.9)
    p = plus(token_budget=8192, adaptive_budget=False, max_token_budget=8192)
    plan = p.schedule(state(5.0, waiting=[a, b, c, d], kv_blocks=5000))
    assert ids(plan.admitted) == ["b", "a", "d", "c"]


def test_without_aging_shortest_prompt_first_holds():
    old = waiting("long", 6000, arrival_s=0.0)
    new = [waiting(f"s{i}", 50 + i, arrival_s=2.4) for i in range(3)]
    plan = plus("slai-plus-no-aging").schedule(state(10.0, waiting=[*new, old]))
    assert ids(plan.admitted)[:3] == ["s0", "s1", "s2"]


# --- the adaptive budget --------------------------------------------------------------------------

def test_the_time_model_learns_each_batch_at_the_shape_it_ran_with():
    p = plus()
    train(p)  # every request's context has moved on by the time its batch is learned from
    np.testing.assert_allclose(p.time_model.coefficients, TRUTH, rtol=1e-6)


def test_a_batch_without_its_recorded_shape_is_refused():
    with pytest.raises(ValueError, match="record_shape"):
        plus().on_batch_end(state(0.0), BatchPlan(decodes=[decoding("d")]), 0.0, 0.03)


def test_the_time_model_recovers_the_cost_profiles_five_terms():
    m = BatchTimeModel()
    truth = TRUTH
    for k in range(64):
        n, ctx, chunk, prior = 64 * (k % 9 + 1), 1000 * (k % 5), 32 * (k % 7 + 1), 256 * (k % 3)
        x = BatchTimeModel.terms(n, ctx, chunk * chunk, chunk * prior)
        m.add_terms(x, float(x @ truth))
    np.testing.assert_allclose(m.coefficients, truth, rtol=1e-6)
    assert m.predict_s(1000, 0.0) == pytest.approx(0.060, rel=1e-6)


def test_the_time_model_is_not_used_before_enough_varied_samples():
    m = BatchTimeModel()
    for k in range(BatchTimeModel.MIN_SAMPLES - 1):
        m.add(64 * (k % 8 + 1), 100 * k, 0.02 + 4e-5 * 64 * (k % 8 + 1), 64 * 64, 64 * k)
    assert m.coefficients is None  # too few samples
    m2 = BatchTimeModel()
    for k in range(100):
        m2.add(64 * (k % 8 + 1), 100 * k, 0.04)  # no prefill chunk ever: its terms are unknown
    assert m2.coefficients is None


def test_budget_grows_in_tiles_while_prompts_queue_and_the_strict_tier_keeps_its_slo():
    p = plus()
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=PREMIUM)
    plan = p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    # (1 - 0.1) x 100 ms = 90 ms; one decode and a chunk of B - 1 tokens at context 0:
    # B = 1408: 20 + 56.3 + 9.9 = 86.2 ms fits; B = 1536: 20 + 61.4 + 11.8 = 93.2 ms does not
    assert p.last_budget == 1408 and p.last_budget % p.config.tile_tokens == 0
    assert plan.num_tokens == 1408
    assert cost_s(plan) <= 0.9 * PREMIUM


def test_budget_follows_the_strictest_running_tier():
    p = plus()
    train(p)
    free_only = [decoding("f", lst_s=99.0, tbt_slo_s=FREE)]
    p.schedule(state(1.0, running=free_only, waiting=[waiting("w", 9000)], kv_blocks=2000))
    assert p.last_budget == p.config.max_token_budget  # 450 ms allows more than 2048 tokens
    with_premium = [*free_only, decoding("p", lst_s=99.0, tbt_slo_s=PREMIUM)]
    p.schedule(state(1.0, running=with_premium, waiting=[waiting("w", 9000)], kv_blocks=2000))
    assert p.last_budget == 1408


def test_budget_stays_at_the_base_without_a_backlog():
    p = plus()
    train(p)
    run = [decoding(f"d{i}", lst_s=99.0, tbt_slo_s=PREMIUM) for i in range(5)]
    plan = p.schedule(state(1.0, running=run, waiting=[waiting("w", 100)]))
    assert p.last_budget == 512 and plan.num_tokens == 105


def test_budget_stays_at_the_base_until_the_time_model_is_trained():
    p = plus()
    prem = decoding("p", lst_s=99.0, tbt_slo_s=PREMIUM)
    plan = p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 512 and plan.num_tokens == 512


def test_without_the_adaptive_budget_the_base_budget_holds():
    p = plus("slai-plus-no-budget")
    train(p)
    plan = p.schedule(state(1.0, running=[decoding("p", lst_s=99.0, tbt_slo_s=PREMIUM)],
                            waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert plan.num_tokens == 512


def test_a_started_prefill_counts_as_backlog():
    p = plus()
    train(p)
    s = started("s", 5000, 512, tbt_slo_s=PREMIUM)
    plan = p.schedule(state(1.0, running=[s], kv_blocks=2000))
    # its chunk sees 512 tokens of context: B = 1408 takes 87.7 ms, B = 1536 94.8 ms
    assert chunks(plan) == [("s", 1408)]
    assert cost_s(plan) <= 0.9 * PREMIUM


# --- the slot guard -------------------------------------------------------------------------------

def _slot_bound_state(kv_used: int):
    run = [decoding(f"d{i}", lst_s=99.0, tbt_slo_s=FREE) for i in range(4)]
    return state(1.0, running=run, waiting=[waiting("w", 1000)], used=kv_used, kv_blocks=1000)


def test_a_nearly_full_kv_cache_runs_every_decode_first_and_keeps_the_base_budget():
    p = plus()
    train(p)
    plan = p.schedule(_slot_bound_state(kv_used=850))  # 85 % >= 80 %
    assert plan.num_critical_decodes == 4 and ids(plan.decodes) == ["d0", "d1", "d2", "d3"]
    assert p.last_budget == 512


def test_nearly_all_request_slots_in_use_count_as_slot_bound_too():
    p = plus(max_active_requests=5)  # 4 running >= 0.8 x 5
    plan = p.schedule(_slot_bound_state(kv_used=100))
    assert plan.num_critical_decodes == 4


def test_below_the_guard_non_critical_decodes_wait_for_leftover_budget():
    for name, used in (("slai-plus", 500), ("slai-plus-no-kv-guard", 850)):
        p = plus(name)
        plan = p.schedule(_slot_bound_state(kv_used=used))
        assert plan.num_critical_decodes == 0 and plan.decodes == [], name  # the prompt took the budget


# --- the offset -----------------------------------------------------------------------------------

def test_offset_is_twice_the_longest_recent_iteration_plus_the_margin():
    p = plus()
    st = state(0.0)
    d = decoding("d", tbt_slo_s=FREE)
    p.on_batch_end(st, ran(BatchPlan(decodes=[])), 0.0, 0.030)
    p.on_batch_end(st, ran(BatchPlan(decodes=[])), 0.030, 0.110)  # 80 ms: the longest
    p.on_batch_end(st, ran(BatchPlan(decodes=[d])), 0.110, 0.150)
    # LST = 0.150 + 0.9 x 0.5 - 2 x 0.080
    assert d.lst_s == pytest.approx(0.150 + 0.45 - 0.160)


def test_a_strict_decode_is_critical_every_iteration_when_iterations_are_long():
    p = plus()
    st = state(0.0)
    prem = decoding("p", tbt_slo_s=PREMIUM)
    p.on_batch_end(st, ran(BatchPlan(decodes=[prem])), 0.0, 0.060)
    assert prem.lst_s <= 0.060  # 0.9 x 100 ms - 2 x 60 ms < 0: critical at once


def test_recent_window_forgets_an_old_long_batch_and_the_all_time_variant_does_not():
    recent, all_time = plus(batch_time_window=4), plus("slai-plus-no-window")
    st = state(0.0)
    for p in (recent, all_time):
        p.on_batch_end(st, ran(BatchPlan()), 0.0, 0.5)  # one 500 ms hiccup
        t = 0.5
        for _ in range(10):
            p.on_batch_end(st, ran(BatchPlan()), t, t + 0.04)
            t += 0.04
    d1, d2 = decoding("a", tbt_slo_s=FREE), decoding("b", tbt_slo_s=FREE)
    recent.on_batch_end(st, ran(BatchPlan(decodes=[d1])), 1.0, 1.04)
    all_time.on_batch_end(st, ran(BatchPlan(decodes=[d2])), 1.0, 1.04)
    assert d1.lst_s == pytest.approx(1.04 + 0.45 - 0.08)
    assert d2.lst_s == pytest.approx(1.04 + 0.45 - 1.0)


def test_without_the_adaptive_offset_it_is_theta_recent_mean_batches():
    p = plus("slai-plus-no-offset", batch_time_window=2)
    st = state(0.0)
    d = decoding("d", tbt_slo_s=FREE)
    p.on_batch_end(st, ran(BatchPlan()), 0.0, 0.1)
    p.on_batch_end(st, ran(BatchPlan()), 0.1, 0.14)
    p.on_batch_end(st, ran(BatchPlan(decodes=[d])), 0.14, 0.20)
    assert d.lst_s == pytest.approx(0.20 + 0.5 - 5 * 0.05)  # mean of the last 2: 40 and 60 ms


def test_kv_pressure_scales_the_offset_like_slais_dynamic_switch():
    p = plus()
    d = decoding("d", tbt_slo_s=FREE)
    full = state(0.0, running=[d], used=995, kv_blocks=1000)
    p.on_batch_end(full, ran(BatchPlan(decodes=[d])), 0.0, 0.05)
    assert d.lst_s == pytest.approx(0.05 + 0.45 - 2 * 2 * 0.05)


# --- the contract ---------------------------------------------------------------------------------

def test_the_faithful_slai_presets_are_untouched():
    assert type(make_policy("slai-spf-dynamic")).__name__ == "SLAIPolicy"


def test_max_token_budget_below_the_base_budget_is_rejected():
    with pytest.raises(ValueError, match="max_token_budget"):
        make_policy("slai-plus", token_budget=1024, max_token_budget=512)
