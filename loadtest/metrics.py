"""The paper's statistics over a run: TTFT and TBT per tier, SLO checks, goodput, capacity.

* TTFT: arrival to first token. TBT: every gap between consecutive tokens of a request
  (preemption stalls included).
* A QPS point meets the SLOs (the paper's capacity criterion) when the median TTFT is at most
  `ttft_p50_limit_s` (0.5 s) and every tier's P99 TBT is within its SLO.
* Stable: additionally, when the last request arrived at most 1 % of the requests were still
  waiting to start (under shortest-prompt-first an overloaded replica can keep the
  median TTFT low while long prompts starve; this catches it).
* P99-TTFT-bounded (`p99_ttft_ok`): stable and SLOs met, and the P99 TTFT of all requests at
  most a bound (`P99_TTFT_BOUND_S`, 10 s by default).  The stable criterion passes runs whose
  longest prompts wait minutes (a backlog of long prompts under shortest-prompt-first stays
  under 1 % of the requests); this one bounds the tail every user sees.
* Goodput: requests per second (over the run's makespan) whose TTFT met their tier's target
  and at most 1 % of whose gaps exceeded their tier's TBT SLO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

TTFT_P50_LIMIT_S = 0.5
STABLE_BACKLOG_FRACTION = 0.01
PROMPT_BUCKETS = (0, 512, 1024, 2048, 4096, 8193)
# The default bound of the P99-TTFT capacity, in seconds: the "10 seconds" limit of the classic
# response-time limits for interactive systems (R. B. Miller 1968; J. Nielsen, Usability
# Engineering, 1993): the longest wait that keeps a user's attention on the dialogue.  It is a
# user-side figure, not fitted to any scheduler or profile; at no load the paper trace's P99 TTFT
# is about 0.8 s on rtx6000ada-mistral7b, so the bound allows a tail about 12x the unloaded one.
P99_TTFT_BOUND_S = 10.0


def _q(x: np.ndarray, q: float, weights: np.ndarray | None = None) -> float:
    """Quantile (the inverted-CDF definition: an observed value), optionally weighted."""
    if not len(x):
        return float("nan")
    if weights is not None and len(x) > 4096:
        fast = _weighted_count_quantile(x, q, weights)
        if fast is not None:
            return fast
    return float(np.quantile(x, q, weights=weights, method="inverted_cdf"))


def _weighted_count_quantile(x: np.ndarray, q: float, weights: np.ndarray) -> float | None:
    """`np.quantile(x, q, weights=weights, method="inverted_cdf")` for whole-number weights (the
    TBT gaps' counts), bit for bit, without its stable argsort of every value (the slow part of
    summarising a long run): the answer is the least value v whose weight at or below it, W(v),
    has W(v) / W(all) >= q (numpy's cdf[i] >= q at the first such sorted position; whole-number
    float sums are exact in any order).  None where that does not hold (NaN, a weight that is
    not a positive whole number, q outside [0, 1]): the caller falls back to numpy.

    W(v) is a whole number, so the test is W(v) >= `need`, the least whole number passing it.
    The unit-weight values (`a`, most of them) are only partly sorted: the least passing one sits
    at a sorted position between need - W(b) - 1 and need - 1 (W(b): the other values' weight),
    so only that window is sorted; a position below it counts as the window's start (no value
    there can reach `need`: W <= need - W(b) - 1 + W(b)), one above as the window's end (it
    passes)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or not 0.0 <= q <= 1.0 or np.isnan(x).any():
        return None
    unit = w == 1.0
    other = w[~unit]
    if other.size and ((other <= 0).any() or (other != np.floor(other)).any() or not np.isfinite(other).all()):
        return None
    a = x[unit] if other.size else x.copy()  # unit weights: W counts them by position (a copy: partitioned below)
    b = x[~unit]
    order = np.argsort(b, kind="stable")
    b = b[order]
    cb = np.cumsum(other[order])
    wb = float(cb[-1]) if cb.size else 0.0
    total = float(a.size) + wb
    if total >= 2.0**53:
        return None
    need = min(max(float(math.ceil(q * total)), 0.0), total)  # then exactly numpy's float test
    while need > 0 and (need - 1.0) / total >= q:
        need -= 1.0
    while need / total < q:
        need += 1.0
    if need == 0:
        return float(x.min())
    lo = int(max(need - wb - 1.0, 0.0))  # the window of sorted positions of `a` (empty if `a` is)
    hi = int(min(need, float(a.size))) - 1
    if 0 < lo or hi < a.size - 1:
        a.partition((lo, hi))
    window = np.sort(a[lo : hi + 1])

    def passes(v: float) -> bool:
        j = int(np.searchsorted(b, v, side="right"))
        return lo + int(np.searchsorted(window, v, side="right")) + (float(cb[j - 1]) if j else 0.0) >= need

    def least_passing(values: np.ndarray) -> float | None:
        lo_, hi_ = 0, len(values)
        while lo_ < hi_:
            mid = (lo_ + hi_) // 2
            if passes(values[mid]):
                hi_ = mid
            else:
                lo_ = mid + 1
        return float(values[lo_]) if lo_ < len(values) else None

    return min(v for v in (least_passing(window), least_passing(b)) if v is not None)


def meets_slo(run: Any) -> np.ndarray:
    """Per request of ``run``, whether it met its tier's SLO: TTFT within the tier's target and
    at most 1 % of its token gaps over the tier's TBT SLO (its own P99 TBT within the SLO)."""
    wl = run.workload
    ok = np.zeros(len(run.ttft_s), dtype=bool)
    for k, tier in enumerate(wl.tiers.tiers):
        ok |= (wl.tier_idx == k) & (run.ttft_s <= tier.ttft_target_s) & (run.tbt_miss_frac <= 0.01)
    return ok


