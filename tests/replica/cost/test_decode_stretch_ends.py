"""A decode stretch's end times (`CostProfile.decode_stretch_ends_s`): the engine fast-forwards
with them, so they must be the plain running sum of the per-iteration times, float for float,
whichever way (loop or numpy) a stretch's length picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replica.cost.profile import _LONG_STRETCH, available_profiles, load_profile
from replica.cost.shape import BatchShape


def _plain_ends(profile, num_decodes, sum_decode_ctx, start_s, max_iterations, until_s):
    """The definition: iteration j's time from its shape, added left to right, up to the first end
    at or after until_s."""
    ends, t = [], start_s
    for j in range(max_iterations):
        t += profile.iteration_time_s(BatchShape(0, 0, 0, num_decodes, sum_decode_ctx + j * num_decodes))
        ends.append(t)
        if t >= until_s:
            break
    return ends


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_stretch_ends_are_the_running_sum_of_iteration_times_short_and_long(name):
    profile = load_profile(name)
    rng = np.random.default_rng(len(name))
    lengths = [1, 2, _LONG_STRETCH - 1, _LONG_STRETCH, _LONG_STRETCH + 1, 500, 3000]
    for max_iterations in lengths:
        for _ in range(6):
            n = int(rng.integers(1, 128))
            ctx = int(rng.integers(n, n * 4000))
            start = float(rng.uniform(0, 1e5))
            step = profile.iteration_time_s(BatchShape(0, 0, 0, n, ctx))
            for until in (math.inf, start + step * float(rng.uniform(0.5, 2 * max_iterations)), start, start + step):
                got = profile.decode_stretch_ends_s(n, ctx, start, max_iterations, until)
                assert got == _plain_ends(profile, n, ctx, start, max_iterations, until), (max_iterations, until)
