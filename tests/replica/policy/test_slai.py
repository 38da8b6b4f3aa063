"""SLAI (docs/paper.md "SLAI ... per replica, every iteration"), one behaviour per test, on hand-built
engine states. Decode-ready requests carry an LST; `now >= LST` makes a decode critical."""

from __future__ import annotations

import pytest

from policy_testkit import INF, chunks, decoding, ids, snapshot, started, state, waiting
from replica.policy import BatchPlan, available_schedulers, make_policy


def slai(name: str = "slai-spf-dynamic", **overrides):
    return make_policy(name, **overrides)


SLAI_PRESETS = [n for n in available_schedulers() if make_policy(n).config.kind == "slai"]


# --- 1. critical decodes ----------------------------------------------------------------------


def test_critical_decodes_come_first_earliest_lst_first_ties_by_arrival():
    a = decoding("a", lst_s=7.0, arrival_s=0.0)
    b = decoding("b", lst_s=3.0, arrival_s=2.0)
    c = decoding("c", lst_s=3.0, arrival_s=1.0)  # same LST as b, arrived earlier
    d = decoding("d", lst_s=10.0, arrival_s=0.0)  # now == LST: critical
    e = decoding("e", lst_s=11.0, arrival_s=0.0)  # not yet critical
    plan = slai().schedule(state(10.0, running=[a, b, c, d, e]))
    assert ids(plan.decodes) == ["c", "b", "a", "d", "e"]
    assert plan.num_critical_decodes == 4


def test_critical_decodes_are_served_before_any_prefill():
    p = started("p", 100, 16, arrival_s=0.0)
    x = decoding("x", lst_s=0.0, arrival_s=1.0)
    y = decoding("y", lst_s=1.0, arrival_s=2.0)
    z = decoding("z", lst_s=9.0, arrival_s=3.0)  # non-critical at now=5
    plan = slai(token_budget=3).schedule(state(5.0, running=[p, x, y, z], waiting=[waiting("w", 50)]))
    assert ids(plan.decodes) == ["x", "y"]
    assert chunks(plan) == [("p", 1)]
    assert plan.admitted == []


def test_critical_decodes_beyond_the_budget_keep_the_earliest_lst():
    reqs = [decoding(f"d{lst}", lst_s=float(lst), arrival_s=0.0) for lst in (3, 1, 2)]
    plan = slai(token_budget=2).schedule(state(5.0, running=reqs))
    assert ids(plan.decodes) == ["d1", "d2"]
    assert plan.num_critical_decodes == 2


# --- 2. started prefills ----------------------------------------------------------------------


def test_started_prefills_run_fifo_with_chunk_min_of_remaining_and_budget_left():
    # FIFO = the order they started (running order), not arrival order.
    p1 = started("p1", 100, 95, arrival_s=5.0)  # 5 tokens left
    p2 = started("p2", 200, 16, arrival_s=1.0)  # 184 tokens left
    plan = slai(token_budget=64).schedule(state(0.0, running=[p1, p2]))
    assert chunks(plan) == [("p1", 5), ("p2", 59)]
    assert plan.num_tokens == 64


def test_started_prefills_come_before_new_prefills():
    p = started("p", 100, 50)
    plan = slai(token_budget=50).schedule(state(0.0, running=[p], waiting=[waiting("w", 10)]))
    assert chunks(plan) == [("p", 50)]
    assert plan.admitted == []


# --- 3. new prefills --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("slai-fcfs-fixed", ["A", "B", "C"]),  # arrival order
        ("slai-spf-fixed", ["B", "C", "A"]),  # shortest prompt first
        ("slai-spf-dynamic", ["B", "C", "A"]),
        ("slai-spf-tier-dynamic", ["C", "B", "A"]),  # strict tier (rank 0) first, then SPF
    ],
)
def test_new_prefills_are_admitted_in_fcfs_spf_or_spf_with_strict_tier_first_order(name, expected):
    queue = [
        waiting("A", 300, 0.0, tier_rank=1),
        waiting("B", 100, 1.0, tier_rank=1),
        waiting("C", 200, 2.0, tier_rank=0),
    ]
    plan = slai(name, token_budget=1000).schedule(state(0.0, waiting=queue))
    assert ids(plan.admitted) == expected
    assert chunks(plan) == [(r, {"A": 300, "B": 100, "C": 200}[r]) for r in expected]


