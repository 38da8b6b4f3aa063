"""The baselines of docs/paper.md (Sarathi-Serve FCFS/SPF, vLLM-style), RAD, and the registry."""

from __future__ import annotations

import pytest

from policy_testkit import chunks, decoding, ids, snapshot, started, state, waiting
from replica.policy import SchedulerConfig, available_schedulers, make_policy, scheduler_config
from replica.policy.rad import RADPolicy
from replica.policy.sarathi import SarathiPolicy
from replica.policy.slai import SLAIPolicy
from replica.policy.slai_next import SLAINextPolicy
from replica.policy.slai_plus import SLAIPlusPolicy
from replica.policy.vllm_style import VLLMStylePolicy

SARATHI = ["sarathi-fcfs", "sarathi-spf"]


# --- Sarathi-Serve ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SARATHI)
def test_sarathi_runs_every_running_decode_every_iteration(name):
    # LSTs are irrelevant to Sarathi: critical or not, every decode runs.
    running = [decoding(f"d{i}", lst_s=lst, arrival_s=float(i)) for i, lst in enumerate([0, 9, 1e9, 3, 5, 7])]
    running.append(started("p", 100, 70, arrival_s=10.0))
    plan = make_policy(name, token_budget=64).schedule(state(1.0, running=running, waiting=[waiting("w", 200)]))
    assert ids(plan.decodes) == [f"d{i}" for i in range(6)]
    assert chunks(plan) == [("p", 30), ("w", 28)]
    assert plan.num_tokens == 64


@pytest.mark.parametrize("name", SARATHI)
@pytest.mark.parametrize("budget", [16, 64, 512])
def test_sarathi_chunks_prefills_under_the_token_budget(name, budget):
    queue = [waiting("w0", 2000, 0.0), waiting("w1", 2000, 1.0)]
    plan = make_policy(name, token_budget=budget).schedule(state(0.0, waiting=queue, kv_blocks=2000))
    assert chunks(plan) == [("w0", budget)]
    # next iteration: the started prefill continues before anything new is admitted
    w0 = started("w0", 2000, budget)
    plan = make_policy(name, token_budget=budget).schedule(state(0.0, running=[w0], waiting=queue[1:], kv_blocks=2000))
    assert chunks(plan) == [("w0", budget)]


@pytest.mark.parametrize("name, expected", [("sarathi-fcfs", ["A", "B", "C"]), ("sarathi-spf", ["B", "C", "A"])])
def test_sarathi_admits_new_prompts_fcfs_or_shortest_prompt_first(name, expected):
    queue = [waiting("A", 300, 0.0), waiting("B", 100, 1.0), waiting("C", 200, 2.0)]
    plan = make_policy(name, token_budget=1000).schedule(state(0.0, waiting=queue))
    assert ids(plan.admitted) == expected


@pytest.mark.parametrize("name", SARATHI)
def test_sarathi_preempts_the_latest_arrived_running_request_when_a_decode_needs_a_block(name):
    d_old = decoding("d_old", arrival_s=0.0, needs_block=True)
    d_mid = decoding("d_mid", arrival_s=1.0)
    d_new = decoding("d_new", arrival_s=2.0)
    st = state(0.0, running=[d_mid, d_new, d_old], kv_blocks=6)  # full; running order != arrival
    plan = make_policy(name).schedule(st)
    assert ids(plan.preempted) == ["d_new"]
    assert ids(plan.decodes) == ["d_old", "d_mid"]


@pytest.mark.parametrize("name", SARATHI)
def test_sarathi_preempts_a_started_prefill_if_it_arrived_last(name):
    d = decoding("d", arrival_s=0.0, needs_block=True)
    p = started("p", 64, 16, arrival_s=1.0)
    plan = make_policy(name).schedule(state(0.0, running=[d, p], kv_blocks=6))
    assert ids(plan.preempted) == ["p"]
    assert ids(plan.decodes) == ["d"]
    assert plan.prefills == []


@pytest.mark.parametrize("name", SARATHI)
def test_sarathi_preempts_the_decode_itself_when_it_is_the_latest_arrival(name):
    a = decoding("a", arrival_s=0.0)
    b = decoding("b", arrival_s=1.0, needs_block=True)
    plan = make_policy(name).schedule(state(0.0, running=[b, a], kv_blocks=4))
    assert ids(plan.preempted) == ["b"]
    assert ids(plan.decodes) == ["a"]


