"""The diurnal arrival generator (loadtest.arrivals): a non-homogeneous Poisson process on the
planner's [hour, qps] curve."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.arrivals import diurnal_arrival_times, diurnal_rate

CURVE = [(0, 5.0), (6, 2.5), (9, 12.0), (12, 20.0), (17, 17.0), (21, 10.0)]  # chat-diurnal's shape


@pytest.mark.parametrize(("hour", "qps"), [
    (0, 5.0), (6, 2.5), (12, 20.0), (21, 10.0),  # at the points
    (3, 3.75), (10.5, 16.0), (19, 13.5),  # linear in between
    (22.5, 7.5), (24, 5.0), (-1.5, 7.5), (30, 2.5),  # wrapping at midnight, any hour
])
def test_the_rate_is_linear_between_points_and_wraps_at_midnight(hour, qps):
    assert float(diurnal_rate(CURVE, hour)) == pytest.approx(qps)


def test_the_counts_per_hour_follow_the_curve_within_poisson_tolerance():
    peak = 2.0  # the curve scaled to a peak of 2 QPS
    t = diurnal_arrival_times(CURVE, peak, 86_400.0, seed=7)
    assert (np.diff(t) >= 0).all() and t[0] >= 0 and t[-1] < 86_400.0
    counts = np.bincount((t // 3600).astype(int), minlength=24)
    for h in range(24):
        grid = np.linspace(h, h + 1, 601)
        expected = np.trapezoid(diurnal_rate(CURVE, grid), grid) * 3600 * peak / 20.0
        assert abs(counts[h] - expected) <= 4 * np.sqrt(expected), (h, counts[h], expected)
    assert counts[12] / counts[6] > 4  # the peak hour vs the trough's


def test_start_hour_shifts_the_curve():
    t = diurnal_arrival_times(CURVE, 4.0, 3600.0, seed=1, start_hour=12)  # one hour from noon
    expected = np.trapezoid(diurnal_rate(CURVE, np.linspace(12, 13, 601)), np.linspace(12, 13, 601)) * 3600 / 5
    assert abs(len(t) - expected) <= 4 * np.sqrt(expected)


def test_the_same_seed_gives_the_same_arrivals_and_another_seed_others():
    a = diurnal_arrival_times(CURVE, 1.0, 7200.0, seed=3)
    np.testing.assert_array_equal(a, diurnal_arrival_times(CURVE, 1.0, 7200.0, seed=3))
    assert not np.array_equal(a, diurnal_arrival_times(CURVE, 1.0, 7200.0, seed=4))


@pytest.mark.parametrize(("curve", "peak", "duration"), [
    ([], 1.0, 10.0), ([(0, 0.0)], 1.0, 10.0), ([(25, 1.0)], 1.0, 10.0), (CURVE, 0.0, 10.0), (CURVE, 1.0, -1.0),
])
def test_bad_input_is_refused(curve, peak, duration):
    with pytest.raises(ValueError):
        diurnal_arrival_times(curve, peak, duration, seed=0)
