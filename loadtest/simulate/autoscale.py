"""Autoscaling in virtual time: a day (or a recorded trace) through the cluster simulator with the
replica count fixed, scaled by Ray Serve's default request-count policy, or by ours.

  python -m loadtest.simulate autoscale --policy fixed|ray-default|tier-aware [--workload day|mooncake] ...
  python -m loadtest.simulate autoscale --ttft-floor [--workload day|mooncake] ...   (no simulation)

The policies (each a `loadtest.simulate.cluster.Scaler`, decisions every ``period_s`` = 1 s):

* ``fixed``: ``--replicas`` N throughout (no scaler).
* ``ray-default``: `RayDefaultScaler`, Ray Serve's default autoscaling policy run by Ray's own code
  (pinned Ray 2.60): `ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy` on an
  `AutoscalingContext` whose ``total_num_requests`` is the ongoing requests (running + queued at
  the routable replicas) averaged over ``look_back_period_s`` (30 s, Serve's default), then Ray's
  ``_apply_scaling_factors`` and ``_apply_delay_logic`` (``upscale_delay_s`` 30 s,
  ``downscale_delay_s`` 600 s) on the virtual clock, then the min / max bounds, as Serve's
  controller does (`_apply_autoscaling_config` + `AutoscalingState.apply_bounds`; the wrapper
  itself reads the wall clock, so its two steps are called here with ``_now``).
* ``tier-aware``: `TierAwareScaler`, `serve_app.autoscaling_policy.TierAwareAutoscaler.decide`
  (the Serve adapter's decision code) on the latest delivered snapshots of the routable replicas
  and the arrival rate and mean prompt tokens per tier over ``arrival_window_s``.

Workloads: ``day``: the paper's trace (lengths sampled as ``loadtest.simulate paper`` does, tiers
drawn by share) with arrivals from a non-homogeneous Poisson process following a workload YAML's
``diurnal_qps`` curve scaled to ``--peak-qps`` (`loadtest.arrivals.diurnal_arrival_times`);
``mooncake``: the Mooncake conversation trace in its recorded order and with its own timestamps,
multiplied by ``--stretch`` (1: as recorded), prefix caching on.

Per-tier SLO attainment: the share of a tier's requests whose TTFT is within the tier's
``ttft_target_s`` AND at most 1 % of whose token gaps exceed the tier's TBT SLO (the per-request
criterion of `loadtest.metrics`' goodput: a P99 TBT SLO met by the request itself); an unfinished
request misses.  GPU-hours: every replica from its request (start-up included) until it is gone
(a drained replica once its last request finished), over the run (until the last request
finished).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.arrivals import diurnal_arrival_times
from loadtest.metrics import meets_slo, summarize
from loadtest.simulate.cluster import ClusterConfig, ClusterRun, ScaleStep, ScalingView, run_cluster
from loadtest.simulate.replica import Workload
from replica.cost.profile import DEFAULT_COST_PROFILE, CostProfile, load_profile
from replica.cost.shape import BatchShape
from replica.policy.registry import DEFAULT_SCHEDULER
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.tiers import TierMix, paper_tiers, parse_tiers
from replica.traces import Trace, load_trace
from serve_app.autoscaling_policy import ArrivalStats, TierAwareAutoscaler
from serve_app.config import AdmissionConfig, ReplicaAutoscalingConfig, serving_tiers

POLICIES = ("fixed", "ray-default", "tier-aware")
DEFAULT_CURVE = Path(__file__).resolve().parents[1] / "workloads" / "paper-diurnal-rtx6000ada.yaml"
DAY_S = 86_400.0
DECISION_PERIOD_S = 1.0


# ------------------------------------------------------------------------------------ the scalers

class TierAwareScaler:
    """Ours: `TierAwareAutoscaler.decide` every ``metrics_period_s`` on the cluster's view."""

    def __init__(self, tiers: TierMix, config: ReplicaAutoscalingConfig, admission: AdmissionConfig | None = None
                 ) -> None:
        self.policy = TierAwareAutoscaler(serving_tiers(tiers), config, admission)
        self.period_s = config.metrics_period_s  # as the Serve adapter decides (serve_app.ray_autoscaling)
        self.startup_s = config.startup_s
        self.arrival_window_s = config.arrival_window_s

    def decide(self, view: ScalingView) -> ScaleStep:
        arrivals = ArrivalStats.of(view.arrival_rates_rps, view.mean_prompt_tokens)
        d = self.policy.decide(view.now_s, view.feedback, arrivals, view.running, view.starting)
        return ScaleStep(d.target_replicas, d.reason, d.message)