# --- vLLM-style -----------------------------------------------------------------------------------


def test_vllm_prefills_whole_prompts_and_an_iteration_with_prefill_has_no_decodes():
    running = [decoding("d1", lst_s=0.0, arrival_s=0.0), decoding("d2", lst_s=0.0, arrival_s=1.0)]
    queue = [waiting("a", 300, 2.0), waiting("b", 200, 3.0)]
    plan = make_policy("vllm").schedule(state(10.0, running=running, waiting=queue))
    assert chunks(plan) == [("a", 300), ("b", 200)]
    assert plan.decodes == []


@pytest.mark.parametrize(
    "prompts, admitted",
    [
        ([5000, 3000, 500], ["w0", "w1"]),  # 8000 + 500 > 8192
        ([8192], ["w0"]),
        ([4096, 4096, 1], ["w0", "w1"]),
        ([8193], []),  # never in one prefill iteration
        ([8193, 10], []),  # FCFS: nothing overtakes the head
    ],
)
def test_vllm_prefill_iterations_hold_at_most_8192_tokens(prompts, admitted):
    d = decoding("d", arrival_s=-1.0)
    queue = [waiting(f"w{i}", n, float(i)) for i, n in enumerate(prompts)]
    plan = make_policy("vllm").schedule(state(0.0, running=[d], waiting=queue, kv_blocks=4000))
    assert ids(plan.admitted) == admitted
    assert plan.num_prefill_tokens <= 8192
    assert all(n == r.prompt_len for r, n in plan.prefills)  # whole prompts
    assert ids(plan.decodes) == ([] if admitted else ["d"])  # no prefill: every decode runs


def test_vllm_max_prefill_tokens_override_applies():
    queue = [waiting("a", 600, 0.0), waiting("b", 600, 1.0)]
    plan = make_policy("vllm", max_prefill_tokens=1000).schedule(state(0.0, waiting=queue))
    assert chunks(plan) == [("a", 600)]


def test_vllm_decode_iteration_preempts_the_latest_arrived_request_when_a_block_is_missing():
    d_old = decoding("d_old", arrival_s=0.0, needs_block=True)
    d_new = decoding("d_new", arrival_s=1.0)
    plan = make_policy("vllm").schedule(state(0.0, running=[d_new, d_old], kv_blocks=4))
    assert ids(plan.preempted) == ["d_new"]
    assert ids(plan.decodes) == ["d_old"]


# --- RAD ------------------------------------------------------------------------------------------


def test_rad_runs_every_decode_every_iteration():
    running = [decoding(f"d{i}", lst_s=1e9, arrival_s=float(i)) for i in range(5)]
    plan = make_policy("rad").schedule(state(0.0, running=running, waiting=[waiting("w", 5000)], kv_blocks=2000))
    assert ids(plan.decodes) == [f"d{i}" for i in range(5)]


@pytest.mark.parametrize(
    "tile, max_batch, num_decodes, started_left, prompts, size",
    [
        (128, 2048, 3, 0, [5000], 2048),
        (128, 2000, 3, 0, [5000], 1920),  # largest tile multiple under max_batch_tokens
        (16, 100, 5, 0, [300], 96),
        (16, 100, 5, 200, [], 96),  # backlog from a started prefill
        (64, 256, 0, 0, [200, 200], 256),
        (16, 32, 40, 0, [100], 48),  # decodes alone exceed the cap: round up to a tile
    ],
)
def test_rad_iteration_size_is_a_tile_multiple_when_the_backlog_exceeds_max_batch_tokens(
    tile, max_batch, num_decodes, started_left, prompts, size
):
    running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(num_decodes)]
    if started_left:
        running.append(started("p", started_left + 16, 16, arrival_s=100.0))
    queue = [waiting(f"w{i}", n, 200.0 + i) for i, n in enumerate(prompts)]
    pol = make_policy("rad", tile_tokens=tile, max_batch_tokens=max_batch)
    plan = pol.schedule(state(0.0, running=running, waiting=queue, kv_blocks=2000))
    assert len(plan.decodes) == num_decodes
    assert plan.num_tokens == size
    assert size % tile == 0


