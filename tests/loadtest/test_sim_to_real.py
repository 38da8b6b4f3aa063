"""loadtest.sim_to_real without vLLM: the workload and the simulator side of the comparison
(the engine side: tests/replica/vllm/test_sim_to_real_vllm.py)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from loadtest import sim_to_real as s2r
from replica.tiers import parse_tiers


def test_scaled_trace_fits_the_tiny_model():
    t = s2r.scaled_trace("paper", 0.1, 1024)
    assert len(t) > 1000
    assert (t.prompt_lens + t.output_lens <= 1024).all()
    assert t.prompt_lens.min() >= 1 and t.output_lens.min() >= 1


def test_sim_side_matches_itself():
    """compare_runs of a simulator run against itself: zero errors; the workload fits the model."""
    prof = s2r.profile_stub(s2r.Coefficients(base_ms=3.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                             prefill_ctx_ms=0.0, decode_ctx_ms=1e-4))
    wl = s2r.build_workload(30, 10.0, 1, parse_tiers(s2r.DEFAULT_TIERS))
    assert (wl.prompt_lens + wl.output_lens <= s2r.ENGINE["max_model_len"]).all()
    limits = {"max_batch_tokens": 256, "max_active_requests": 16, "max_decodes": 16, "kv_tokens": 65536}
    run = s2r.run_sim(wl, prof, limits)
    res = s2r.compare_runs(run, run)
    assert all(v == 0.0 for t in res["rel_error"].values() for v in t.values() if np.isfinite(v))


def test_ttft_by_prompt_length_shows_an_error_that_grows_with_the_prompt():
    """A real engine whose TTFT is the simulator's times (1 + prompt / 1,000): every request in
    exactly one length group, the groups in order, and each group's error the factor of its
    lengths (a wrong prefill slope), where a uniformly slower engine moves every group alike."""
    prof = s2r.profile_stub(s2r.Coefficients(base_ms=3.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                             prefill_ctx_ms=0.0, decode_ctx_ms=1e-4))
    wl = s2r.build_workload(80, 10.0, 3, parse_tiers(s2r.DEFAULT_TIERS))
    limits = {"max_batch_tokens": 256, "max_active_requests": 16, "max_decodes": 16, "kv_tokens": 65536}
    sim = s2r.run_sim(wl, prof, limits)
    real = dataclasses.replace(sim, ttft_s=sim.ttft_s * (1 + wl.prompt_lens / 1000))
    groups = s2r.ttft_by_prompt_len(real, sim)
    assert len(groups) == s2r.TTFT_LENGTH_GROUPS
    assert sum(g["count"] for g in groups) == len(wl)
    assert all(a["prompt_max"] < b["prompt_min"] for a, b in zip(groups, groups[1:]))
    errors = [g["rel_error"] for g in groups]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] - 0.1
    for g in groups:
        assert 1 / (1 + g["prompt_max"] / 1000) - 1 <= g["rel_error"] <= 1 / (1 + g["prompt_min"] / 1000) - 1
    slower = dataclasses.replace(sim, ttft_s=sim.ttft_s * 1.25)
    assert [round(g["rel_error"], 9) for g in s2r.ttft_by_prompt_len(slower, sim)] == [-0.2] * len(groups)
    assert "ttft_by_prompt_len" in s2r.compare_runs(real, sim)


def synthetic_run(true: s2r.EngineOverheads, profile: s2r.CostProfile, gaps_s=(0.01, 0.03, 0.1, 0.3, 1.0)):
    """A StepTrace as `run_real` records it, of an engine that costs exactly `profile`'s shapes
    plus `true`: per idle gap, an admission after it, ten decode steps, a busy admission (its
    request taken in while the engine ran) beside a decode and ten more decode steps."""
    tr = s2r.StepTrace()
    t, tail = 0.0, 0.0
    prefill, decode, mixed = (s2r.BatchShape(200, 40_000, 0, 0, 0), s2r.BatchShape(0, 0, 0, 1, 300),
                              s2r.BatchShape(120, 14_400, 0, 1, 320))

    def step(shape, chunks: int, idle_s: float, taken: int) -> None:
        nonlocal t, tail
        intake = taken * true.intake_ms / 1e3
        t += idle_s + intake
        extra, tail = true.iteration_s(0, chunks, idle_s, tail)  # (intake runs before the step)
        dur = profile.iteration_time_s(shape) + extra
        tr.starts.append(t)
        t += dur
        tr.ends.append(t)
        tr.shapes.append(shape)
        tr.num_prefill_chunks.append(chunks)
        tr.taken_in.append(taken)
        tr.intake_s.append(intake)

    for gap in gaps_s:
        step(prefill, 1, gap, 1)
        for _ in range(10):
            step(decode, 0, 0.0, 0)
        step(mixed, 1, 0.0, 1)
        for _ in range(10):
            step(decode, 0, 0.0, 0)
    return tr


def test_the_shape_fit_recovers_a_per_decode_cost_beside_the_per_token_one():
    """A grid like `fit`'s (decodes at a few contexts, one prompt beside them) priced by a profile
    whose decodes cost more than prefill tokens: the fit finds every term, the per-decode one too."""
    true = s2r.Coefficients(base_ms=1.5, per_token_ms=0.005, prefill_sq_ms=0.0, prefill_ctx_ms=6e-6,
                            decode_ctx_ms=1.2e-4, mixed_ms=0.25, per_decode_ms=0.03)
    priced = s2r.profile_stub(true)
    points = []
    for n in (0, 1, 2, 4, 8, 15):
        for c in (32, 256, 768):
            for prompt in (0, 16, 64, 192, 700):
                if n == 0 and prompt == 0:
                    continue
                shape = s2r.BatchShape(prompt, prompt * prompt, prompt * c // 2, n, n * c)
                ms = 1e3 * priced.iteration_time_s(shape)
                points.append(s2r.StepPoint(f"n{n} c{c} p{prompt}", 0, shape, ms, ms, ms, ms, 0.0))
    coef, rel_err = s2r.fit_points(points)
    assert dict(zip(s2r.COEFFICIENTS, coef)) == pytest.approx(true.model_dump(), rel=1e-3, abs=1e-9)
    assert np.abs(rel_err).max() < 1e-3


def test_fit_overheads_recovers_the_overheads_of_a_run_that_has_them():
    shape_model = s2r.profile_stub(s2r.Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                    prefill_ctx_ms=4e-6, decode_ctx_ms=1.5e-4, mixed_ms=0.3))
    true = s2r.EngineOverheads(intake_ms=0.6, prefill_chunk_ms=0.25, wake_ms_per_e_fold=0.9,
                               wake_after_idle_s=0.005, wake_tail_ratio=0.2)
    fitted = s2r.fit_overheads([synthetic_run(true, shape_model)], shape_model)
    assert fitted.intake_ms == pytest.approx(true.intake_ms, rel=1e-3)
    assert fitted.prefill_chunk_ms == pytest.approx(true.prefill_chunk_ms, rel=1e-3)
    assert fitted.wake_ms_per_e_fold == pytest.approx(true.wake_ms_per_e_fold, rel=1e-3)
    assert fitted.wake_after_idle_s == pytest.approx(true.wake_after_idle_s, rel=1e-2)
    assert fitted.wake_tail_ratio == pytest.approx(true.wake_tail_ratio, rel=2e-2)


def test_fit_overheads_of_a_run_without_them_finds_none():
    shape_model = s2r.profile_stub(s2r.Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                    prefill_ctx_ms=4e-6, decode_ctx_ms=1.5e-4))
    fitted = s2r.fit_overheads([synthetic_run(s2r.EngineOverheads(), shape_model)], shape_model)
    assert (fitted.intake_ms, fitted.prefill_chunk_ms, fitted.wake_ms_per_e_fold, fitted.wake_tail_ratio) == \
        pytest.approx((0, 0, 0, 0), abs=1e-9)


def test_the_step_prediction_includes_the_wake_and_its_tail():
    shape_model = s2r.profile_stub(s2r.Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                    prefill_ctx_ms=4e-6, decode_ctx_ms=1.5e-4, mixed_ms=0.3))
    true = s2r.EngineOverheads(intake_ms=0.6, prefill_chunk_ms=0.25, wake_ms_per_e_fold=0.9,
                               wake_after_idle_s=0.005, wake_tail_ratio=0.2)
    tr = synthetic_run(true, shape_model)
    with_true = shape_model.model_copy(update={"overheads": true})
    predicted = s2r.predicted_steps_s(with_true, tr)
    for j in range(9, len(tr.shapes)):  # (step 0 and its tail: the trace does not know the idle time before it)
        assert predicted[j] == pytest.approx(tr.ends[j] - tr.starts[j], abs=1e-8)


SATURATING = s2r.EngineOverheads(intake_ms=0.6, prefill_chunk_ms=0.25, wake_tail_ratio=0.2,
                                 wake_curve=((0.002, 0.0), (0.01, 1.0), (0.03, 1.4), (0.5, 1.5)))


def synthetic_probes(true: s2r.EngineOverheads, profile: s2r.CostProfile, idles_s) -> s2r.StepTrace:
    """A StepTrace as `run_wake_probes` records it, of an engine that costs exactly `profile`'s
    shapes plus `true`: per idle gap, one request taken in, its prefill step, two decode steps."""
    tr = s2r.StepTrace()
    t, tail = 0.0, 0.0
    for k, idle_s in enumerate(idles_s):
        for j, (shape, chunks) in enumerate(((s2r.BatchShape(150, 22_500, 0, 0, 0), 1),
                                             (s2r.BatchShape(0, 0, 0, 1, 150), 0), (s2r.BatchShape(0, 0, 0, 1, 151), 0))):
            taken = 1 if j == 0 else 0
            gap = idle_s if j == 0 else 0.0
            t += gap + taken * true.intake_ms / 1e3
            extra, tail = true.iteration_s(0, chunks, gap, tail)
            tr.starts.append(t)
            t += profile.iteration_time_s(shape) + extra
            tr.ends.append(t)
            tr.shapes.append(shape)
            tr.num_prefill_chunks.append(chunks)
            tr.taken_in.append(taken)
            tr.intake_s.append(taken * true.intake_ms / 1e3)
    return tr


def test_wake_probes_measure_a_saturating_wake():
    """The probes' idle gaps, log-spaced, give the wake as a curve: it follows a wake that rises
    over a few milliseconds of idle and then levels off, which a line in ln(idle) cannot."""
    shape_model = s2r.profile_stub(s2r.Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                    prefill_ctx_ms=4e-6, decode_ctx_ms=1.5e-4, mixed_ms=0.3))
    probes = synthetic_probes(SATURATING, shape_model, np.random.default_rng(0).permutation(np.geomspace(1e-3, 0.5, 96)))
    fitted = s2r.fit_overheads([synthetic_run(SATURATING, shape_model)], shape_model, [probes])
    assert fitted.wake_ms_per_e_fold == 0.0 and len(fitted.wake_curve) == s2r.WAKE_CURVE_BINS
    for idle_s in (0.004, 0.01, 0.02, 0.1, 0.4):
        assert fitted.wake_s(idle_s) == pytest.approx(SATURATING.wake_s(idle_s), rel=0.05, abs=2e-5)
    assert fitted.intake_ms == pytest.approx(0.6, rel=1e-3)
    assert fitted.prefill_chunk_ms == pytest.approx(0.25, rel=1e-3)
    assert fitted.wake_tail_ratio == pytest.approx(0.2, rel=0.05)
    assert "probes after set idle gaps" in fitted.source


def test_the_wake_curve_takes_medians_and_never_falls_with_longer_idle():
    idle = [0.001, 0.0012, 0.0014, 0.01, 0.011, 0.012, 0.1, 0.11, 0.12]
    excess = [-0.2, -0.1, -0.3, 1.0, 9.0, 1.4, 0.8, 0.9, 0.7]  # a spike, and a dip after the rise
    # medians -0.2, 1.4, 0.8: the dip pooled with the rise (1.1 each), the negative one clipped to 0
    assert s2r.wake_curve(idle, excess, bins=3) == ((0.0012, 0.0), (0.011, 1.1), (0.11, 1.1))
    assert s2r.wake_curve(idle[:2], excess[:2]) == ()


def test_non_decreasing_pools_the_values_that_fall():
    # 2.2, 2.0 pool to 2.1; 2.9, 1.4, 1.5 to 1.93, below 2.1: all five pool to their mean, 2.0
    assert s2r.non_decreasing([0.1, 2.2, 2.0, 2.9, 1.4, 1.5]) == pytest.approx([0.1, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert s2r.non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def test_the_step_prediction_counts_no_wake_across_the_driver_loops_own_gaps():
    """Back-to-back steps are a few microseconds apart (the driver loop), which the simulated
    engine's iterations are not: a wake with a tiny threshold must not reach them."""
    shape_model = s2r.profile_stub(s2r.Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                    prefill_ctx_ms=0.0, decode_ctx_ms=1.5e-4))
    tr = s2r.StepTrace()
    t = 0.0
    for _ in range(5):
        t += 15e-6
        tr.starts.append(t)
        t += 2e-3
        tr.ends.append(t)
        tr.shapes.append(s2r.BatchShape(0, 0, 0, 4, 400))
        tr.num_prefill_chunks.append(0)
        tr.taken_in.append(0)
        tr.intake_s.append(0.0)
    woken = shape_model.model_copy(update={"overheads": s2r.EngineOverheads(wake_ms_per_e_fold=0.05,
                                                                           wake_after_idle_s=1e-14)})
    assert s2r.predicted_steps_s(woken, tr) == s2r.predicted_steps_s(shape_model, tr)


