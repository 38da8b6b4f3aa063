"""Arrival processes: capped Poisson arrivals as in the paper, and bursts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.arrivals import burst_arrival_times, effective_qps, poisson_arrival_times


@pytest.mark.parametrize("qps", [0.2, 1.0, 2.0, 50.0])
def test_mean_gap_matches_capped_exponential(qps: float) -> None:
    gaps_s = np.diff(poisson_arrival_times(200_001, qps, seed=0))
    expected_s = (1 - math.exp(-3.0)) / qps  # mean of min(Exp(mean 1/qps), 3/qps)
    assert gaps_s.mean() == pytest.approx(expected_s, rel=0.01)
    assert 1 / gaps_s.mean() == pytest.approx(effective_qps(qps), rel=0.01)


def test_uncapped_mean_gap_is_one_over_qps() -> None:
    gaps_s = np.diff(poisson_arrival_times(200_001, 2.0, seed=0, max_gap_factor=math.inf))
    assert gaps_s.mean() == pytest.approx(0.5, rel=0.01)
    assert effective_qps(2.0, math.inf) == 2.0


@pytest.mark.parametrize(("qps", "factor"), [(0.2, 3.0), (1.6, 3.0), (1.0, 1.0), (4.0, 0.5)])
def test_no_gap_above_cap_and_cap_is_reached(qps: float, factor: float) -> None:
    gaps_s = np.diff(poisson_arrival_times(50_000, qps, seed=1, max_gap_factor=factor))
    cap_s = factor / qps
    assert gaps_s.max() <= cap_s * (1 + 1e-9)  # cap on the gaps; diff of the cumsum rounds a little
    assert gaps_s.max() == pytest.approx(cap_s)  # the exponential tail is cut, not absent
    assert gaps_s.min() >= 0


def test_deterministic_per_seed() -> None:
    a = poisson_arrival_times(1000, 1.0, seed=42)
    np.testing.assert_array_equal(a, poisson_arrival_times(1000, 1.0, seed=42))
    assert not np.array_equal(a, poisson_arrival_times(1000, 1.0, seed=43))


def test_first_arrival_at_zero_and_sorted() -> None:
    times_s = poisson_arrival_times(100, 0.5, seed=3)
    assert times_s[0] == 0.0
    assert np.all(np.diff(times_s) >= 0)
    assert times_s.dtype == np.float64


@pytest.mark.parametrize("n", [0, 1, 2])
def test_small_n(n: int) -> None:
    assert len(poisson_arrival_times(n, 1.0, seed=0)) == n


@pytest.mark.parametrize(("n", "qps", "factor"), [
    (10, 0.0, 3.0), (10, -1.0, 3.0), (10, math.inf, 3.0), (10, math.nan, 3.0),
    (-1, 1.0, 3.0), (10, 1.0, 0.0), (10, 1.0, -2.0),
])
def test_invalid_arguments(n: int, qps: float, factor: float) -> None:
    with pytest.raises(ValueError):
        poisson_arrival_times(n, qps, seed=0, max_gap_factor=factor)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 500), qps=st.floats(0.01, 100.0), seed=st.integers(0, 2**32 - 1),
       factor=st.floats(0.1, 10.0))
def test_properties(n: int, qps: float, seed: int, factor: float) -> None:
    times_s = poisson_arrival_times(n, qps, seed, max_gap_factor=factor)
    assert len(times_s) == n
    if n:
        assert times_s[0] == 0.0
        gaps_s = np.diff(times_s)
        assert np.all(gaps_s >= 0) and np.all(gaps_s <= factor / qps * (1 + 1e-9))


def test_burst() -> None:
    np.testing.assert_array_equal(burst_arrival_times(4), np.zeros(4))
    assert len(burst_arrival_times(0)) == 0
    with pytest.raises(ValueError):
        burst_arrival_times(-1)