def test_rad_caps_iterations_at_the_token_budget_while_the_active_cap_blocks_admissions():
    running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(3)]
    running.append(started("p", 3100, 100, arrival_s=3.0))  # 3000 tokens left
    blocked = make_policy("rad", tile_tokens=128, max_batch_tokens=2048, token_budget=512, max_active_requests=4)
    free = make_policy("rad", tile_tokens=128, max_batch_tokens=2048, token_budget=512, max_active_requests=1000)
    st = lambda: state(0.0, running=running, waiting=[waiting("w", 3000, 4.0)], kv_blocks=2000)  # noqa: E731
    assert blocked.schedule(st()).num_tokens == 512
    assert free.schedule(st()).num_tokens == 2048


def test_rad_iteration_shrinks_towards_the_token_budget_as_the_engine_fills():
    def size(num_running):
        running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(num_running - 1)]
        running.append(started("p", 9100, 100, arrival_s=99.0))
        pol = make_policy("rad", tile_tokens=128, max_batch_tokens=2048, token_budget=512, max_active_requests=64)
        return pol.schedule(state(0.0, running=running, waiting=[waiting("w", 100, 100.0)], kv_blocks=5000)).num_tokens

    assert size(1) == 2048
    assert size(32) == 512 + 768  # half the slots free: half the span
    assert size(63) == 512 + 128
    assert size(1) > size(16) > size(32) > size(48) >= 512


def test_rad_takes_the_whole_backlog_when_it_fits():
    running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(3)]
    running.append(started("p", 100, 80, arrival_s=3.0))
    queue = [waiting("w0", 50, 4.0), waiting("w1", 60, 5.0)]
    plan = make_policy("rad").schedule(state(0.0, running=running, waiting=queue))
    assert chunks(plan) == [("p", 20), ("w0", 50), ("w1", 60)]
    assert plan.num_tokens == 3 + 20 + 50 + 60


def test_rad_without_prefill_backlog_is_a_decode_only_iteration():
    running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(4)]
    plan = make_policy("rad").schedule(state(0.0, running=running))
    assert plan.num_tokens == 4 and plan.prefills == []


def test_rad_iteration_stays_tile_aligned_when_waiting_prompts_cannot_be_admitted():
    running = [decoding(f"d{i}", arrival_s=float(i)) for i in range(3)]
    running.append(started("p", 1100, 100, arrival_s=3.0))  # 1000 tokens left
    queue = [waiting("w", 3000, 4.0)]  # blocked by the active cap
    pol = make_policy("rad", tile_tokens=128, max_batch_tokens=2048, max_active_requests=4)
    plan = pol.schedule(state(0.0, running=running, waiting=queue, kv_blocks=2000))
    assert plan.admitted == []
    assert plan.num_tokens % 128 == 0


# --- purity of every baseline ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in available_schedulers() if make_policy(n).config.kind != "slai"])
def test_baseline_schedule_does_not_mutate_the_state_or_the_requests(name):
    running = [
        decoding("d_old", lst_s=0.0, arrival_s=0.0, needs_block=True),
        started("p", 64, 16, arrival_s=1.0),
        decoding("d_new", lst_s=9.0, arrival_s=2.0),
    ]
    queue = [waiting("w1", 40, 4.0), waiting("w0", 20, 5.0)]
    st = state(5.0, running=running, waiting=queue, kv_blocks=8)  # full
    before = snapshot(st)
    pol = make_policy(name, max_prefill_tokens=64, token_budget=64, tile_tokens=16, max_batch_tokens=64)
    plan = pol.schedule(st)
    assert plan.preempted  # the scenario exercises preemption
    assert snapshot(st) == before


# --- registry and configuration --------------------------------------------------------------------

PAPER_PRESETS = {
    # name: (class, kind, admission order, dynamic theta)
    "sarathi-fcfs": (SarathiPolicy, "sarathi", "fcfs", None),
    "sarathi-spf": (SarathiPolicy, "sarathi", "spf", None),
    "vllm": (VLLMStylePolicy, "vllm", "fcfs", None),
    "slai-fcfs-fixed": (SLAIPolicy, "slai", "fcfs", False),
    "slai-spf-fixed": (SLAIPolicy, "slai", "spf", False),
    "slai-spf-dynamic": (SLAIPolicy, "slai", "spf", True),
    "slai-spf-tier-dynamic": (SLAIPolicy, "slai", "spf-tier", True),
    "rad": (RADPolicy, "rad", "fcfs", None),
}
SLAI_PLUS_PRESETS = {name: (SLAIPlusPolicy, "slai-plus", "spf", True) for name in (
    "slai-plus", "slai-plus-no-aging", "slai-plus-no-budget", "slai-plus-no-offset", "slai-plus-no-kv-guard",
    "slai-plus-no-window")}