def summarize(run: Any, ttft_p50_limit_s: float = TTFT_P50_LIMIT_S) -> dict[str, Any]:
    """Statistics of one `ReplicaRun` (or any object with the same fields), JSON-ready."""
    wl = run.workload
    tiers = wl.tiers.tiers
    ttft = run.ttft_s
    per_tier: dict[str, dict[str, float]] = {}
    slo_met = _q(ttft, 0.5) <= ttft_p50_limit_s
    good = meets_slo(run)
    for k, tier in enumerate(tiers):
        mask = wl.tier_idx == k
        gaps = run.tbt_s.get(tier.name, np.zeros(0))
        weights = getattr(run, "tbt_weight", {}).get(tier.name)
        if weights is None:
            weights = np.ones(len(gaps))
        tbt_p99 = _q(gaps, 0.99, weights)
        per_tier[tier.name] = {
            "requests": int(mask.sum()),
            "ttft_p50_s": _q(ttft[mask], 0.5),
            "ttft_mean_s": float(ttft[mask].mean()) if mask.any() else float("nan"),
            "ttft_p99_s": _q(ttft[mask], 0.99),
            "tbt_p99_s": tbt_p99,
            "tbt_mean_s": float(np.average(gaps, weights=weights)) if len(gaps) else float("nan"),
            "tbt_count": int(weights.sum()),
        }
        if len(gaps) and tbt_p99 > tier.tbt_slo_s:
            slo_met = False
    makespan = max(run.makespan_s, 1e-9)
    stable = run.waiting_at_last_arrival <= STABLE_BACKLOG_FRACTION * len(wl) and run.unfinished == 0
    buckets = {}
    for lo, hi in zip(PROMPT_BUCKETS[:-1], PROMPT_BUCKETS[1:]):
        m = (wl.prompt_lens >= lo) & (wl.prompt_lens < hi)
        buckets[f"{lo}-{hi - 1}"] = _q(ttft[m], 0.5)
    return {
        "qps": wl.qps,
        "requests": len(wl),
        "ttft_p50_s": _q(ttft, 0.5),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p99_s": _q(ttft, 0.99),
        "ttft_p99_long_s": _q(ttft[wl.prompt_lens > 4096], 0.99),
        "tbt_p99_s": {k: v["tbt_p99_s"] for k, v in per_tier.items()},
        "tiers": per_tier,
        "ttft_p50_by_prompt_s": buckets,
        "slo_met": bool(slo_met),
        "stable": bool(stable),
        "stable_slo_met": bool(slo_met and stable),
        "goodput_rps": float(good.sum() / makespan),
        "throughput_tokens_per_s": float((wl.prompt_lens.sum() + wl.output_lens.sum()) / makespan),
        "waiting_at_last_arrival": int(run.waiting_at_last_arrival),
        "unfinished": int(run.unfinished),
        "iterations": int(run.num_iterations),
        "preemptions": int(run.num_preemptions),
        "makespan_s": float(run.makespan_s),
        "sim_wall_s": float(run.wall_s),
        **_prefix_stats(run),
    }


def _prefix_stats(run: Any) -> dict[str, Any]:
    """The prefix cache's hit rate (cached / looked-up prompt tokens at admission), if it had one."""
    looked = getattr(run, "prefix_lookup_tokens", 0)
    if not looked:
        return {}
    hit = getattr(run, "prefix_hit_tokens", 0)
    return {"prefix_cache_hit_rate": hit / looked, "prefix_hit_tokens": int(hit)}


def p99_ttft_ok(point: dict[str, Any], bound_s: float = P99_TTFT_BOUND_S) -> bool:
    """The P99-TTFT-bounded criterion of a summarised point: stable with SLOs met
    (``stable_slo_met``) and a P99 TTFT (all requests; NaN fails) of at most ``bound_s``."""
    p99 = point.get("ttft_p99_s")
    return bool(point["stable_slo_met"] and p99 is not None and p99 <= bound_s)


def capacity_bracket(points: Iterable[dict[str, Any]], key: str = "slo_met") -> tuple[float, float | None]:
    """(capacity so far, first failing QPS or None): the capacity is the largest measured QPS
    that passes with every lower measured QPS passing too (a load the replica holds, and every
    lighter one); (0.0, first) if the lowest point fails. A pass above a failure does not count:
    a scheduler can miss an SLO at moderate load and meet it at higher load (SLAI does on the
    A100 profile, docs/BENCHMARKS.md), and no operator could run at such a "capacity"."""
    lo, hi = 0.0, None
    for p in sorted(points, key=lambda p: p["qps"]):
        if not p[key]:
            hi = p["qps"]
            break
        lo = p["qps"]
    return lo, hi


def bisect_midpoint(lo: float, hi: float | None) -> float | None:
    return None if hi is None else round((lo + hi) / 2, 6)


def find_capacity(
    evaluate: Callable[[float], dict[str, Any]],
    points: Iterable[dict[str, Any]],
    refine_steps: int = 3,
    key: str = "slo_met",
) -> tuple[float, list[dict[str, Any]]]:
    """Largest QPS meeting `key`: the best passing point of a sweep, refined by bisection towards
    the first failing point above it. Returns (capacity, extra points evaluated); 0.0 if no point
    passes. Assumes the criterion is monotone in QPS, as the paper's capacity does."""
    pts = list(points)
    extra: list[dict[str, Any]] = []
    for _ in range(refine_steps):
        mid = bisect_midpoint(*capacity_bracket(pts + extra, key))
        if mid is None:
            break
        extra.append(evaluate(mid))
    return capacity_bracket(pts + extra, key)[0], extra
