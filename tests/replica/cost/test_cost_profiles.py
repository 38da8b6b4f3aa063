"""Cost profiles: calibration targets, loading, validation and the shape of the time function."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replica.cost import BatchShape, CostProfile, available_profiles, load_profile
from replica.cost.profile import PROFILES_DIR

DATA_DIR = Path(__file__).resolve().parents[3] / "replica" / "cost" / "data"
PROFILE_NAMES = ["a100-mistral7b", "h100-mistral7b", "h100-mistral7b-measured", "rtx6000ada-mistral7b"]

# Paper (arXiv:2508.01002) token-budget sweep on the RTX 6000 Ada: 2048-token prompts alone.
PAPER_SWEEP_MEAN_ITER_MS = {64: 22.7, 128: 24.1, 256: 28.8, 384: 37.8, 512: 46.5, 768: 57.1, 1024: 74.7}

# Mean relative error over all Vidur rows, as measured by `python -m loadtest.calibrate`
# (a100 5.12 %, h100 4.98 %; max 14.2 % and 23.5 %), with a little headroom.
VIDUR_MEAN_REL_ERROR_BOUND = {"a100": 0.055, "h100": 0.055}
VIDUR_MAX_REL_ERROR_BOUND = {"a100": 0.15, "h100": 0.25}


def mean_chunk_time_ms(profile: CostProfile, prompt_tokens: int, budget: int) -> float:
    times = []
    for done in range(0, prompt_tokens, budget):
        chunk = min(budget, prompt_tokens - done)
        times.append(profile.iteration_time_s(BatchShape.of(prefill_chunks=[(chunk, done)])))
    return 1000.0 * sum(times) / len(times)


@pytest.mark.parametrize("budget", sorted(PAPER_SWEEP_MEAN_ITER_MS))
def test_rtx_profile_reproduces_paper_sweep_within_10_percent(budget: int) -> None:
    profile = load_profile("rtx6000ada-mistral7b")
    measured_ms = PAPER_SWEEP_MEAN_ITER_MS[budget]
    assert mean_chunk_time_ms(profile, 2048, budget) == pytest.approx(measured_ms, rel=0.10)


def test_rtx_decode_coefficient_is_a100_scaled_by_bandwidth() -> None:
    a100 = load_profile("a100-mistral7b").coefficients.decode_ctx_ms
    rtx = load_profile("rtx6000ada-mistral7b").coefficients.decode_ctx_ms
    assert rtx == pytest.approx(a100 * 1935.0 / 960.0, rel=1e-5)


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_vidur_profiles_fit_their_tables(gpu: str) -> None:
    profile = load_profile(f"{gpu}-mistral7b")
    with open(DATA_DIR / f"vidur_mistral7b_{gpu}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 135
    errors = []
    for r in rows:
        p, n = int(r["prefill_tokens"]), int(r["num_decodes"])
        shape = BatchShape.of(
            prefill_chunks=[(p, int(r["prefill_ctx"]))] if p else [],
            decode_ctxs=[int(r["decode_ctx"])] * n,
        )
        errors.append(abs(1000.0 * profile.iteration_time_s(shape) / float(r["iter_ms"]) - 1.0))
    assert sum(errors) / len(errors) < VIDUR_MEAN_REL_ERROR_BOUND[gpu]
    assert max(errors) < VIDUR_MAX_REL_ERROR_BOUND[gpu]
    assert profile.provenance.fit_error.mean_rel_error == pytest.approx(sum(errors) / len(errors), rel=1e-4)


def test_available_profiles() -> None:
    assert available_profiles() == PROFILE_NAMES


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_load_by_name_and_by_path_agree(name: str) -> None:
    by_name = load_profile(name)
    path = PROFILES_DIR / f"{name}.json"
    assert load_profile(path) == by_name
    assert load_profile(str(path)) == by_name
    assert by_name.name == name
    assert by_name.tile_tokens == 128
    assert by_name.provenance.sources and by_name.provenance.fit_error.num_points > 0


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="available"):
        load_profile("tpu-mistral7b")


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=str(path)):
        load_profile(path)


@pytest.fixture
def good_profile_dict() -> dict:
    return json.loads((PROFILES_DIR / "a100-mistral7b.json").read_text())


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "custom.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def test_copied_profile_loads_by_path(tmp_path: Path, good_profile_dict: dict) -> None:
    assert load_profile(_write(tmp_path, good_profile_dict)) == load_profile("a100-mistral7b")


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '{\n  "name": "x",\n  "gpu": oops\n}\n')
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_missing_field_names_file_and_field(tmp_path: Path, good_profile_dict: dict) -> None:
    del good_profile_dict["coefficients"]["decode_ctx_ms"]
    path = _write(tmp_path, good_profile_dict)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert "coefficients.decode_ctx_ms" in str(info.value)


def test_unknown_field_names_file_and_field(tmp_path: Path, good_profile_dict: dict) -> None:
    good_profile_dict["tile_padding"] = True
    path = _write(tmp_path, good_profile_dict)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert "tile_padding" in str(info.value)


@pytest.mark.parametrize("field", ["base_ms", "per_token_ms", "prefill_sq_ms", "prefill_ctx_ms", "decode_ctx_ms"])
def test_negative_coefficient_names_file_and_field(tmp_path: Path, good_profile_dict: dict, field: str) -> None:
    good_profile_dict["coefficients"][field] = -1e-6
    path = _write(tmp_path, good_profile_dict)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert f"coefficients.{field}" in str(info.value)


def test_non_positive_tile_is_rejected(tmp_path: Path, good_profile_dict: dict) -> None:
    good_profile_dict["tile_tokens"] = 0
    with pytest.raises(ValueError, match="tile_tokens"):
        load_profile(_write(tmp_path, good_profile_dict))


def test_name_must_match_file_when_loading_by_name(tmp_path: Path, monkeypatch, good_profile_dict) -> None:
    for name in PROFILE_NAMES:
        shutil.copy(PROFILES_DIR / f"{name}.json", tmp_path)
    (tmp_path / "a100-mistral7b.json").write_text(json.dumps({**good_profile_dict, "name": "other"}))
    monkeypatch.setattr("replica.cost.profile.PROFILES_DIR", tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        load_profile("a100-mistral7b")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_zero_batch_costs_nothing(name: str) -> None:
    assert load_profile(name).iteration_time_s(BatchShape()) == 0.0


_counts = st.integers(min_value=0, max_value=1 << 22)
_FIELDS = ("num_prefill_tokens", "sum_prefill_sq", "sum_prefill_ctx", "num_decodes", "sum_decode_ctx")


@pytest.mark.parametrize("name", PROFILE_NAMES)
@settings(max_examples=300, deadline=None)
@given(values=st.tuples(*[_counts] * 5), which=st.sampled_from(_FIELDS), extra=st.integers(1, 1 << 20))
def test_time_is_monotone_in_each_component(name: str, values: tuple, which: str, extra: int) -> None:
    profile = load_profile(name)
    shape = BatchShape(*values)
    bigger = BatchShape(**{**{f: getattr(shape, f) for f in _FIELDS}, which: getattr(shape, which) + extra})
    assert profile.iteration_time_s(bigger) >= profile.iteration_time_s(shape) >= 0.0


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_time_matches_formula_and_survives_copy_and_pickle(name: str) -> None:
    profile = load_profile(name)
    c = profile.coefficients
    shape = BatchShape.of(prefill_chunks=[(300, 1000), (40, 0)], decode_ctxs=[500, 1500, 7])
    expected_ms = (
        c.base_ms
        + c.per_token_ms * 343
        + c.prefill_sq_ms * (300**2 + 40**2)
        + c.prefill_ctx_ms * 300 * 1000
        + c.decode_ctx_ms * 2007
    )
    assert profile.iteration_time_s(shape) == pytest.approx(expected_ms / 1000.0, rel=1e-12)
    assert type(profile.iteration_time_s(shape)) is float
    assert pickle.loads(pickle.dumps(profile)).iteration_time_s(shape) == profile.iteration_time_s(shape)
    doubled = profile.model_copy(update={"coefficients": c.model_copy(update={"base_ms": 2 * c.base_ms})})
    assert doubled.iteration_time_s(shape) == pytest.approx(profile.iteration_time_s(shape) + c.base_ms / 1000.0)
