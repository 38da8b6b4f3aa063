"""slai-next (replica/policy/slai_next.py): slai-plus with shortest-remaining-prefill-first across
started and new prompts (aged) and a budget grown whenever the time model predicts it safe; one
behaviour per test, on hand-built engine states."""

from __future__ import annotations

from policy_testkit import chunks, decoding, ids, started, state, waiting
from test_slai_plus import FREE, PREMIUM, cost_s, train

from replica.policy import make_policy
from replica.policy.registry import paper_schedulers
from replica.policy.slai_next import SLAINextPolicy


def nxt(name: str = "slai-next", **overrides) -> SLAINextPolicy:
    p = make_policy(name, **overrides)
    assert isinstance(p, SLAINextPolicy)
    return p


def fixed(name: str = "slai-next", **overrides) -> SLAINextPolicy:
    """The base budget only (512), so the chunk order is what a test sees."""
    return nxt(name, adaptive_budget=False, **overrides)


# --- shortest remaining prefill first -------------------------------------------------------------

def test_a_short_new_prompt_goes_before_a_long_started_prefill():
    s = started("long", 6000, 512, arrival_s=0.9)
    w = waiting("short", 200, arrival_s=0.95)
    plan = fixed().schedule(state(1.0, running=[s], waiting=[w]))
    assert ids(plan.admitted) == ["short"]
    assert chunks(plan) == [("short", 200)]  # the long one does not fit whole after an admission: it waits
    assert all(r is not s for r, _ in plan.prefills)


def test_without_srpf_started_prefills_go_first():
    s = started("long", 6000, 512, arrival_s=0.9)
    w = waiting("short", 200, arrival_s=0.95)
    plan = fixed("slai-next-no-srpf").schedule(state(1.0, running=[s], waiting=[w]))
    assert chunks(plan) == [("long", 512)] and plan.admitted == []


def test_a_started_prefill_with_fewer_tokens_left_goes_before_a_new_prompt():
    s = started("nearly", 2000, 1900, arrival_s=0.9)  # 100 left
    w = waiting("new", 300, arrival_s=0.95)
    plan = fixed().schedule(state(1.0, running=[s], waiting=[w]))
    assert chunks(plan) == [("nearly", 100), ("new", 300)]


def test_started_prefills_are_ordered_by_tokens_left_not_by_start():
    a = started("a", 4000, 100, arrival_s=0.1)  # 3900 left, started first
    b = started("b", 1000, 700, arrival_s=0.2)  # 300 left
    plan = fixed().schedule(state(1.0, running=[a, b]))
    assert chunks(plan) == [("b", 300), ("a", 212)]


def test_a_started_prefill_gets_a_partial_chunk_when_nothing_is_admitted_before_it():
    s = started("long", 6000, 512, arrival_s=0.9)
    plan = fixed().schedule(state(1.0, running=[s], waiting=[waiting("big", 7000, arrival_s=0.95)]))
    assert chunks(plan) == [("long", 512)] and plan.admitted == []


def test_started_chunks_come_before_admissions_in_the_plan_as_vllm_runs_them():
    s = started("s", 1000, 800, arrival_s=0.5)  # 200 left
    w = waiting("w", 100, arrival_s=0.9)
    plan = fixed().schedule(state(1.0, running=[s], waiting=[w, waiting("x", 900, arrival_s=0.95)]))
    assert chunks(plan) == [("s", 200), ("w", 100), ("x", 212)]


def test_an_overdue_started_prefill_goes_before_shorter_prompts():
    s = started("long", 6000, 512, arrival_s=0.0)  # waited 2.5 s >= 4 x 0.5 s
    w = waiting("short", 200, arrival_s=2.4)
    plan = fixed().schedule(state(2.5, running=[s], waiting=[w]))
    assert chunks(plan) == [("long", 512)] and plan.admitted == []


def test_without_aging_an_old_started_prefill_still_yields_to_shorter_prompts():
    s = started("long", 6000, 512, arrival_s=0.0)
    w = waiting("short", 200, arrival_s=2.4)
    plan = fixed("slai-next-no-aging").schedule(state(2.5, running=[s], waiting=[w]))
    assert chunks(plan) == [("short", 200)]