class RayDefaultScaler:
    """Ray Serve's default request-count policy (module docstring), on the virtual clock."""

    def __init__(self, min_replicas: int, max_replicas: int, startup_s: float, target_ongoing_requests: float = 2.0,
                 upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0, look_back_period_s: float = 30.0,
                 period_s: float = DECISION_PERIOD_S) -> None:
        from ray.serve.config import AutoscalingConfig

        self.config = AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas,
                                        target_ongoing_requests=target_ongoing_requests,
                                        upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
                                        look_back_period_s=look_back_period_s)
        self.period_s = period_s
        self.startup_s = startup_s
        self.arrival_window_s = look_back_period_s  # unused by the policy
        self.policy_state: dict[str, Any] = {}
        self._samples: deque[tuple[float, int]] = deque()

    def ongoing_mean(self, now_s: float, ongoing: int) -> float:
        """Ongoing requests averaged over the look-back window (one sample per decision)."""
        self._samples.append((now_s, ongoing))
        while self._samples[0][0] <= now_s - self.config.look_back_period_s:
            self._samples.popleft()
        return sum(v for _, v in self._samples) / len(self._samples)

    def context(self, now_s: float, running: int, target: int, total_num_requests: float):
        from ray.serve._private.common import DeploymentID
        from ray.serve.config import AutoscalingContext

        return AutoscalingContext(
            deployment_id=DeploymentID(name="llm", app_name="sim"), deployment_name="llm", app_name="sim",
            current_num_replicas=running, target_num_replicas=target, running_replicas=[],
            total_num_requests=total_num_requests, total_queued_requests=0.0, aggregated_metrics={},
            raw_metrics={}, capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.policy_state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=now_s, config=self.config)

    def decide_on(self, now_s: float, running: int, target: int, total_num_requests: float) -> int:
        """Ray's decision for this context (the wrapped default policy, then the bounds)."""
        from ray.serve import autoscaling_policy as ray_policy

        # (Ray's wrapper also has cold-start branches for zero running replicas; the cluster
        # always keeps one routable replica, so they cannot arise here)
        if running < 1:
            raise ValueError(f"Ray's policy is simulated with running replicas only, got {running}")
        ctx = self.context(now_s, running, target, total_num_requests)
        desired, _ = ray_policy.replica_queue_length_autoscaling_policy(ctx)
        desired = ray_policy._apply_scaling_factors(desired, ctx.current_num_replicas, self.config)
        decision, self.policy_state = ray_policy._apply_delay_logic(
            max(0, desired), ctx.target_num_replicas, self.config, dict(self.policy_state), _now=now_s)
        if isinstance(decision, float):
            decision = math.ceil(decision)
        return max(self.config.min_replicas, min(self.config.max_replicas, decision))

    def decide(self, view: ScalingView) -> ScaleStep:
        mean = self.ongoing_mean(view.now_s, sum(view.ongoing.values()))
        target = view.running + view.starting
        decision = self.decide_on(view.now_s, view.running, target, mean)
        return ScaleStep(decision, "ongoing_requests" if decision != target else "hold",
                         f"{mean:.2f} ongoing requests over {self.config.look_back_period_s:g} s, target "
                         f"{self.config.target_ongoing_requests:g} per replica")


