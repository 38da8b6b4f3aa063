"""The search: cluster simulations of the workload (`run_plan_point`, checked against its SLOs by
`slo_checks`) and, per stack, the fewest replicas that meet them at the peak (`StackSearch`, driven
on a pool of worker processes by `run_searches`); `plan` runs it all and returns the result."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from loadtest.metrics import STABLE_BACKLOG_FRACTION, summarize
from loadtest.plan.stacks import STACK_BY_KEY, Stack, available_stacks
from loadtest.plan.workload import PlanError, Workload, _profile, hourly_qps, lengths_trace
from loadtest.simulate.cluster import ClusterConfig, run_cluster
from loadtest.simulate.replica import Workload as SimWorkload
from replica.policy.config import DEFAULT_TOKEN_BUDGET
from replica.tiers import TierMix

__all__ = ["CRITERION", "DAYS_PER_MONTH", "HOURS_PER_MONTH", "PlanSetup", "StackSearch", "guess_replicas", "plan",
           "run_plan_point", "run_searches", "slo_checks"]

HOURS_PER_MONTH = 365 * 24 / 12  # 730 h
DAYS_PER_MONTH = 365 / 12
# Starting guess: a replica serves about this share of the token rate of a full 512-token batch
# (roughly what the one-replica capacities of docs/BENCHMARKS.md sections 1-2 give); the search
# only starts there, every answer is simulated.
GUESS_EFFICIENCY = 0.75
GUESS_TOKEN_BUDGET = DEFAULT_TOKEN_BUDGET


# --------------------------------------------------------------------------------- one simulation

@dataclass(frozen=True)
class PlanSetup:
    """What every simulation run of one plan shares (pickled to the worker processes)."""

    workload: Workload
    requests_per_run: int


def _task_key(stack: str, replicas: int) -> str:
    return f"{stack}#{replicas}"


def slo_checks(summary: dict[str, Any], tiers: TierMix) -> list[dict[str, Any]]:
    """The criterion's checks of one run: each tier's P99 TBT against its SLO and median TTFT
    against its target, and stability; each with value, limit, ratio (value / limit) and ok."""
    checks = []
    for t in tiers.tiers:
        s = summary["tiers"][t.name]
        for metric, limit in (("tbt_p99_s", t.tbt_slo_s), ("ttft_p50_s", t.ttft_target_s)):
            value = s[metric]
            measured = not math.isnan(value)  # a tier without samples in this run: nothing to check
            checks.append({"tier": t.name, "metric": metric, "value": value, "limit": limit,
                           "ratio": value / limit if measured else 0.0,
                           "ok": (not measured) or value <= limit})
    backlog_limit = STABLE_BACKLOG_FRACTION * summary["requests"]
    checks.append({"tier": None, "metric": "backlog", "value": summary["waiting_at_last_arrival"],
                   "limit": backlog_limit, "ratio": summary["waiting_at_last_arrival"] / max(backlog_limit, 1e-9),
                   "ok": bool(summary["stable"])})
    return checks


def run_plan_point(setup: PlanSetup, task: str, qps: float) -> dict[str, Any]:
    """One cluster run: stack and replica count from `task` ("STACK#N"), at `qps`; summarised and
    checked against the workload's SLOs."""
    stack_key, _, n_text = task.rpartition("#")
    stack, replicas = STACK_BY_KEY[stack_key], int(n_text)
    w = setup.workload
    seed = w.search.seed
    tiers = w.tier_mix()
    trace = lengths_trace(w.lengths, setup.requests_per_run, seed)
    # a prefix trace is replayed in order, once: at most its length per run
    n = min(setup.requests_per_run, len(trace)) if trace.has_prefixes else setup.requests_per_run
    wl = SimWorkload.build(trace, n, qps, tiers, seed=seed)
    config = ClusterConfig(num_replicas=replicas, schedulers=stack.scheduler, profiles=(w.gpu_profile,),
                           kv_blocks=w.search.kv_blocks, router=stack.router, seed=seed)
    run = run_cluster(wl, config, profiles={w.gpu_profile: _profile(w.gpu_profile)})
    summary = summarize(run)
    checks = slo_checks(summary, tiers)
    keep = ("ttft_p50_s", "ttft_p99_s", "tbt_p99_s", "requests")
    return {
        "task": task, "stack": stack_key, "replicas": replicas, "qps": qps,
        "met": all(c["ok"] for c in checks), "checks": checks,
        "tiers": {name: {k: v[k] for k in keep} for name, v in summary["tiers"].items()},
        **{k: summary[k] for k in ("requests", "ttft_p50_s", "ttft_p99_s", "stable", "waiting_at_last_arrival",
                                   "unfinished", "makespan_s", "sim_wall_s", "goodput_rps")},
        "requests_per_replica": run.requests_per_replica,
    }


