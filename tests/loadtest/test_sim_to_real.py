"""loadtest.sim_to_real without vLLM: the workload and the simulator side of the comparison
(the engine side: tests/replica/vllm/test_sim_to_real_vllm.py)."""

from __future__ import annotations

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


def test_theil_sen_ignores_a_few_spikes_that_least_squares_follows():
    x = np.linspace(-5.0, 0.0, 21)
    y = 0.8 * x + 3.0
    y[[16, 18, 20]] += 12.0  # single steps that spiked
    slope, icpt = s2r.theil_sen(x, y)
    assert slope == pytest.approx(0.8) and icpt == pytest.approx(3.0)
    assert abs(np.polyfit(x, y, 1)[0] - 0.8) > 0.1


@pytest.mark.parametrize("args, message", [
    (["--train-qps", "4,x"], "expected comma-separated rates"),
    (["--train-qps", "4,0"], "expected rates > 0"),
    (["--train-requests", "0"], "expected a number >= 1"),
])
def test_fit_refuses_bad_training_runs_before_starting_an_engine(args, message, capsys):
    from loadtest.sim_to_real import main

    with pytest.raises(SystemExit) as e:
        main(["fit", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