def test_spf_ties_keep_queue_order():
    # A preempted request sits in front of the queue; an equal prompt behind it stays behind.
    queue = [waiting("front", 100, 5.0), waiting("later", 100, 1.0), waiting("short", 50, 9.0)]
    plan = slai("slai-spf-fixed").schedule(state(0.0, waiting=queue))
    assert ids(plan.admitted) == ["short", "front", "later"]


def test_the_last_admission_gets_the_budget_left_as_its_first_chunk():
    queue = [waiting("A", 300, 0.0), waiting("B", 100, 1.0), waiting("C", 200, 2.0)]
    plan = slai("slai-spf-fixed", token_budget=350).schedule(state(0.0, waiting=queue))
    assert chunks(plan) == [("B", 100), ("C", 200), ("A", 50)]
    assert ids(plan.admitted) == ["B", "C", "A"]


def test_admission_stops_at_the_first_request_that_does_not_fit():
    # FCFS head needs 20 blocks, only 10 free: the small prompt behind it waits too.
    queue = [waiting("big", 320, 0.0), waiting("small", 16, 1.0)]
    plan = slai("slai-fcfs-fixed").schedule(state(0.0, waiting=queue, kv_blocks=50, used=40))
    assert plan.admitted == [] and plan.is_empty


# --- 4. non-critical decodes -------------------------------------------------------------------


def test_non_critical_decodes_fill_the_leftover_budget_earliest_lst_first():
    running = [decoding("d5", 5.0), decoding("d3", 3.0), decoding("d4", 4.0)]
    plan = slai(token_budget=12).schedule(state(0.0, running=running, waiting=[waiting("w", 10)]))
    assert chunks(plan) == [("w", 10)]  # prefills before non-critical decodes
    assert ids(plan.decodes) == ["d3", "d4"]
    assert plan.num_critical_decodes == 0


# --- budget and caps ---------------------------------------------------------------------------


def test_token_budget_is_respected_by_the_whole_batch():
    running = [
        decoding("c1", 0.0),
        decoding("c2", 1.0),
        decoding("c3", 2.0),
        started("p", 100, 60),
        decoding("n1", 20.0),
        decoding("n2", 30.0),
    ]
    plan = slai(token_budget=100).schedule(state(10.0, running=running, waiting=[waiting("w", 500)]))
    assert ids(plan.decodes) == ["c1", "c2", "c3"]
    assert chunks(plan) == [("p", 40), ("w", 57)]
    assert plan.num_tokens == 100


def test_decode_cap_counts_critical_and_non_critical_decodes():
    running = [
        decoding("c1", 1.0),
        decoding("c2", 2.0),
        decoding("n1", 20.0),
        decoding("n2", 15.0),
        decoding("n3", 30.0),
    ]
    plan = slai(max_decodes=3).schedule(state(10.0, running=running))
    assert ids(plan.decodes) == ["c1", "c2", "n2"]
    assert plan.num_critical_decodes == 2


def test_decode_cap_limits_critical_decodes_and_leaves_the_budget_to_prefills():
    running = [decoding("c3", 3.0), decoding("c1", 1.0), decoding("c2", 2.0)]
    plan = slai(max_decodes=2, token_budget=10).schedule(state(10.0, running=running, waiting=[waiting("w", 100)]))
    assert ids(plan.decodes) == ["c1", "c2"]
    assert chunks(plan) == [("w", 8)]


@pytest.mark.parametrize("num_running, admitted", [(2, []), (1, ["w1"]), (0, ["w1", "w2"])])
def test_active_cap_blocks_admissions(num_running, admitted):
    running = [decoding(f"d{i}", 100.0) for i in range(num_running)]
    queue = [waiting("w1", 10, 0.0), waiting("w2", 10, 1.0)]
    plan = slai("slai-fcfs-fixed", max_active_requests=2).schedule(state(0.0, running=running, waiting=queue))
    assert ids(plan.admitted) == admitted
    assert len(plan.decodes) == num_running  # the running ones still decode


# --- KV admission --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kv_blocks, free, prompt_len, admitted",
    [
        (100, 10, 144, True),  # 9 blocks, 1 left = the 1 % watermark
        (100, 10, 145, False),  # 10 blocks would eat the watermark
        (1000, 20, 160, True),  # 10 blocks, 10 left = watermark
        (1000, 20, 161, False),
        (50, 3, 48, True),  # 50 blocks: watermark int(0.5) = 0
        (50, 3, 49, False),
    ],
)
def test_kv_admission_needs_blocks_for_the_whole_prompt_and_keeps_the_1pct_watermark(
    kv_blocks, free, prompt_len, admitted
):
    # The first chunk is only 16 tokens, but the whole prompt must fit.
    st = state(0.0, waiting=[waiting("w", prompt_len)], kv_blocks=kv_blocks, used=kv_blocks - free)
    plan = slai(token_budget=16).schedule(st)
    assert (ids(plan.admitted) == ["w"]) is admitted
    if admitted:
        assert chunks(plan) == [("w", 16)]