def test_overdue_prompts_go_oldest_first_whether_started_or_waiting():
    s = started("s", 3000, 100, arrival_s=0.5)  # overdue at 3.0, younger
    w = waiting("w", 300, arrival_s=0.2)  # overdue, older
    plan = fixed().schedule(state(3.0, running=[s], waiting=[w]))
    assert chunks(plan) == [("w", 300)]  # s does not fit whole after the admission: it waits


def test_a_blocked_admission_does_not_stop_started_prefills():
    s = started("s", 2000, 1000, arrival_s=0.5)  # 1000 left, holds 125 blocks
    w = waiting("w", 300, arrival_s=0.9)  # 19 blocks: more than the cache has free
    plan = fixed().schedule(state(1.0, running=[s], waiting=[w], kv_blocks=140))
    assert plan.admitted == [] and chunks(plan) == [("s", 512)]


def test_a_critical_decode_runs_before_any_prefill_chunk():
    d = decoding("d", lst_s=0.5, tbt_slo_s=PREMIUM)
    w = waiting("w", 200, arrival_s=0.9)
    plan = fixed().schedule(state(1.0, running=[d], waiting=[w]))
    assert ids(plan.decodes) == ["d"] and plan.num_critical_decodes == 1
    assert chunks(plan) == [("w", 200)]


# --- the eager budget -----------------------------------------------------------------------------

def test_the_budget_grows_with_a_backlog_when_not_slot_bound():
    p = nxt()
    train(p)
    run = [decoding(f"d{i}", lst_s=99.0, tbt_slo_s=FREE) for i in range(4)]
    plan = p.schedule(state(1.0, running=run, waiting=[waiting("w", 1500)], used=100, kv_blocks=1000))
    assert p.last_budget > 512 and plan.num_tokens > 512


def test_the_budget_does_not_grow_while_slot_bound():
    p = nxt()
    train(p)
    run = [decoding(f"d{i}", lst_s=99.0, tbt_slo_s=FREE) for i in range(4)]
    plan = p.schedule(state(1.0, running=run, waiting=[waiting("w", 1500)], used=850, kv_blocks=1000))
    assert p.last_budget == 512 and plan.num_tokens == 512
    assert plan.num_critical_decodes == 4  # the slot guard runs every decode


def test_with_no_decode_running_slot_bound_keeps_the_base():
    p = nxt()
    plan = p.schedule(state(1.0, running=[started("s", 9000, 512)], waiting=[waiting("w", 4000)],
                            used=850, kv_blocks=1000))
    assert p.last_budget == 512 and plan.num_tokens == 512


def test_without_the_eager_budget_slot_bound_keeps_the_base():
    p = nxt("slai-next-no-eager-budget")
    train(p)
    run = [decoding(f"d{i}", lst_s=99.0, tbt_slo_s=FREE) for i in range(4)]
    p.schedule(state(1.0, running=run, waiting=[waiting("w", 1500)], used=850, kv_blocks=1000))
    assert p.last_budget == 512


def test_a_premium_prefill_does_not_bound_the_budget_only_a_premium_decode_does():
    p = nxt()
    train(p)
    pre = started("p", 9000, 512, tbt_slo_s=PREMIUM)
    free = decoding("f", lst_s=99.0, tbt_slo_s=FREE)
    p.schedule(state(1.0, running=[pre, free], kv_blocks=2000))
    assert p.last_budget == p.config.max_token_budget  # 450 ms allows 2048 tokens
    prem = decoding("q", lst_s=99.0, tbt_slo_s=PREMIUM, prompt_len=21)
    plan = p.schedule(state(1.0, running=[pre, free, prem], kv_blocks=2000))
    assert p.last_budget < p.config.max_token_budget
    assert cost_s(plan) <= 0.9 * PREMIUM


