"""The summary's weighted P99 TBT (`loadtest.metrics._weighted_count_quantile`) is numpy's
inverted-CDF weighted quantile, bit for bit, on gaps with ties and whole-number weights."""

import numpy as np
import pytest

from loadtest.metrics import _weighted_count_quantile


def _reference(x: np.ndarray, q: float, w: np.ndarray) -> float:
    return float(np.quantile(x, q, weights=w, method="inverted_cdf"))


def _cases(seed: int):
    rng = np.random.default_rng(seed)
    for trial in range(400):
        n = int(rng.integers(1, 400))
        x = rng.integers(0, int(rng.integers(1, 60)), n).astype(float) * 0.013  # many ties
        kind = trial % 4
        if kind == 0:  # unit weights only (steady iterations)
            w = np.ones(n)
        elif kind == 1:  # a few fast-forwarded stretches
            w = np.where(rng.random(n) < 0.05, rng.integers(2, 9, n), 1).astype(float)
        elif kind == 2:  # mostly stretches (light load)
            w = np.where(rng.random(n) < 0.9, rng.integers(2, 500, n), 1).astype(float)
        else:  # only stretches
            w = rng.integers(2, 100, n).astype(float)
        yield x, w


@pytest.mark.parametrize("q", [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_it_is_numpys_inverted_cdf_quantile(q):
    for x, w in _cases(int(q * 1000)):
        assert _weighted_count_quantile(x, q, w) == _reference(x, q, w)


def test_it_handles_a_large_sample_and_leaves_the_input_unchanged():
    rng = np.random.default_rng(1)
    x = rng.random(200_000).round(3)
    w = np.ones(len(x))
    w[-500:] = rng.integers(2, 50, 500)
    x0, w0 = x.copy(), w.copy()
    for q in (0.5, 0.99):
        assert _weighted_count_quantile(x, q, w) == _reference(x, q, w)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


@pytest.mark.parametrize("bad", ["nan", "fractional", "zero"])
def test_it_declines_what_it_cannot_answer_exactly(bad):
    x = np.array([0.1, 0.2, 0.3])
    w = np.array([1.0, 2.0, 1.0])
    if bad == "nan":
        x[1] = np.nan
    elif bad == "fractional":
        w[1] = 1.5
    else:
        w[1] = 0.0
    assert _weighted_count_quantile(x, 0.99, w) is None