def test_kv_blocks_reserved_by_earlier_admissions_count_against_later_ones():
    queue = [waiting(f"w{i}", 80, float(i)) for i in range(3)]  # 5 blocks each
    st = state(0.0, waiting=queue, kv_blocks=1000, used=980)  # 20 free, watermark 10
    plan = slai("slai-fcfs-fixed").schedule(st)
    assert ids(plan.admitted) == ["w0", "w1"]


def test_a_preempted_request_is_readmitted_with_blocks_for_prompt_and_outputs():
    # 100-token prompt + 28 outputs = 128 tokens = 8 blocks; only 7 free (50 blocks, watermark 0).
    r = waiting("r", 100, num_output_tokens=28)
    assert not slai().schedule(state(0.0, waiting=[r], kv_blocks=50, used=43)).admitted
    plan = slai().schedule(state(0.0, waiting=[r], kv_blocks=50, used=42))
    assert chunks(plan) == [("r", 128)]


# --- LST bookkeeping (on_batch_end) --------------------------------------------------------------


def test_a_deferred_decode_keeps_its_old_lst():
    a = decoding("a", lst_s=1.0, arrival_s=0.0)
    b = decoding("b", lst_s=2.0, arrival_s=1.0)
    pol = slai("slai-spf-fixed", token_budget=1)
    st = state(5.0, running=[a, b])
    plan = pol.schedule(st)
    assert ids(plan.decodes) == ["a"]
    pol.on_batch_end(st, plan, 5.0, 5.01)
    assert a.lst_s == pytest.approx(5.01 + 0.5 - 10 * 0.01)  # fixed offset: Theta 10
    assert b.lst_s == 2.0


def test_lst_is_batch_end_plus_tbt_minus_theta_times_mean_batch_time():
    d = decoding("d", lst_s=0.0, tbt_slo_s=0.1)
    pol = slai("slai-spf-fixed")
    st = state(1.0, running=[d])
    pol.on_batch_end(st, pol.schedule(st), 1.0, 1.02)  # mean 0.02
    assert d.lst_s == pytest.approx(1.02 + 0.1 - 10 * 0.02)  # fixed offset: Theta 10
    st.now_s = 1.02
    pol.on_batch_end(st, pol.schedule(st), 1.02, 1.06)  # mean (0.02 + 0.04) / 2
    assert d.lst_s == pytest.approx(1.06 + 0.1 - 10 * 0.03)


def test_mean_batch_time_is_the_running_mean_over_all_batches():
    d = decoding("d", lst_s=50.0, tbt_slo_s=0.5)  # not critical: deferred while others run
    others = [decoding(f"o{i}", lst_s=0.0, arrival_s=1.0) for i in range(3)]
    pol = slai("slai-spf-fixed", token_budget=1)
    st = state(0.0, running=[d, *others])
    t = 0.0
    for dt in (0.01, 0.02, 0.06):  # batches that run someone else
        plan = pol.schedule(st)
        assert d not in plan.decodes
        pol.on_batch_end(st, plan, t, t + dt)
        t += dt
        st.now_s = t
    assert d.lst_s == 50.0
    st.running = [d]
    plan = pol.schedule(st)
    pol.on_batch_end(st, plan, t, t + 0.04)
    assert d.lst_s == pytest.approx(t + 0.04 + 0.5 - 10 * (0.01 + 0.02 + 0.06 + 0.04) / 4)


def test_lst_is_set_when_the_last_prefill_chunk_emits_the_first_token():
    p = started("p", 40, 24, tbt_slo_s=0.1)  # 16 left: completes this batch
    q = started("q", 100, 16, arrival_s=1.0, tbt_slo_s=0.1)  # still prefilling afterwards
    pol = slai("slai-spf-fixed", token_budget=26)
    st = state(0.0, running=[p, q])
    plan = pol.schedule(st)
    assert chunks(plan) == [("p", 16), ("q", 10)]
    # the mechanism executes the plan: p's last chunk samples its first token
    p.num_computed_tokens, p.num_output_tokens = 40, 1
    q.num_computed_tokens = 26
    pol.on_batch_end(st, plan, 0.0, 0.01)
    assert p.lst_s == pytest.approx(0.01 + 0.1 - 10 * 0.01)
    assert q.lst_s == INF


