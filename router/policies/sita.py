"""SITA (size-interval task assignment): route by prompt length, each replica group owning one
interval of prompt lengths that carries an equal share of the work.

Rule:

* K - 1 non-decreasing thresholds t_0 <= ... <= t_{K-2} (prompt lengths, tokens) split prompt
  lengths into K intervals: interval i holds prompt_len in (t_{i-1}, t_i] (t_{-1} = -inf,
  t_{K-1} = +inf), i.e. i = the number of thresholds below prompt_len.
* The thresholds are either given (`thresholds`, K = len + 1) or derived from a trace
  (`trace`: "paper", the default, or a CSV path; see `replica.traces.load_trace`) so that each
  interval carries 1/K of the trace's work, where the work of a request is
  prompt_len + output_len tokens (the token slots of batch budget it takes: one per prompt token
  and one per decode step); see `equal_work_thresholds`. K = `num_intervals`, or by default the
  current number of replicas R; derived thresholds are cached per K (so per R by default).
* The R candidate replicas are sorted by replica id (a stable assignment) and split into K
  contiguous groups: interval i owns replicas [floor(i*R/K), max(floor((i+1)*R/K), floor(i*R/K)+1)),
  so with R >= K the groups partition the replicas (sizes differ by at most one) and with R < K
  neighbouring intervals share a replica.
* Ranking: the request's group first, by queue length (`base.queue_length`: snapshot waiting +
  running + ledger entries), then every other replica by queue length, so the caller can fall
  back; ties: fewer ledger entries, then replica id.

Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from replica.traces import load_trace
from router.feedback import ReplicaView
from router.policies.base import RoutingPolicy, RoutingRequest, queue_length


def equal_work_thresholds(prompt_lens: Sequence[int] | np.ndarray, work: Sequence[float] | np.ndarray,
                          k: int) -> list[int]:
    """K - 1 non-decreasing prompt-length thresholds (tokens) splitting the requests into K
    intervals ((t_{i-1}, t_i], as in the module rule) of about equal total `work`.

    Requests of one prompt length always fall in the same interval, so thresholds are prompt
    lengths of the sample: threshold j (j = 1..K-1) is the length whose cumulative work (of all
    requests no longer than it) is closest to j/K of the total (the shorter one on a tie). Each
    interval's work is thus within the largest single prompt length's work of 1/K of the total.
    A length that carries more than 1/K of the work may repeat a threshold (an empty interval).
    """
    p = np.asarray(prompt_lens)
    w = np.asarray(work, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if p.ndim != 1 or w.shape != p.shape:
        raise ValueError(f"prompt_lens and work must be 1-D of equal length, got {p.shape} and {w.shape}")
    if p.size == 0:
        raise ValueError("no requests to derive thresholds from")
    if not np.issubdtype(p.dtype, np.integer) or p.min() < 0:
        raise ValueError("prompt_lens must be non-negative integers")
    if not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError("work must be finite, non-negative and not all zero")
    if k == 1:
        return []
    lens, inverse = np.unique(p, return_inverse=True)
    cum = np.cumsum(np.bincount(inverse, weights=w))  # cum[j]: work of the requests <= lens[j]
    targets = cum[-1] * np.arange(1, k) / k
    above = np.searchsorted(cum, targets, side="left")  # first cum >= target (always < len(cum))
    below = np.maximum(above - 1, 0)
    closer_below = (above > 0) & (targets - cum[below] <= cum[above] - targets)
    idx = np.maximum.accumulate(np.where(closer_below, below, above))
    return [int(x) for x in lens[idx]]


def interval_of(prompt_len: int, thresholds: Sequence[int]) -> int:
    """Index of the interval holding `prompt_len`: the number of thresholds below it."""
    return bisect_left(thresholds, prompt_len)


def group_bounds(interval: int, num_intervals: int, num_replicas: int) -> tuple[int, int]:
    """[lo, hi) of the replicas (sorted by id) that `interval` owns."""
    lo = interval * num_replicas // num_intervals
    hi = max((interval + 1) * num_replicas // num_intervals, lo + 1)
    return lo, hi


class SITAPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: tuple[int, ...] | None = Field(
        None, description="prompt-length thresholds (tokens), non-decreasing; None: derive from `trace`")
    trace: str = Field("paper", min_length=1, description="trace name or CSV path the thresholds are derived from")
    num_intervals: int | None = Field(
        None, gt=0, description="K for derived thresholds (None: the number of replicas)")

    @model_validator(mode="after")
    def _check(self) -> SITAPolicyConfig:
        t = self.thresholds
        if t is not None:
            if self.num_intervals is not None:
                raise ValueError("give thresholds or num_intervals, not both (K = len(thresholds) + 1)")
            if any(x < 0 for x in t) or any(b < a for a, b in zip(t, t[1:])):
                raise ValueError(f"thresholds must be non-negative and non-decreasing, got {list(t)}")
        return self


class SITAPolicy(RoutingPolicy):
    name = "sita"

    def __init__(self, config: SITAPolicyConfig | None = None, **overrides) -> None:
        if config is None:
            config = SITAPolicyConfig(**overrides)
        elif overrides:
            config = SITAPolicyConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self._cache: dict[int, tuple[int, ...]] = {}
        self._prompt_lens: np.ndarray | None = None
        self._work: np.ndarray | None = None
        if config.thresholds is None:
            trace = load_trace(config.trace)
            self._prompt_lens = trace.prompt_lens
            self._work = trace.prompt_lens + trace.output_lens

    def thresholds_for(self, num_replicas: int) -> tuple[int, ...]:
        """The thresholds used with `num_replicas` candidate replicas (given, or derived for
        K = num_intervals or num_replicas, cached per K)."""
        if self.config.thresholds is not None:
            return self.config.thresholds
        k = self.config.num_intervals or max(num_replicas, 1)
        cached = self._cache.get(k)
        if cached is None:
            cached = self._cache[k] = tuple(equal_work_thresholds(self._prompt_lens, self._work, k))
        return cached

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        ordered = sorted(replicas, key=lambda v: v.replica_id)
        thresholds = self.thresholds_for(len(ordered))
        lo, hi = group_bounds(interval_of(request.prompt_len, thresholds), len(thresholds) + 1, len(ordered))

        def key(v: ReplicaView) -> tuple[int, int, str]:
            return queue_length(v), len(v.in_flight), v.replica_id

        group = sorted(ordered[lo:hi], key=key)
        rest = sorted(ordered[:lo] + ordered[hi:], key=key)
        return [v.replica_id for v in group + rest]
