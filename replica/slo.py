"""Per-tier SLO tracking and the replica's feedback snapshot (pure: no vLLM, no Ray).

Both mechanisms feed it: the vLLM scheduler adapter (on time.perf_counter, the policy's clock)
and the simulated engine (its virtual or wall clock). It keeps, per tier, the TTFTs and TBT gaps
of a sliding time window and counts SLO misses, and it builds the small, versioned snapshot a
replica reports to the routers: what is queued (prefill tokens and their prompt-length histogram), decodes running per tier, KV use,
mean batch time, per-tier TTFT/TBT quantiles and misses over the window.
"""

from __future__ import annotations

import bisect
import math
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from replica.policy.state import EngineState, Request

SNAPSHOT_VERSION = 1
PROMPT_HISTOGRAM_EDGES = (0, 512, 1024, 2048, 4096, 8192)


class WindowDistribution(NamedTuple):
    """A window's samples as their distinct values, ascending, and the running count of samples
    up to each (`cum_counts[-1]` samples in all).  Gaps repeat a lot (every decode of a step
    that ran in the same earlier step has the same gap), so this is far smaller than the window.
    The statistics are numpy's on the samples, to the last bit."""

    values: np.ndarray
    cum_counts: np.ndarray

    def __len__(self) -> int:
        return int(self.cum_counts[-1]) if len(self.cum_counts) else 0

    def order_stat(self, i: int) -> float:
        """The i-th smallest sample (from 0)."""
        return float(self.values[np.searchsorted(self.cum_counts, i, side="right")])

    def median(self) -> float:
        """`np.median` of the samples: the middle one, or the mean of the two middle ones."""
        n = len(self)
        m = n // 2
        return self.order_stat(m) if n % 2 else (self.order_stat(m - 1) + self.order_stat(m)) / 2

    def quantile(self, q: float) -> float:
        """`np.quantile(samples, q)` (its default, linear method): the same virtual index,
        neighbours and interpolation (numpy's `_lerp`, which interpolates from the upper
        neighbour when the weight is >= 0.5)."""
        n = len(self)
        virtual = (n - 1) * q
        lo = math.floor(virtual)
        a, b = self.order_stat(lo), self.order_stat(min(lo + 1, n - 1))
        gamma = virtual - lo
        diff = b - a
        return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma

    def count_above(self, x: float) -> int:
        """Samples greater than `x`."""
        k = int(np.searchsorted(self.values, x, side="right"))
        return len(self) - (int(self.cum_counts[k - 1]) if k else 0)

    def samples(self) -> np.ndarray:
        """Every sample, ascending (for checks; the statistics above do not build it)."""
        return np.repeat(self.values, np.diff(self.cum_counts, prepend=0))


class _Series:
    """(time, value) samples in time order, trimmed from the front: times and values in flat
    float arrays with a start offset.  The window's distinct values and their counts are kept
    between reads (`distribution`), so a snapshot's statistics are lookups."""

    __slots__ = ("times", "values", "start", "dropped", "_values", "_counts", "_lo", "_hi")

    def __init__(self) -> None:
        self.times = array("d")
        self.values = array("d")
        self.start = 0
        self.dropped = 0  # samples deleted from the front (trimmed out of the window long ago)
        # the distinct values (ascending) and counts of samples _lo .. _hi - 1, numbered from the
        # first ever appended; _values None: not built
        self._values: np.ndarray | None = None
        self._counts = np.zeros(0, dtype=np.int64)
        self._lo = self._hi = 0

    def append(self, t: float, value: float) -> None:
        self.times.append(t)
        self.values.append(value)

    def trim(self, horizon: float) -> None:
        self.start = bisect.bisect_left(self.times, horizon, lo=self.start)
        if self.start > 4096 and 2 * self.start > len(self.times):
            self._drop_samples_before(self.dropped + self.start)  # while their values are here
            del self.times[: self.start]
            del self.values[: self.start]
            self.dropped += self.start
            self.start = 0

    @property
    def total(self) -> int:
        """Samples ever appended (the window's and those trimmed out of it)."""
        return self.dropped + len(self.times)

    def window(self) -> np.ndarray:
        return np.array(self.values[self.start:], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.times) - self.start

    def _samples(self, lo: int, hi: int) -> np.ndarray:
        """The values of samples lo .. hi - 1 (numbered from the first ever appended)."""
        return np.array(self.values[lo - self.dropped:hi - self.dropped], dtype=np.float64)

    def distribution(self) -> WindowDistribution:
        """The window's samples (`WindowDistribution`), updated from the last call: the samples
        that left the window taken out of the counts, those that joined it counted in."""
        lo, hi = self.dropped + self.start, self.total
        self._drop_samples_before(lo)
        if self._values is None:
            self._values, self._counts = np.unique(self.window(), return_counts=True)
        elif hi > self._hi:
            new, counts = np.unique(self._samples(self._hi, hi), return_counts=True)
            values = self._values
            at = np.searchsorted(values, new)
            known = at < len(values)
            known[known] = values[at[known]] == new[known]
            self._counts[at[known]] += counts[known]
            if not known.all():
                fresh = ~known
                self._values = np.insert(values, at[fresh], new[fresh])
                self._counts = np.insert(self._counts, at[fresh], counts[fresh])
        self._lo, self._hi = lo, hi
        return WindowDistribution(self._values, np.cumsum(self._counts))

    def _drop_samples_before(self, lo: int) -> None:
        """Take the samples numbered before `lo` (out of the window now) out of the counts."""
        if self._values is None or lo <= self._lo:
            return
        if lo >= self._hi:
            self._values = None
            return
        gone, counts = np.unique(self._samples(self._lo, lo), return_counts=True)
        at = np.searchsorted(self._values, gone)  # each is there: it was counted in
        self._counts[at] -= counts
        if not self._counts[at].all():
            keep = self._counts > 0
            self._values, self._counts = self._values[keep], self._counts[keep]
        self._lo = lo


