"""A profile's engine overheads, its mixed-batch term and its per-decode term (measured for the CPU
engine only)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from replica.cost import BatchShape, available_profiles, load_profile
from replica.cost.profile import Coefficients, CostProfile, EngineOverheads, FitError, Provenance

SHAPES = [BatchShape(256, 256 * 256, 0, 0, 0), BatchShape(0, 0, 0, 8, 4000), BatchShape(100, 10_000, 5_000, 4, 900)]


def profile_with(mixed_ms: float = 0.0, overheads: EngineOverheads | None = None,
                 per_decode_ms: float = 0.0) -> CostProfile:
    return CostProfile(name="t", gpu="-", model="-", tile_tokens=16, overheads=overheads,
                       coefficients=Coefficients(base_ms=2.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                                 prefill_ctx_ms=4e-6, decode_ctx_ms=1.5e-4, mixed_ms=mixed_ms,
                                                 per_decode_ms=per_decode_ms),
                       provenance=Provenance(sources=["-"], fitted_to="-", tile_tokens_source="-",
                                             tile_padding_term="-",
                                             fit_error=FitError(num_points=1, mean_rel_error=0, max_rel_error=0)))


@pytest.mark.parametrize("name", available_profiles())
def test_gpu_profiles_have_no_overheads_and_no_cpu_engine_terms(name):
    p = load_profile(name)
    assert p.overheads is None
    assert p.coefficients.mixed_ms == 0.0 and p.coefficients.per_decode_ms == 0.0


def test_the_mixed_term_is_paid_only_by_a_batch_of_prefills_and_decodes():
    plain, mixed = profile_with(), profile_with(mixed_ms=0.4)
    prefill_only, decode_only, both = SHAPES
    assert mixed.iteration_time_s(prefill_only) == plain.iteration_time_s(prefill_only)
    assert mixed.iteration_time_s(decode_only) == plain.iteration_time_s(decode_only)
    assert mixed.iteration_time_s(both) == pytest.approx(plain.iteration_time_s(both) + 0.4e-3, abs=1e-12)


def test_the_mixed_term_leaves_decode_stretches_exact():
    p = profile_with(mixed_ms=0.4)
    times = p.decode_stretch_times_s(6, 3000, 5)
    assert times.tolist() == [p.iteration_time_s(BatchShape(0, 0, 0, 6, 3000 + 6 * j)) for j in range(5)]


def test_the_per_decode_term_is_paid_once_per_decode_and_by_nothing_else():
    plain, per_decode = profile_with(mixed_ms=0.4), profile_with(mixed_ms=0.4, per_decode_ms=0.03)
    prefill_only, decode_only, both = SHAPES
    assert per_decode.iteration_time_s(prefill_only) == plain.iteration_time_s(prefill_only)
    assert per_decode.iteration_time_s(decode_only) == pytest.approx(plain.iteration_time_s(decode_only) + 8 * 0.03e-3,
                                                                     abs=1e-12)
    assert per_decode.iteration_time_s(both) == pytest.approx(plain.iteration_time_s(both) + 4 * 0.03e-3, abs=1e-12)
    assert per_decode.iteration_time_s(BatchShape(0, 0, 0, 0, 0)) == 0.0


@pytest.mark.parametrize("mixed_ms", [0.0, 0.4])
def test_the_per_decode_term_leaves_decode_stretches_exact(mixed_ms):
    p = profile_with(mixed_ms=mixed_ms, per_decode_ms=0.031)
    times = p.decode_stretch_times_s(6, 3000, 5)
    each = [p.iteration_time_s(BatchShape(0, 0, 0, 6, 3000 + 6 * j)) for j in range(5)]
    assert times.tolist() == each
    ends, t = [], 1.5
    for d in each:
        t += d
        ends.append(t)
    assert p.decode_stretch_ends_s(6, 3000, 1.5, 5, float("inf")) == ends


def test_a_profile_without_the_per_decode_term_keeps_its_json():
    assert "per_decode_ms" not in profile_with(mixed_ms=0.4).model_dump()["coefficients"]
    assert profile_with(per_decode_ms=0.03).model_dump()["coefficients"]["per_decode_ms"] == 0.03


def test_intake_and_prefill_chunks_add_per_request_and_per_chunk():
    o = EngineOverheads(intake_ms=0.6, prefill_chunk_ms=0.3)
    assert o.iteration_s(0, 0, 0.0) == (0.0, 0.0)
    assert o.iteration_s(2, 0, 0.0)[0] == pytest.approx(1.2e-3)
    assert o.iteration_s(1, 3, 0.0)[0] == pytest.approx(1.5e-3)


def test_wake_is_nothing_below_its_idle_threshold_and_grows_per_e_fold_above():
    o = EngineOverheads(wake_ms_per_e_fold=0.8, wake_after_idle_s=0.005)
    assert o.wake_s(0.0) == 0.0 and o.wake_s(0.005) == 0.0
    assert o.wake_s(0.005 * math.e) == pytest.approx(0.8e-3)
    assert o.wake_s(0.005 * math.e ** 3) == pytest.approx(2.4e-3)
    assert o.iteration_s(0, 0, 0.005 * math.e)[0] == pytest.approx(0.8e-3)


def test_a_wake_leaves_its_tail_to_the_next_iterations():
    o = EngineOverheads(intake_ms=0.5, wake_ms_per_e_fold=0.8, wake_after_idle_s=0.005, wake_tail_ratio=0.25)
    extra, tail = o.iteration_s(1, 0, 0.005 * math.e)
    assert extra == pytest.approx(0.5e-3 + 0.8e-3) and tail == pytest.approx(0.2e-3)
    extra, tail = o.iteration_s(0, 0, 0.0, tail)  # busy: only the tail, and a quarter of it left
    assert extra == pytest.approx(0.2e-3) and tail == pytest.approx(0.05e-3)


def test_overheads_round_trip_through_the_profile_json(tmp_path):
    o = EngineOverheads(intake_ms=0.6, prefill_chunk_ms=0.3, wake_ms_per_e_fold=0.8, wake_after_idle_s=0.005,
                        wake_tail_ratio=0.2, source="test")
    p = profile_with(mixed_ms=0.4, overheads=o, per_decode_ms=0.03)
    path = tmp_path / "p.json"
    path.write_text(p.model_dump_json())
    q = load_profile(path)
    assert q.overheads == o and q.coefficients == p.coefficients
    assert q.iteration_time_s(SHAPES[2]) == p.iteration_time_s(SHAPES[2])


def test_a_measured_wake_curve_is_linear_in_log_idle_between_its_points_and_flat_beyond():
    o = EngineOverheads(wake_curve=((0.002, 0.0), (0.02, 1.0), (0.2, 1.5)))
    assert o.wake_s(0.0) == 0.0 and o.wake_s(0.0019) == 0.0 and o.wake_s(0.002) == 0.0
    assert o.wake_s(0.002 * math.sqrt(10)) == pytest.approx(0.5e-3)  # halfway in ln(idle)
    assert o.wake_s(0.02) == pytest.approx(1.0e-3)
    assert o.wake_s(0.2) == pytest.approx(1.5e-3) and o.wake_s(30.0) == pytest.approx(1.5e-3)


def test_the_curve_round_trips_and_a_profile_without_one_keeps_its_json(tmp_path):
    o = EngineOverheads(intake_ms=0.5, wake_curve=((0.001, 0.1), (0.05, 1.2)), wake_tail_ratio=0.2)
    path = tmp_path / "p.json"
    path.write_text(profile_with(overheads=o).model_dump_json())
    assert load_profile(path).overheads == o
    assert "wake_curve" not in EngineOverheads(wake_ms_per_e_fold=0.8).model_dump()


@pytest.mark.parametrize("bad", [{"wake_curve": ((0.01, 1.0), (0.005, 1.2))}, {"wake_curve": ((0.0, 1.0),)},
                                 {"wake_curve": ((0.01, -1.0),)},
                                 {"wake_curve": ((0.01, 1.0),), "wake_ms_per_e_fold": 0.5}])
def test_a_bad_wake_curve_is_refused(bad):
    with pytest.raises(ValidationError):
        EngineOverheads(**bad)


@pytest.mark.parametrize("bad", [{"intake_ms": -0.1}, {"wake_after_idle_s": 0.0}, {"wake_tail_ratio": 1.0},
                                 {"unknown_ms": 1.0}])
def test_bad_overheads_are_refused(bad):
    with pytest.raises(ValidationError):
        EngineOverheads(**bad)