@pytest.mark.parametrize(
    "name, used_blocks, theta",
    [
        ("slai-spf-dynamic", 2, 5.0),
        ("slai-spf-dynamic", 95, 5.0),  # 95 % < 96 %
        ("slai-spf-dynamic", 96, 10.0),  # at the threshold
        ("slai-spf-dynamic", 100, 10.0),
        ("slai-spf-tier-dynamic", 96, 10.0),
        ("slai-spf-fixed", 2, 10.0),  # fixed offset: the authors' 10, whatever the KV use
        ("slai-spf-fixed", 96, 10.0),
        ("slai-fcfs-fixed", 2, 10.0),
        ("slai-fcfs-fixed", 100, 10.0),
    ],
)
def test_theta_is_5_below_96pct_kv_use_and_10_at_or_above_when_dynamic_and_fixed_stays_10(
    name, used_blocks, theta
):
    d = decoding("d", lst_s=0.0, tbt_slo_s=0.5)  # holds 2 blocks
    st = state(0.0, running=[d], kv_blocks=100, used=used_blocks)
    pol = slai(name)
    pol.on_batch_end(st, pol.schedule(st), 0.0, 0.01)
    assert d.lst_s == pytest.approx(0.01 + 0.5 - theta * 0.01)


# --- memory pressure -------------------------------------------------------------------------------


def test_memory_pressure_preempts_the_newest_started_prefill_not_in_this_batch():
    p_old = started("p_old", 64, 16, arrival_s=0.0)  # 4 blocks
    p_new = started("p_new", 64, 16, arrival_s=1.0)  # 4 blocks
    d = decoding("d", lst_s=0.0, arrival_s=2.0, needs_block=True)  # 2 blocks, needs a 3rd
    st = state(5.0, running=[p_old, p_new, d], kv_blocks=10)  # full
    plan = slai().schedule(st)
    assert ids(plan.preempted) == ["p_new"]
    assert ids(plan.decodes) == ["d"]
    assert chunks(plan) == [("p_old", 48)]


def test_memory_pressure_without_a_started_prefill_preempts_the_decode_itself():
    d1 = decoding("d1", lst_s=0.0, arrival_s=0.0, needs_block=True)
    d2 = decoding("d2", lst_s=1.0, arrival_s=1.0)  # fits in its blocks
    plan = slai().schedule(state(5.0, running=[d1, d2], kv_blocks=4))  # full
    assert ids(plan.preempted) == ["d1"]
    assert ids(plan.decodes) == ["d2"]


def test_memory_pressure_never_preempts_a_prefill_already_in_this_batch():
    # Step 4: the started prefill already got its chunk, so the non-critical decode itself goes.
    p = started("p", 64, 54, arrival_s=0.0)  # 4 blocks
    d = decoding("d", lst_s=100.0, arrival_s=1.0, needs_block=True)  # 2 blocks
    plan = slai().schedule(state(0.0, running=[p, d], kv_blocks=6))  # full
    assert chunks(plan) == [("p", 10)]
    assert ids(plan.preempted) == ["d"]
    assert plan.decodes == []


# --- purity ----------------------------------------------------------------------------------------


def _busy_state():
    running = [
        started("p_old", 64, 16, arrival_s=0.0),
        started("p_new", 64, 16, arrival_s=1.0),
        decoding("crit", lst_s=0.0, arrival_s=2.0, needs_block=True),
        decoding("late", lst_s=99.0, arrival_s=3.0),
    ]
    queue = [waiting("w1", 40, 4.0, tier_rank=1), waiting("w0", 80, 5.0, tier_rank=0)]
    return state(5.0, running=running, waiting=queue, kv_blocks=12)  # full


@pytest.mark.parametrize("name", SLAI_PRESETS)
def test_schedule_does_not_mutate_the_state_or_the_requests(name):
    st = _busy_state()
    before = snapshot(st)
    pol = slai(name, token_budget=64)
    first = pol.schedule(st)
    assert first.preempted  # the scenario does exercise preemption
    assert snapshot(st) == before
    assert pol.schedule(st).summary() == first.summary()  # and so it is repeatable


def test_slai_presets_are_the_papers_four_variants():
    assert sorted(SLAI_PRESETS) == sorted(
        ["slai-fcfs-fixed", "slai-spf-fixed", "slai-spf-dynamic", "slai-spf-tier-dynamic"]
    )
    assert isinstance(slai().schedule(state()), BatchPlan)