def test_without_the_eager_budget_a_premium_prefill_bounds_it():
    p = nxt("slai-next-no-eager-budget")
    train(p)
    pre = started("p", 9000, 512, tbt_slo_s=PREMIUM)
    p.schedule(state(1.0, running=[pre, decoding("f", lst_s=99.0, tbt_slo_s=FREE)], kv_blocks=2000))
    assert p.last_budget < p.config.max_token_budget


def test_with_no_decode_running_the_budget_is_the_ceiling():
    p = nxt()  # untrained: no time model needed when no token gap is at stake
    plan = p.schedule(state(1.0, waiting=[waiting("w", 4000, tbt_slo_s=PREMIUM)], kv_blocks=2000))
    assert p.last_budget == 2048 and plan.num_tokens == 2048


def test_the_eager_budget_keeps_the_strictest_decode_within_its_slo():
    p = nxt()
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=PREMIUM)
    plan = p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 1408  # as slai-plus (test_slai_plus): 1536 would take 93 ms > 90 ms
    assert cost_s(plan) <= 0.9 * PREMIUM


def test_the_budget_stays_at_the_base_when_everything_fits():
    p = nxt()
    train(p)
    plan = p.schedule(state(1.0, running=[decoding("d", lst_s=99.0, tbt_slo_s=FREE)], waiting=[waiting("w", 100)]))
    assert p.last_budget == 512 and plan.num_tokens == 101


# --- the contract ---------------------------------------------------------------------------------

def test_slai_next_is_not_one_of_the_papers_schedulers():
    assert not any(n.startswith("slai-next") for n in paper_schedulers())


def test_the_policy_does_not_mutate_the_state():
    from policy_testkit import snapshot

    s = started("long", 6000, 512, arrival_s=0.0)
    st = state(2.5, running=[s, decoding("d", lst_s=0.1)], waiting=[waiting("w", 200, arrival_s=2.4)])
    before = snapshot(st)
    nxt().schedule(st)
    assert snapshot(st) == before


# --- the shrinking budget -------------------------------------------------------------------------

STRICT = 0.040  # 0.9 x 40 ms = 36 ms: shorter than the base budget's iteration (~41.8 ms)


def test_a_strict_tier_that_the_base_budget_cannot_hold_shrinks_it_in_tiles():
    p = nxt("slai-next")
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=STRICT)
    plan = p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    # 384 tokens: 20 + 15.4 + 0.7 = 36.1 ms > 36 ms; 256: 30.6 ms
    assert p.last_budget == 256 and plan.num_tokens == 256
    assert cost_s(plan) <= 0.9 * STRICT


def test_the_budget_still_shrinks_for_a_strict_decode_while_slot_bound():
    p = nxt("slai-next")
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=STRICT)
    plan = p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], used=1700, kv_blocks=2000))
    assert p.last_budget == 256 and plan.num_tokens == 256


def test_without_shrinking_the_base_budget_is_the_floor():
    p = nxt("slai-next-no-shrink")
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=STRICT)
    p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 512


def test_when_no_budget_down_to_one_tile_holds_the_strict_tier_shrinking_steps_aside():
    p = nxt("slai-next")
    train(p)
    prem = decoding("p", lst_s=99.0, tbt_slo_s=0.010)  # 9 ms: less than the 20 ms fixed cost
    p.schedule(state(1.0, running=[prem], waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 512


def test_the_shrunk_budget_holds_every_running_decode():
    p = nxt("slai-next", max_decodes=256)
    train(p)
    many = [decoding(f"d{i}", lst_s=0.5, tbt_slo_s=0.035) for i in range(200)]  # 31.5 ms
    plan = p.schedule(state(1.0, running=many, waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 256 and len(plan.decodes) == 200  # 384: 35.5 ms; 256: 30.3 ms
    many = [decoding(f"d{i}", lst_s=0.5, tbt_slo_s=0.030) for i in range(200)]  # 27 ms
    plan = p.schedule(state(1.0, running=many, waiting=[waiting("w", 4000)], kv_blocks=2000))
    assert p.last_budget == 512 and len(plan.decodes) == 200  # 128 would fit but cut 72 decodes