SLAI_NEXT_PRESETS = {name: (SLAINextPolicy, "slai-next", "spf", True) for name in (
    "slai-next", "slai-next-no-srpf", "slai-next-no-eager-budget", "slai-next-no-aging", "slai-next-no-shrink")}
PRESETS = {**PAPER_PRESETS, **SLAI_PLUS_PRESETS, **SLAI_NEXT_PRESETS}


def test_registry_lists_the_papers_schedulers_rad_and_slai_plus_with_its_ablation():
    assert sorted(available_schedulers()) == sorted(PRESETS)


@pytest.mark.parametrize("name", available_schedulers())
def test_every_preset_name_builds_a_working_policy(name):
    pol = make_policy(name)
    assert pol.name == name
    cls, kind, order, dynamic = PRESETS[name]
    assert isinstance(pol, cls)
    assert (pol.config.kind, pol.config.admission_order) == (kind, order)
    if dynamic is not None:
        assert pol.config.dynamic_theta is dynamic
    st = state(0.0)
    plan = pol.schedule(st)
    assert plan.is_empty
    plan.record_shape()  # as every engine does before it runs the batch
    pol.on_batch_end(st, plan, 0.0, 0.01)


def test_defaults_are_the_papers_parameters():
    cfg = SchedulerConfig()
    assert (cfg.token_budget, cfg.max_active_requests, cfg.max_decodes) == (512, 128, 128)
    assert (cfg.theta_low, cfg.theta_high, cfg.theta_kv_threshold, cfg.theta_fixed) == (5.0, 10.0, 0.96, 10.0)
    assert cfg.max_prefill_tokens == 8192


def test_each_make_policy_call_gives_a_fresh_policy():
    assert make_policy("slai-spf-dynamic") is not make_policy("slai-spf-dynamic")


def test_unknown_scheduler_name_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError) as err:
        make_policy("slai-magic")
    msg = str(err.value)
    assert "slai-magic" in msg
    for name in available_schedulers():
        assert name in msg


def test_overrides_by_name_apply():
    pol = make_policy("sarathi-fcfs", token_budget=64, max_active_requests=3)
    assert (pol.config.token_budget, pol.config.max_active_requests) == (64, 3)
    queue = [waiting(f"w{i}", 10, float(i)) for i in range(5)]
    plan = pol.schedule(state(0.0, waiting=queue))
    assert ids(plan.admitted) == ["w0", "w1", "w2"]


def test_overrides_on_a_config_object_apply_and_leave_it_unchanged():
    cfg = scheduler_config("rad")
    pol = make_policy(cfg, tile_tokens=32)
    assert pol.config.tile_tokens == 32
    assert cfg.tile_tokens == 128


@pytest.mark.parametrize(
    "kwargs",
    [
        {"theta_low": 5.0, "theta_high": 4.0},  # theta_high < theta_low
        {"token_budget": 0},
        {"max_active_requests": 0},
        {"max_decodes": 0},
        {"theta_kv_threshold": 1.5},
        {"theta_low": -1.0},
        {"admission_order": "lifo"},
        {"kind": "orca"},
        {"kind": "rad", "tile_tokens": 128, "max_batch_tokens": 64},  # less than one tile
        {"no_such_field": 1},
    ],
)
def test_config_validation_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


def test_overrides_by_name_are_validated():
    with pytest.raises(ValueError, match="theta_high"):
        make_policy("slai-spf-dynamic", theta_high=1.0)


def test_overrides_on_a_config_object_are_validated():
    with pytest.raises(ValueError):
        make_policy(scheduler_config("slai-spf-dynamic"), theta_high=1.0)


def test_unknown_override_on_a_config_object_is_rejected():
    with pytest.raises(ValueError):
        make_policy(scheduler_config("slai-spf-dynamic"), token_budgte=64)
