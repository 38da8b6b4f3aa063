"""Request arrival times (seconds from the start of a run).

The paper (arXiv:2508.01002, "Evaluation") uses Poisson arrivals with each inter-arrival gap
capped at 3/QPS.  Capping trims the exponential tail, so the mean gap is
``(1 - exp(-max_gap_factor)) / qps`` (about 0.950/qps for the factor 3): the offered load is
about 5 % above the nominal ``qps``.  This module keeps the nominal parameterisation, as the
paper does; the effective rate is ``effective_qps(qps, max_gap_factor)``.

A day's load: ``diurnal_arrival_times`` draws a non-homogeneous Poisson process whose rate follows
a diurnal curve of ``[hour, qps]`` points (the planner's ``diurnal_qps``: linear between points,
wrapping at midnight; ``diurnal_rate``) scaled to a chosen peak.  Its gaps are not capped (a
cap at 3 / rate has no single rate to refer to); the count in any interval is Poisson with mean
the integral of the rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from replica.seeds import stream_rng

__all__ = ["burst_arrival_times", "diurnal_arrival_times", "diurnal_rate", "effective_qps", "poisson_arrival_times"]


def poisson_arrival_times(n: int, qps: float, seed: int | None, max_gap_factor: float = 3.0) -> np.ndarray:
    """``n`` arrival times in seconds, non-decreasing, float64; the first request arrives at 0.

    The ``n - 1`` gaps are exponential with mean ``1/qps``, each capped at
    ``max_gap_factor / qps`` (``math.inf`` for no cap).  The same ``seed`` gives the same times;
    they come from the seed's own "arrivals" stream (`replica.seeds`), independent of the tier
    draws and the trace shuffle made with the same seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (math.isfinite(qps) and qps > 0):
        raise ValueError(f"qps must be a finite number > 0, got {qps}")
    if not max_gap_factor > 0:
        raise ValueError(f"max_gap_factor must be > 0, got {max_gap_factor}")
    rng = stream_rng(seed, "arrivals")
    gaps_s = np.minimum(rng.exponential(1.0 / qps, size=max(n - 1, 0)), max_gap_factor / qps)
    return np.concatenate([np.zeros(min(n, 1)), np.cumsum(gaps_s)])


def effective_qps(qps: float, max_gap_factor: float = 3.0) -> float:
    """The mean arrival rate of ``poisson_arrival_times`` (capping shortens the mean gap)."""
    return qps / -math.expm1(-max_gap_factor)


def burst_arrival_times(n: int) -> np.ndarray:
    """``n`` requests all arriving at time 0 (for tests and saturation runs)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.zeros(n)


def wrapped_curve(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """The curve's knots over one wrapped day: the last point a day earlier in front, the first
    one a day later at the end (so that np.interp is linear across midnight)."""
    pts = sorted((float(h), float(q)) for h, q in points)
    if not pts:
        raise ValueError("a diurnal curve needs at least one [hour, qps] point")
    for h, q in pts:
        if not (0 <= h < 24 and math.isfinite(q) and q >= 0):
            raise ValueError(f"a curve point is [hour in [0, 24), qps >= 0], got [{h:g}, {q:g}]")
    hours = [pts[-1][0] - 24] + [h for h, _ in pts] + [pts[0][0] + 24]
    values = [pts[-1][1]] + [q for _, q in pts] + [pts[0][1]]
    return hours, values


def diurnal_rate(points: Sequence[tuple[float, float]], hours: np.ndarray | float) -> np.ndarray:
    """The curve's rate (QPS) at ``hours`` (any real hours: taken modulo 24), linear between
    the ``[hour, qps]`` points and wrapping at midnight (as `loadtest.plan.workload.hourly_qps`
    reads the planner's ``diurnal_qps``)."""
    hs, vs = wrapped_curve(points)
    return np.interp(np.mod(np.asarray(hours, dtype=np.float64), 24.0), hs, vs)


def diurnal_arrival_times(points: Sequence[tuple[float, float]], peak_qps: float, duration_s: float,
                          seed: int | None, start_hour: float = 0.0) -> np.ndarray:
    """Arrival times in seconds (from 0, sorted) over ``duration_s`` of a Poisson process whose
    rate at time t is the curve at hour ``start_hour + t / 3600``, scaled so that the curve's
    maximum is ``peak_qps``.  Drawn by thinning (Lewis and Shedler): candidates at the peak
    rate, each kept with probability rate(t) / peak, from the seed's "arrivals" stream."""
    if not (math.isfinite(peak_qps) and peak_qps > 0):
        raise ValueError(f"peak_qps must be a finite number > 0, got {peak_qps}")
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be finite and >= 0, got {duration_s}")
    top = max(wrapped_curve(points)[1])  # (validates the points first)
    if not top > 0:
        raise ValueError("the curve's peak must be > 0 QPS")
    rng = stream_rng(seed, "arrivals")
    count = rng.poisson(peak_qps * duration_s)
    t = np.sort(rng.uniform(0.0, duration_s, size=count))
    keep = rng.uniform(0.0, 1.0, size=count) * top < diurnal_rate(points, start_hour + t / 3600.0)
    return t[keep]