@dataclass
class _TierWindow:
    ttft: _Series = field(default_factory=_Series)
    tbt: _Series = field(default_factory=_Series)
    ttft_misses: int = 0
    tbt_misses: int = 0

    @property
    def tokens(self) -> int:
        """Tokens ever recorded: each is one sample, a TTFT (a request's first) or a TBT gap."""
        return self.ttft.total + self.tbt.total


class SLOTracker:
    def __init__(self, tbt_slo_s: dict[str, float], ttft_target_s: dict[str, float] | None = None,
                 window_s: float = 60.0) -> None:
        self.tbt_slo_s = dict(tbt_slo_s)
        self.ttft_target_s = dict(ttft_target_s or {})
        self.window_s = window_s
        self.tiers: dict[str, _TierWindow] = {name: _TierWindow() for name in self.tbt_slo_s}

    def _tier(self, r: Request) -> _TierWindow:
        """The window of ``r``'s tier; a tier first seen in a request is tracked from then on, with
        the TBT SLO and TTFT target the request carries (each request carries its tier's facts)."""
        w = self.tiers.get(r.tier)
        if w is None:
            w = self.tiers[r.tier] = _TierWindow()
            self.tbt_slo_s.setdefault(r.tier, r.tbt_slo_s)
            self.ttft_target_s.setdefault(r.tier, r.ttft_target_s)
        return w

    def on_tokens(self, reqs: Iterable[Request], t: float) -> None:
        """Each request emitted a token at `t`; call before updating `last_token_s`."""
        tiers = self.tiers
        for r in reqs:
            w = tiers.get(r.tier) or self._tier(r)
            last = r.last_token_s
            if last is None:
                self._first_token(w, r, t)
            else:
                gap = t - last
                s = w.tbt
                s.times.append(t)
                s.values.append(gap)
                if gap > r.tbt_slo_s:
                    w.tbt_misses += 1

    def record_tokens(self, reqs: Iterable[Request], t: float) -> None:
        """`on_tokens`, then what the mechanism does after it, in the same pass: each request's
        `last_token_s` becomes `t`, and its `first_token_s` too if it had none.  Each request
        appears at most once in `reqs` (one token per request and step)."""
        tiers = self.tiers
        tier = None
        for r in reqs:
            last = r.last_token_s
            r.last_token_s = t
            if r.tier is not tier:  # the window of this run of same-tier requests (usually whole tiers)
                tier = r.tier
                w = tiers.get(tier) or self._tier(r)
                add_time, add_gap = w.tbt.times.append, w.tbt.values.append
            if last is None:
                if r.first_token_s is None:
                    r.first_token_s = t
                self._first_token(w, r, t)
            else:
                gap = t - last
                add_time(t)
                add_gap(gap)
                if gap > r.tbt_slo_s:
                    w.tbt_misses += 1

    def _first_token(self, w: _TierWindow, r: Request, t: float) -> None:
        ttft = t - r.arrival_s
        w.ttft.append(t, ttft)
        target = self.ttft_target_s.get(r.tier)
        if target is not None and ttft > target:
            w.ttft_misses += 1

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        for w in self.tiers.values():
            w.ttft.trim(horizon)
            w.tbt.trim(horizon)

    def tier_stats(self, now: float) -> dict[str, dict[str, float | int | None]]:
        self._trim(now)
        out = {}
        for name, w in self.tiers.items():
            ttft = w.ttft.distribution()
            tbt = w.tbt.distribution()
            slo = self.tbt_slo_s.get(name)
            out[name] = {
                "ttft_p50_s": ttft.median() if len(ttft) else None,
                "ttft_p99_s": ttft.quantile(0.99) if len(ttft) else None,
                "tbt_p50_s": tbt.median() if len(tbt) else None,
                "tbt_p99_s": tbt.quantile(0.99) if len(tbt) else None,
                "tbt_miss_frac": tbt.count_above(slo) / len(tbt) if len(tbt) and slo else 0.0,
                "ttft_misses_total": w.ttft_misses,
                "tbt_misses_total": w.tbt_misses,
                "tokens_total": w.tokens,
            }
        return out

    def tbt_gaps_since(self, since_s: float, now: float, max_samples_per_tier: int) -> dict[str, dict]:
        """For benchmarks (not the request path): per tier, the TBT gaps recorded at token times in
        [``since_s``, ``now``] (the tracker's clock), read from the window's arrays without touching
        them: ``gaps_s`` (float64 array: all of them, or ``max_samples_per_tier`` evenly strided
        ones when there are more), ``num_gaps`` (all of them), ``sampled`` (whether strided),
        ``complete`` (False when ``since_s`` is older than the window: samples may have been
        trimmed)."""
        if max_samples_per_tier < 1:
            raise ValueError(f"max_samples_per_tier must be >= 1, got {max_samples_per_tier}")
        complete = now - since_s <= self.window_s
        out = {}
        for name, w in self.tiers.items():
            s = w.tbt
            lo = bisect.bisect_left(s.times, since_s)
            hi = bisect.bisect_right(s.times, now, lo=lo)
            n = hi - lo
            gaps = np.array(s.values[lo:hi], dtype=np.float64)
            if n > max_samples_per_tier:
                gaps = gaps[np.linspace(0, n - 1, max_samples_per_tier).round().astype(np.int64)]
            out[name] = {"gaps_s": gaps, "num_gaps": n, "sampled": n > max_samples_per_tier, "complete": complete}
        return out

    def snapshot(self, replica_id: str, state: EngineState, mean_batch_time_s: float,
                 now: float | None = None, timestamp_s: float | None = None) -> dict:
        """The feedback snapshot a replica reports (JSON-ready, small). `now` is on the clock the
        token times were given in (it ends the window); `timestamp_s` is wall-clock time (for
        the routers; default: `now`, or time.time())."""
        now = time.time() if now is None else now
        timestamp_s = now if timestamp_s is None else timestamp_s
        # a waiting request's work is its prompt less what the prefix cache holds of it
        waiting_tokens = [r.num_uncomputed_tokens - r.num_cached_tokens for r in state.waiting]
        waiting_tokens += [r.num_uncomputed_tokens for r in state.running if r.is_prefill]
        hist = np.histogram(waiting_tokens, bins=PROMPT_HISTOGRAM_EDGES + (10**9,))[0] if waiting_tokens else None
        decodes: dict[str, int] = {}
        for r in state.running:
            if not r.is_prefill:
                decodes[r.tier] = decodes.get(r.tier, 0) + 1
        return {
            "version": SNAPSHOT_VERSION,
            "replica_id": replica_id,
            "timestamp_s": timestamp_s,
            "num_waiting": len(state.waiting),
            "num_running": len(state.running),
            "waiting_prefill_tokens": int(sum(waiting_tokens)),
            "waiting_prompt_histogram": {
                "edges": list(PROMPT_HISTOGRAM_EDGES),
                "counts": [int(c) for c in hist] if hist is not None else [0] * len(PROMPT_HISTOGRAM_EDGES),
            },
            "running_decodes_by_tier": decodes,
            "kv_usage": round(state.kv.usage, 4),
            "mean_batch_time_s": mean_batch_time_s,
            "tiers": self.tier_stats(now),
        }