class _FakeEngine:
    """Just what `run_wake_probes` drives: add a request, step it in three steps."""

    def __init__(self) -> None:
        self.left = 0
        self.added: list[tuple[str, float]] = []

    def add_request(self, rid, prompt, params, arrival_time):
        self.added.append((rid, time.perf_counter()))
        self.left = s2r.PROBE_OUTPUT_TOKENS

    def has_unfinished_requests(self) -> bool:
        return self.left > 0


class _FakeStepper:
    def __init__(self) -> None:
        self.eng = _FakeEngine()
        self.trace = s2r.StepTrace()

    def step(self):
        t0 = time.perf_counter()
        self.eng.left -= 1
        self.trace.starts.append(t0)
        self.trace.ends.append(time.perf_counter())
        self.trace.shapes.append(s2r.BatchShape(0, 0, 0, 1, 10))
        self.trace.num_prefill_chunks.append(0)
        return []


def test_wake_probes_run_one_request_at_a_time_after_each_set_idle_gap():
    st = _FakeStepper()
    tr = s2r.run_wake_probes(st, 6, (0.002, 0.02), seed=3)
    assert len(st.eng.added) == 6 and len(tr.starts) == 6 * s2r.PROBE_OUTPUT_TOKENS
    firsts = range(s2r.PROBE_OUTPUT_TOKENS, len(tr.starts), s2r.PROBE_OUTPUT_TOKENS)  # (probe 0: unknown)
    assert [tr.taken_in[j] for j in range(len(tr.starts))] == [1, 0, 0] * 6
    idle = [tr.idle_s(j) for j in firsts]
    wanted = np.random.default_rng(3).permutation(np.geomspace(0.002, 0.02, 6))[1:]
    assert all(w - 1e-4 <= i <= w + 0.01 for i, w in zip(idle, wanted))  # each gap as set (or a busy host's slack more)
    assert sorted(idle) != idle  # in a random order, not ascending