# -------------------------------------------------------------------------------------- the search

def guess_replicas(workload: Workload, qps: float) -> int:
    """A starting point for the search: `qps` over an estimate of one replica's capacity (the
    token rate of a full 512-token batch, decodes in proportion to output tokens, times
    GUESS_EFFICIENCY, over the mean tokens per request)."""
    trace = lengths_trace(workload.lengths, 4096, workload.search.seed)
    p, o = float(np.mean(trace.prompt_lens)), float(np.mean(trace.output_lens))
    c = _profile(workload.gpu_profile).coefficients
    decodes = GUESS_TOKEN_BUDGET * o / (p + o)
    chunk = GUESS_TOKEN_BUDGET - decodes
    batch_ms = (c.base_ms + c.per_token_ms * GUESS_TOKEN_BUDGET + c.prefill_sq_ms * chunk ** 2
                + c.prefill_ctx_ms * chunk * p / 2 + c.decode_ctx_ms * decodes * (p + o / 2))
    per_replica_qps = GUESS_EFFICIENCY * GUESS_TOKEN_BUDGET / (batch_ms / 1000) / (p + o)
    return max(1, min(workload.search.max_replicas, math.ceil(qps / per_replica_qps)))


Probe = tuple[int, float]  # (replicas, qps)


class StackSearch:
    """The search for one stack, as a generator of probe batches: `steps()` yields lists of
    (replicas, qps) to simulate and receives their results (`run_searches` drives several stacks'
    searches on one pool of workers).  Every result is kept in `points`."""

    def __init__(self, stack: Stack, workload: Workload, guess: int) -> None:
        self.stack = stack
        self.workload = workload
        self.guess = guess
        self.points: dict[tuple[int, float], dict[str, Any]] = {}
        self.result: dict[str, Any] = {}

    def _eval(self, probes: list[Probe]) -> Generator[list[Probe], list[dict], list[dict]]:
        probes = [(n, round(q, 6)) for n, q in probes]
        missing = [p for p in dict.fromkeys(probes) if p not in self.points]
        if missing:
            for r in (yield missing):
                self.points[(r["replicas"], r["qps"])] = r
        return [self.points[p] for p in probes]

    def bracket(self, qps: float) -> tuple[int, int | None]:
        """(largest replica count known to miss at `qps`, 0 if none; smallest count above it
        known to meet at `qps`, or None).  Uses monotonicity in QPS: a miss at a lower QPS is a
        miss here, a pass at a higher QPS a pass here."""
        lo = max((n for (n, q), p in self.points.items() if not p["met"] and q <= qps + 1e-9), default=0)
        hi = min((n for (n, q), p in self.points.items() if p["met"] and q >= qps - 1e-9 and n > lo), default=None)
        return lo, hi

    def fewest(self, qps: float, guess: int | None) -> Generator[list[Probe], list[dict], int | None]:
        """The fewest replicas meeting the SLOs at `qps` (None: not within max_replicas)."""
        max_n = self.workload.search.max_replicas
        lo, hi = self.bracket(qps)
        if guess is not None and hi is None and lo == 0:
            yield from self._eval([(guess, qps)] + ([(guess - 1, qps)] if guess > 1 else []))
        step = 1
        while True:
            lo, hi = self.bracket(qps)
            if hi is not None and hi - lo <= 1:
                return hi
            if hi is None:
                if lo >= max_n:
                    return None
                n = min(max_n, lo + step)  # gallop up
            elif lo == 0:
                n = max(1, hi - step)  # gallop down
            else:
                n = (lo + hi) // 2
            step *= 2
            yield from self._eval([(n, qps)])

    def steps(self) -> Generator[list[Probe], list[dict], None]:
        w = self.workload
        peak = round(w.peak, 6)
        n = yield from self.fewest(peak, self.guess)
        res: dict[str, Any] = {"feasible": n is not None, "replicas": n}
        if n is None:
            res["at_max"] = self.points.get((w.search.max_replicas, peak))
            self.result = res
            return
        # the confirmation: N meets, N - 1 misses, both simulated at the peak
        probes = [(n, peak)] + ([(n - 1, peak)] if n > 1 else [])
        at = yield from self._eval(probes)
        res["at_n"] = at[0]
        res["at_n_minus_1"] = at[1] if n > 1 else None
        res["confirmed"] = bool(at[0]["met"] and (n == 1 or not at[1]["met"]))
        res["headroom"] = yield from self._headroom(n, peak)
        if w.diurnal_qps is not None:
            res["hourly"] = yield from self._hourly(n, peak)
        self.result = res

    def _headroom(self, n: int, peak: float) -> Generator[list[Probe], list[dict], dict[str, Any] | None]:
        probes = self.workload.search.headroom_probes
        if probes == 0:
            return None
        lo, hi = peak, round(peak * n / (n - 1) if n > 1 else 2 * peak, 6)
        (top,) = yield from self._eval([(n, hi)])
        first_missed = None
        if top["met"]:
            lo = hi
        else:
            first_missed = hi
            for _ in range(probes - 1):
                mid = round((lo + first_missed) / 2, 6)
                (p,) = yield from self._eval([(n, mid)])
                if p["met"]:
                    lo = mid
                else:
                    first_missed = mid
        return {"max_qps_met": lo, "first_qps_missed": first_missed, "probed_up_to_qps": hi,
                "headroom_fraction": lo / peak - 1, "at_least": first_missed is None}

    def known(self, n: int, qps: float) -> bool | None:
        """Whether `n` replicas meet the SLOs at `qps`, from what was simulated and monotonicity
        (more replicas or less load never hurt): None if that does not tell."""
        if any(p["met"] and m <= n and q >= qps - 1e-9 for (m, q), p in self.points.items()):
            return True
        if any(not p["met"] and m >= n and q <= qps + 1e-9 for (m, q), p in self.points.items()):
            return False
        return None

    def _meets(self, n: int, qps: float) -> Generator[list[Probe], list[dict], bool]:
        k = self.known(n, qps)
        if k is None:
            (p,) = yield from self._eval([(n, qps)])
            k = p["met"]
        return k

    def _hourly(self, n_peak: int, peak: float) -> Generator[list[Probe], list[dict], list[dict[str, Any]]]:
        """Replicas for each hour of the day.  The levels below the peak (each hour's QPS, sorted)
        that n replicas hold are a prefix of them (monotonicity), and it shrinks as n falls: for
        n = N-1, N-2, ... the end of n's prefix is bisected within n+1's, and an hour needs the
        fewest n whose prefix holds its level."""
        w = self.workload
        qps_by_hour = hourly_qps(w.diurnal_qps)
        levels = sorted({q for q in qps_by_hour if 0 < q < peak})
        last_met = {n_peak: len(levels) - 1}  # n -> index of the highest level n replicas meet
        n = n_peak - 1
        while n >= max(1, w.search.min_replicas) and last_met[n + 1] >= 0:
            lo, hi = -1, last_met[n + 1] + 1  # lo: meets (or -1), hi: misses (or past the end)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if (yield from self._meets(n, levels[mid])):
                    lo = mid
                else:
                    hi = mid
            last_met[n] = lo
            n -= 1

        def need(q: float) -> int:
            if q <= 0:
                return 0
            if q >= peak:
                return n_peak
            i = levels.index(q)
            return min(m for m, top in last_met.items() if top >= i)

        out = []
        for h, q in enumerate(qps_by_hour):
            n = max(w.search.min_replicas, need(q))
            p_n, p_below = self.points.get((n, q)), self.points.get((n - 1, q))
            simulated = bool(p_n and p_n["met"] and (n == 1 or (p_below and not p_below["met"])))
            out.append({"hour": h, "qps": q, "replicas": n, "simulated_at_this_qps": simulated})
        return out