# ---------------------------------------------------------------------------------- the workloads

def day_workload(trace: Trace, curve: Sequence[tuple[float, float]], peak_qps: float, tiers: TierMix,
                 duration_s: float = DAY_S, seed: int = 42, start_hour: float = 0.0) -> Workload:
    """The paper's setup (`Workload.build`: lengths from the trace shuffled with ``seed``, tiers
    drawn by share) with arrivals following the curve scaled to ``peak_qps``
    (`loadtest.arrivals.diurnal_arrival_times`)."""
    arrival_s = diurnal_arrival_times(curve, peak_qps, duration_s, seed, start_hour)
    n = len(arrival_s)
    return Workload.build(trace, n, n / duration_s if duration_s else 0.0, tiers, seed=seed, arrival_s=arrival_s)


def recorded_workload(trace: Trace, tiers: TierMix, stretch: float = 1.0, seed: int = 42,
                      max_requests: int | None = None) -> Workload:
    """A timestamped prefix trace in its order (`Workload.build`), at its own arrival times x
    ``stretch`` (from 0)."""
    if trace.arrival_s is None:
        raise ValueError(f"{trace.source} has no timestamps")
    if not trace.has_prefixes:
        raise ValueError(f"{trace.source} has no prefix hashes: only a prefix trace is replayed in its order")
    if not stretch > 0:
        raise ValueError(f"stretch must be > 0, got {stretch}")
    n = len(trace) if max_requests is None else min(max_requests, len(trace))
    recorded = np.asarray(trace.arrival_s[:n], dtype=np.float64)
    arrival_s = (recorded - recorded[0]) * stretch
    span = float(arrival_s[-1]) if n else 0.0
    return Workload.build(trace, n, (n - 1) / span if span > 0 else 0.0, tiers, seed=seed, arrival_s=arrival_s)


# ------------------------------------------------------------------------------------ the results

def attainment(run: ClusterRun) -> dict[str, dict[str, float]]:
    """Per tier: the share of requests meeting the TTFT target, the TBT SLO (<= 1 % of gaps
    over it), and both (the module docstring)."""
    wl = run.workload
    met = meets_slo(run)
    out = {}
    for k, tier in enumerate(wl.tiers.tiers):
        mask = wl.tier_idx == k
        n = int(mask.sum())
        ttft_ok = run.ttft_s[mask] <= tier.ttft_target_s
        tbt_ok = run.tbt_miss_frac[mask] <= 0.01
        out[tier.name] = {"requests": n,
                          "attainment": float(met[mask].mean()) if n else float("nan"),
                          "ttft_attainment": float(ttft_ok.mean()) if n else float("nan"),
                          "tbt_attainment": float(tbt_ok.mean()) if n else float("nan")}
    return out