def test_theil_sen_ignores_a_few_spikes_that_least_squares_follows():
    x = np.linspace(-5.0, 0.0, 21)
    y = 0.8 * x + 3.0
    y[[16, 18, 20]] += 12.0  # single steps that spiked
    slope, icpt = s2r.theil_sen(x, y)
    assert slope == pytest.approx(0.8) and icpt == pytest.approx(3.0)
    assert abs(np.polyfit(x, y, 1)[0] - 0.8) > 0.1


@pytest.mark.parametrize("argv, message", [
    (["fit", "--train-qps", "4,x"], "expected comma-separated numbers, got '4,x'"),
    (["fit", "--train-qps", "4,0"], "expected positive numbers, got '4,0'"),
    (["fit", "--train-requests", "0"], "expected a number >= 1"),
    (["fit", "--wake-probes", "-1"], "expected a number >= 0"),
    (["fit", "--repeats", "0"], "expected a number >= 1, got 0"),
    (["compare", "--qps", "0"], "expected a number > 0, got '0'"),
    (["compare", "--requests", "0"], "expected a number >= 1, got 0"),
    (["compare", "--scale", "-0.1"], "expected a number > 0, got '-0.1'"),
    (["compare", "--repeats", "0"], "expected a number >= 1"),
])
def test_bad_rates_and_counts_are_refused_before_an_engine_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        s2r.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_decode_steps_are_counted_from_the_last_prefill_step_of_a_busy_engine():
    """The step check's post-prefill diagnostic: decode-only steps by their distance from the last
    step that ran prefill tokens; an idle gap or a step without a batch restarts the count."""
    prefill, decode = s2r.BatchShape(64, 64 * 64, 0, 0, 0), s2r.BatchShape(0, 0, 0, 2, 300)
    tr = s2r.StepTrace()
    t = 0.0
    # (shape, gap before it in s, its duration in s)
    for shape, gap, dur in ((prefill, 0.0, 0.003), (decode, 0.0, 0.003), (decode, 0.0, 0.002),
                            (decode, 0.05, 0.002),  # after idle: not counted
                            (prefill, 0.0, 0.003), (decode, 0.0, 0.004), (None, 0.0, 0.0), (decode, 0.0, 0.002)):
        t += gap
        tr.starts.append(t)
        t += dur
        tr.ends.append(t)
        tr.shapes.append(shape)
    groups = s2r.decode_steps_after_prefill(tr, [None if s is None else 0.002 for s in tr.shapes])
    assert groups == [{"steps_after": 1, "count": 2, "measured_over_predicted_p50": pytest.approx(1.75)},
                      {"steps_after": 2, "count": 1, "measured_over_predicted_p50": pytest.approx(1.0)}]