def run_searches(setup: PlanSetup, gens: dict[str, Generator[list[Probe], list[dict], None]], jobs: int,
                 progress: bool) -> None:
    """Drive every search generator to its end on `jobs` worker processes (forked, so they share
    the loaded trace), as a pipeline: as soon as all of one search's probes are back it gets them
    and its next probes are queued, so no worker waits for another stack's round."""
    bar = tqdm(total=0, unit="run", desc="simulating", disable=not progress)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) if jobs > 1 else None
    waiting: dict[str, int] = {}
    got: dict[str, list[dict]] = {}
    futures: set[Future] = set()

    def advance(key: str, results: list[dict] | None) -> list[Probe] | None:
        try:
            return next(gens[key]) if results is None else gens[key].send(results)
        except StopIteration:
            return None

    def submit(key: str, probes: list[Probe] | None) -> None:
        if not probes:
            return
        waiting[key], got[key] = len(probes), []
        bar.total += len(probes)
        bar.refresh()
        for n, q in probes:
            if pool is None:
                futures.add(_done_future(run_plan_point(setup, _task_key(key, n), q)))
            else:
                futures.add(pool.submit(run_plan_point, setup, _task_key(key, n), q))

    try:
        for key in gens:
            submit(key, advance(key, None))
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in done:
                futures.discard(f)
                r = f.result()
                bar.update(1)
                key = r["stack"]
                got[key].append(r)
                waiting[key] -= 1
                if waiting[key] == 0:
                    submit(key, advance(key, got[key]))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _done_future(result: dict[str, Any]) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f


