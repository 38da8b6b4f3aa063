"""The cost-model contract: how long one engine iteration takes.

The simulated engine (`replica.sim.engine.SimEngine`) asks a `CostModel` for every iteration it
executes; the shipped implementation is `replica.cost.profile.CostProfile` (a fitted GPU + model
profile).  A test or a new model subclasses `CostModel` and implements `iteration_time_s`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from replica.cost.shape import BatchShape


class CostModel(ABC):
    @abstractmethod
    def iteration_time_s(self, shape: BatchShape) -> float:
        """Seconds one iteration of batch ``shape`` takes (contexts as before the iteration);
        0.0 for an empty batch."""

    def decode_stretch_times_s(self, num_decodes: int, sum_decode_ctx: int, num_iterations: int) -> np.ndarray:
        """Durations of ``num_iterations`` back-to-back decode-only iterations of the same
        ``num_decodes`` requests whose contexts sum to ``sum_decode_ctx`` in the first (each
        context grows by one token per iteration).  Element j must equal `iteration_time_s` of
        iteration j's shape exactly: the engine fast-forwards decode stretches with it.
        Default: one `iteration_time_s` call per iteration (override with a vectorised form)."""
        return np.array([self.iteration_time_s(BatchShape(0, 0, 0, num_decodes, sum_decode_ctx + j * num_decodes))
                         for j in range(num_iterations)], dtype=np.float64)

    def decode_stretch_ends_s(self, num_decodes: int, sum_decode_ctx: int, start_s: float, max_iterations: int,
                              until_s: float) -> list[float]:
        """End times of such a stretch started at ``start_s``: iteration j ends at ``start_s`` plus
        the durations of iterations 0..j (`decode_stretch_times_s`), added left to right; at most
        ``max_iterations`` of them, and none after the first that ends at or after ``until_s``.
        Default: from `decode_stretch_times_s` (a subclass may compute only the ends it returns,
        with the same floats)."""
        ends = np.cumsum(np.concatenate(([start_s], self.decode_stretch_times_s(num_decodes, sum_decode_ctx,
                                                                                max_iterations))))[1:]
        k = min(max_iterations, int(np.searchsorted(ends, until_s, side="left")) + 1)
        return ends[:k].tolist()