def attainment_by_period(run: ClusterRun, period_s: float = 3600.0) -> dict[str, list[float | None]]:
    """Per tier, the attainment of the requests arriving in each ``period_s`` (None: none)."""
    wl = run.workload
    end = float(wl.arrival_s[-1]) if len(wl) else 0.0
    buckets = np.minimum((wl.arrival_s // period_s).astype(np.int64), int(end // period_s))
    nb = int(end // period_s) + 1
    out: dict[str, list[float | None]] = {}
    met = meets_slo(run)
    for k, tier in enumerate(wl.tiers.tiers):
        mask = wl.tier_idx == k
        ok = mask & met
        total = np.bincount(buckets[mask], minlength=nb)
        good = np.bincount(buckets[ok], minlength=nb)
        out[tier.name] = [round(float(g / t), 5) if t else None for g, t in zip(good, total)]
    return out


def occupancy(intervals: Sequence[tuple[float, float]], end_s: float, bucket_s: float) -> list[float]:
    """The mean number of ``[start, stop)`` intervals covering each bucket of ``bucket_s`` up to
    ``end_s`` (the last bucket over its covered part)."""
    nb = max(1, math.ceil(end_s / bucket_s))
    area = np.zeros(nb)
    for start, stop in intervals:
        stop = min(stop, end_s)
        t = start
        while t < stop:
            b = min(int(t // bucket_s), nb - 1)
            edge = min(stop, (b + 1) * bucket_s) if b < nb - 1 else stop
            area[b] += edge - t
            t = edge
    widths = np.array([min(bucket_s, end_s - b * bucket_s) for b in range(nb)])
    return [round(float(a / w), 4) if w > 0 else 0.0 for a, w in zip(area, widths)]


def report(run: ClusterRun, setup: dict[str, Any], bucket_s: float = 300.0) -> dict[str, Any]:
    """The results JSON of one run."""
    end = run.makespan_s
    s = summarize(run)
    spans = run.replica_spans
    gpu = [(x.requested_s, x.gone_s if x.gone_s is not None else end) for x in spans]
    serving = [(x.ready_s, x.drained_s if x.drained_s is not None else (x.gone_s if x.gone_s is not None else end))
               for x in spans if x.ready_s is not None]
    events = run.scale_events
    return {
        "setup": setup,
        "requests": len(run.workload),
        "mean_qps": len(run.workload) / max(float(run.workload.arrival_s[-1]), 1e-9) if len(run.workload) else 0.0,
        "makespan_s": end,
        "gpu_hours": run.gpu_hours,
        "mean_replicas": run.gpu_hours * 3600.0 / end if end > 0 else 0.0,
        "max_replicas": max((sum(1 for a, b in gpu if a <= t < b) for t, _ in gpu), default=0),
        "replicas_created": len(spans),
        "attainment": attainment(run),
        "attainment_by_hour": attainment_by_period(run, 3600.0),
        "tiers": {name: {k: t[k] for k in ("requests", "ttft_p50_s", "ttft_p99_s", "tbt_p99_s")}
                  for name, t in s["tiers"].items()},
        "unfinished": s["unfinished"],
        "preemptions": s["preemptions"],
        "scale_ups": sum(1 for e in events if e.to_replicas > e.from_replicas),
        "scale_downs": sum(1 for e in events if e.to_replicas < e.from_replicas),
        "scale_reasons": dict(Counter(f"{'up' if e.to_replicas > e.from_replicas else 'down'}:{e.reason}"
                                      for e in events)),
        "longest_drain_s": max((x.gone_s - x.drained_s for x in spans if x.drained_s is not None
                                and x.gone_s is not None), default=0.0),
        "replicas_series": {"bucket_s": bucket_s,
                            "gpu": occupancy(gpu, end, bucket_s),  # requested + starting + running + draining
                            "serving": occupancy(serving, end, bucket_s)},  # routable
        "scale_events": [{"t_s": round(e.time_s, 1), "from": e.from_replicas, "to": e.to_replicas,
                          "reason": e.reason, "message": e.message[:120]} for e in events],
        "sim_wall_s": run.wall_s,
    }


def dumps(out: dict[str, Any]) -> str:
    """The results JSON, compact: one line per top-level key, one per scale event."""
    def one(v: Any) -> str:
        return json.dumps(v, separators=(", ", ": "), default=float)

    lines = []
    for k, v in out.items():
        if k == "scale_events":
            body = ",\n".join(f"  {one(e)}" for e in v)
            lines.append(f" {one(k)}: [\n{body}\n ]" if v else f" {one(k)}: []")
        else:
            lines.append(f" {one(k)}: {one(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# -------------------------------------------------------------------------------------- the command

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=POLICIES, help="required unless --ttft-floor")
    p.add_argument("--ttft-floor", action="store_true",
                   help="simulate nothing: per tier, the share of the workload's requests whose prefill alone on an "
                        "idle replica fits the TTFT target (the attainment no scaling can exceed)")
    p.add_argument("--workload", choices=("day", "mooncake"), default="day")
    p.add_argument("--curve", default=str(DEFAULT_CURVE),
                   help="a workload YAML with diurnal_qps: the day's curve shape (default %(default)s)")
    p.add_argument("--peak-qps", type=float, default=None, help="the curve scaled to this peak (default: its own)")
    p.add_argument("--duration-s", type=float, default=DAY_S, help="virtual seconds of arrivals (default one day)")
    p.add_argument("--start-hour", type=float, default=0.0, help="the curve's hour at time 0 (default 0)")
    p.add_argument("--stretch", type=float, default=1.0, help="mooncake: timestamps multiplied by this (default 1)")
    p.add_argument("--max-requests", type=int, default=None, help="mooncake: only the first N requests")
    p.add_argument("--replicas", type=int, default=None,
                   help="fixed: the replica count; autoscaled: the count at time 0 (default --min-replicas)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=16)
    p.add_argument("--startup-s", type=float, default=120.0, help="a new replica serves this long after its request")
    p.add_argument("--target-ongoing-requests", type=float, default=2.0, help="ray-default: Serve's target (default 2)")
    p.add_argument("--profile", default=DEFAULT_COST_PROFILE)
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    p.add_argument("--router", default="slo")
    p.add_argument("--tiers", default="", help="e.g. premium:0.1:0.05,free:0.5:0.95 (default: the paper's)")
    p.add_argument("--kv-blocks", type=int, default=PAPER_KV_BLOCKS)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bucket-s", type=float, default=300.0, help="the replica time series' bucket (default 300 s)")
    p.add_argument("--json", default=None, help="write the results JSON here")


def build_workload(a: argparse.Namespace) -> tuple[Workload, dict[str, Any]]:
    """The run's workload and its setup record, from the command's arguments."""
    from loadtest.plan.workload import load_workload

    tiers = parse_tiers(a.tiers) if a.tiers else paper_tiers()
    if a.workload == "day":
        curve_wl = load_workload(a.curve)
        if curve_wl.diurnal_qps is None:
            raise ValueError(f"{a.curve} has no diurnal_qps")
        curve = [tuple(p) for p in curve_wl.diurnal_qps]
        peak = a.peak_qps or curve_wl.peak
        wl = day_workload(load_trace("paper"), curve, peak, tiers, a.duration_s, a.seed, a.start_hour)
        wsetup = {"kind": "day", "trace": "paper", "curve_file": str(Path(a.curve).name), "curve": curve,
                  "peak_qps": peak, "duration_s": a.duration_s, "start_hour": a.start_hour}
    else:
        wl = recorded_workload(load_trace("mooncake"), tiers, a.stretch, a.seed, a.max_requests)
        wsetup = {"kind": "mooncake", "trace": "mooncake", "stretch": a.stretch, "max_requests": a.max_requests}
    return wl, wsetup


def prefill_floor_s(prompt_len: int, profile: CostProfile) -> float:
    """The least time `prompt_len` prompt tokens take to prefill on an idle replica under `profile`:
    the prompt alone in every iteration, split into k chunks as equal as can be (sizes differing by
    at most one token), k the best count; each chunk priced by the profile. For a given count the
    most equal split is the fastest when the profile's ``prefill_sq_ms >= prefill_ctx_ms / 2`` (its
    chunk terms sum to (sq - ctx/2) * sum p_i^2 plus what the count fixes), as in every shipped
    profile, so this is the least over every chunking: no policy or router can give the prompt its
    first token sooner on that replica."""
    def split_s(k: int) -> float:
        q, r = divmod(prompt_len, k)
        t, done = 0.0, 0
        for i in range(k):
            n = q + 1 if i < r else q
            t += profile.iteration_time_s(BatchShape.of(prefill_chunks=[(n, done)]))
            done += n
        return t

    best = split_s(1)
    base_s = profile.coefficients.base_ms / 1000.0
    k = 2
    while k <= prompt_len and k * base_s < best:  # k chunks cost at least k x the per-iteration base
        best = min(best, split_s(k))
        k += 1
    return best


def ttft_floor(wl: Workload, profile: CostProfile) -> dict[str, dict[str, float]]:
    """Per tier: the share of its requests whose prefill floor (`prefill_floor_s`) is within the
    tier's TTFT target (the highest TTFT attainment any scaling can reach on this workload), and
    the floor's median and P99."""
    if wl.prefix_hashes is not None:
        raise ValueError("--ttft-floor: this workload reuses prompt prefixes (prefix caching on), whose cached "
                         "tokens skip prefill; the floor counts every prompt token, so it would not bound anything")
    floors: dict[int, float] = {}
    for p in np.unique(wl.prompt_lens):
        floors[int(p)] = prefill_floor_s(int(p), profile)
    floor = np.array([floors[int(p)] for p in wl.prompt_lens])
    out = {}
    for k, tier in enumerate(wl.tiers.tiers):
        f = floor[wl.tier_idx == k]
        out[tier.name] = {"requests": int(len(f)), "ttft_target_s": tier.ttft_target_s,
                          "attainable": float((f <= tier.ttft_target_s).mean()) if len(f) else float("nan"),
                          "floor_p50_s": float(np.median(f)) if len(f) else float("nan"),
                          "floor_p99_s": float(np.quantile(f, 0.99)) if len(f) else float("nan")}
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    wl, wsetup = build_workload(a)
    tiers = wl.tiers
    initial = a.replicas if a.replicas is not None else a.min_replicas
    scaler: Any = None
    if a.policy == "tier-aware":
        cfg = ReplicaAutoscalingConfig(min_replicas=a.min_replicas, max_replicas=a.max_replicas, startup_s=a.startup_s)
        scaler = TierAwareScaler(tiers, cfg)
        psetup = {"config": cfg.model_dump()}
    elif a.policy == "ray-default":
        scaler = RayDefaultScaler(a.min_replicas, a.max_replicas, a.startup_s, a.target_ongoing_requests)
        psetup = {"config": {k: v for k, v in scaler.config.model_dump().items() if k != "policy"},
                  "startup_s": a.startup_s}
    else:
        if a.replicas is None:
            raise ValueError("--policy fixed needs --replicas")
        psetup = {}
    config = ClusterConfig(num_replicas=initial, schedulers=a.scheduler, profiles=a.profile, kv_blocks=a.kv_blocks,
                           router=a.router, seed=a.seed, prefix_caching=wl.prefix_hashes is not None)
    result = run_cluster(wl, config, scaler=scaler)
    setup = {"policy": a.policy, "workload": wsetup, "replicas_at_start": initial, **psetup,
             "profile": a.profile, "scheduler": a.scheduler, "router": a.router, "kv_blocks": a.kv_blocks,
             "seed": a.seed, "tiers": [t.model_dump() for t in tiers.tiers], "decision_period_s": scaler.period_s if scaler is not None else DECISION_PERIOD_S}
    return report(result, setup, a.bucket_s)


def cli(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if a.ttft_floor:
        try:
            wl, wsetup = build_workload(a)
            floor = ttft_floor(wl, load_profile(a.profile))
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"workload": wsetup, "profile": a.profile, "ttft_floor": floor}, indent=2, default=float))
        return 0
    if a.policy is None:
        print("error: --policy is required (or --ttft-floor)", file=sys.stderr)
        return 2
    try:
        out = run(a)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    brief = {k: out[k] for k in ("requests", "gpu_hours", "mean_replicas", "max_replicas", "attainment", "tiers",
                                 "scale_ups", "scale_downs", "scale_reasons", "unfinished")}
    print(json.dumps({"policy": a.policy, **brief}, indent=2, default=float))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(dumps(out))
        print(f"wrote {a.json}; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