def plan(workload: Workload, stacks: Sequence[Stack] | None = None, jobs: int | None = None,
         progress: bool = True, requests_per_run: int | None = None) -> dict[str, Any]:
    """Plan every stack; returns the JSON-ready result (see docs/planner.md)."""
    t0 = time.perf_counter()
    stacks = list(stacks) if stacks is not None else available_stacks()
    if not stacks:
        raise PlanError("no stacks to plan")
    requests = requests_per_run or workload.requests_per_run()
    setup = PlanSetup(workload=workload, requests_per_run=requests)
    guess = guess_replicas(workload, workload.peak)
    lengths_trace(workload.lengths, requests, workload.search.seed)  # cached before the workers fork
    searches = {s.key: StackSearch(s, workload, guess) for s in stacks}
    jobs = max(1, min(jobs or os.cpu_count() or 1, 2 * len(stacks)))
    run_searches(setup, {k: s.steps() for k, s in searches.items()}, jobs, progress)
    wall_s = time.perf_counter() - t0
    return _result(workload, stacks, searches, requests, guess, wall_s)


def _binding(res: dict[str, Any]) -> dict[str, Any] | None:
    """The check closest to its limit at N, and the checks N - 1 fails (worst first)."""
    at = res.get("at_n")
    if not at:
        return None
    slo = [c for c in at["checks"] if c["metric"] != "backlog"]
    closest = max(slo, key=lambda c: c["ratio"])
    below = res.get("at_n_minus_1")
    failed = sorted((c for c in below["checks"] if not c["ok"]), key=lambda c: -c["ratio"]) if below else []
    return {"closest_at_n": closest, "failed_at_n_minus_1": failed}


def _result(workload: Workload, stacks: list[Stack], searches: dict[str, StackSearch], requests: int,
            guess: int, wall_s: float) -> dict[str, Any]:
    price = workload.price_per_gpu_hour_usd
    out_stacks: dict[str, Any] = {}
    for s in stacks:
        search = searches[s.key]
        res = dict(search.result)
        n = res.get("replicas")
        if n is not None:
            if "hourly" in res:
                gpu_hours = DAYS_PER_MONTH * sum(h["replicas"] for h in res["hourly"])
            else:
                gpu_hours = n * HOURS_PER_MONTH
            res["gpu_hours_per_month"] = gpu_hours
            res["cost_per_month_usd"] = gpu_hours * price
            res["static_gpu_hours_per_month"] = n * HOURS_PER_MONTH
            res["binding"] = _binding(res)
        out_stacks[s.key] = {"label": s.label, "router": s.router, "scheduler": s.scheduler, "note": s.note,
                             **res, "points": sorted(search.points.values(), key=lambda p: (p["replicas"], p["qps"]))}
    feasible = [k for k in out_stacks if out_stacks[k].get("replicas") is not None]
    best = min(feasible, key=lambda k: (out_stacks[k]["gpu_hours_per_month"], out_stacks[k]["replicas"]),
               default=None)
    base_key = stacks[0].key
    savings = None
    if best is not None and base_key in feasible:
        b, x = out_stacks[base_key], out_stacks[best]
        savings = {"best": best, "baseline": base_key,
                   "replicas": b["replicas"] - x["replicas"],
                   "gpu_hours_per_month": b["gpu_hours_per_month"] - x["gpu_hours_per_month"],
                   "cost_per_month_usd": b["cost_per_month_usd"] - x["cost_per_month_usd"],
                   "fraction": 1 - x["gpu_hours_per_month"] / b["gpu_hours_per_month"]}
    return {
        "workload": json.loads(workload.model_dump_json()),
        "peak_qps": workload.peak,
        "lengths": workload.lengths.describe(),
        "hourly_qps": hourly_qps(workload.diurnal_qps) if workload.diurnal_qps else None,
        "criterion": CRITERION,
        "requests_per_run": requests,
        "virtual_duration_at_peak_s": requests / workload.peak,
        "start_guess_replicas": guess,
        "hours_per_month": HOURS_PER_MONTH,
        "stacks": out_stacks,
        "best_stack": best,
        "savings_vs_default": savings,
        "simulation_runs": sum(len(s.points) for s in searches.values()),
        "wall_s": round(wall_s, 2),
    }


CRITERION = ("N replicas meet the SLOs at a QPS when, in a cluster simulation at that QPS, every tier's P99 "
             "TBT is within its tbt_slo_s, every tier's median TTFT is within its ttft_target_s, and the run "
             "is stable (at most 1 % of the requests still waiting when the last one arrived; all finished). "
             "Reported N: the fewest replicas that meet this at the peak QPS, with N - 1 simulated and missing it.")
