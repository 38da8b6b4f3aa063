"""QPS sweeps of several schedulers on one replica, in parallel processes, with capacity search.

One task = (scheduler, qps): build the workload, run it to completion in virtual time, summarise.
Workers cache the trace and the cost profile, so a task costs only its simulation.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from loadtest.metrics import bisect_midpoint, capacity_bracket, p99_ttft_ok, summarize
from loadtest.simulate.replica import Workload, run_replica
from replica.tiers import TierMix, paper_tiers, parse_tiers
from replica.traces import load_trace
from replica.cost.profile import DEFAULT_COST_PROFILE, load_profile
from replica.policy.registry import EngineLimits, make_policy
from replica.sim.engine import PAPER_KV_BLOCKS

PAPER_QPS = tuple(round(0.2 * k, 1) for k in range(1, 11))  # 0.2 .. 2.0


@dataclass(frozen=True)
class SweepSetup:
    profile: str = DEFAULT_COST_PROFILE
    trace: str = "paper"
    tokenizer: str = ""  # tokenizer.json for a ShareGPT JSON trace
    tiers: str = ""  # "" = the paper's tiers; else parse_tiers() text or file
    requests: int = 16_384
    seed: int = 42
    kv_blocks: int = PAPER_KV_BLOCKS
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    arrivals: str = "poisson"  # a prefix trace's arrivals: re-drawn at the QPS, or "replay"ed scaled to it
    prefix_caching: bool = True  # the engines' prefix cache, for a trace with prefix hashes
    max_model_len: int = 0  # requests longer than this are left out (0: the trace loader's default)

    def tier_mix(self) -> TierMix:
        return parse_tiers(self.tiers) if self.tiers else paper_tiers()


@functools.lru_cache(maxsize=8)
def _trace(name: str, tokenizer: str, max_model_len: int = 0):
    return load_trace(name, tokenizer=tokenizer or None, max_model_len=max_model_len or None)


@functools.lru_cache(maxsize=8)
def _profile(name: str):
    return load_profile(name)


def run_point(setup: SweepSetup, scheduler: str, qps: float) -> dict[str, Any]:
    """One (scheduler, qps) run, summarised."""
    wl = Workload.build(_trace(setup.trace, setup.tokenizer, setup.max_model_len), setup.requests, qps,
                        setup.tier_mix(), seed=setup.seed, arrivals=setup.arrivals)
    profile = _profile(setup.profile)
    policy = make_policy(scheduler, engine=EngineLimits(tile_tokens=profile.tile_tokens), **setup.scheduler_overrides)
    run = run_replica(wl, policy, profile, num_kv_blocks=setup.kv_blocks,
                      prefix_caching=setup.prefix_caching and wl.prefix_hashes is not None)
    return {"scheduler": scheduler, **summarize(run)}


def _task(args: tuple[Callable[[Any, str, float], dict[str, Any]], Any, str, float]) -> dict[str, Any]:
    point_fn, setup, key, qps = args
    return point_fn(setup, key, qps)


class Runner:
    """Runs batches of (key, qps) tasks on `jobs` processes with one progress bar: a task is
    `point_fn(setup, key, qps)` (default `run_point`: key = a scheduler name), a module-level
    function returning a summary dict that holds `key` under `key_field`."""

    def __init__(self, setup: Any, jobs: int | None = None, progress: bool = True,
                 point_fn: Callable[[Any, str, float], dict[str, Any]] = run_point,
                 key_field: str = "scheduler") -> None:
        self.setup = setup
        self.point_fn = point_fn
        self.key_field = key_field
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.progress = progress
        self._pool = mp.get_context("fork").Pool(self.jobs) if self.jobs > 1 else None
        self._bar = tqdm(total=0, unit="run", disable=not progress, desc="simulating")

    def run(self, tasks: Iterable[tuple[str, float]]) -> list[dict[str, Any]]:
        tasks = list(tasks)
        self._bar.total += len(tasks)
        self._bar.refresh()
        # heaviest first (high QPS runs longest), so no worker is left with a long tail alone
        args = [(self.point_fn, self.setup, s, q) for s, q in sorted(tasks, key=lambda t: -t[1])]
        out = []
        it = self._pool.imap_unordered(_task, args) if self._pool else map(_task, args)
        for res in it:
            out.append(res)
            self._bar.update(1)
        return out

    def close(self) -> None:
        self._bar.close()
        if self._pool is not None:
            self._pool.close()
            self._pool.join()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_with_capacity(
    runner: Runner,
    schedulers: Sequence[str],
    qps_grid: Sequence[float],
    refine_steps: int = 3,
    keys: Sequence[str] = ("slo_met", "stable_slo_met"),
    p99_ttft_bound_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Every scheduler at every QPS, then `refine_steps` bisection rounds (all runs of a round in
    parallel) between each one's last passing and first failing QPS, for each criterion in
    `keys` (the paper's capacity and the stable one).

    With `p99_ttft_bound_s`, also the P99-TTFT-bounded capacity (`loadtest.metrics.p99_ttft_ok`):
    every point gets ``p99_ttft_slo_met``, then `refine_steps` more bisection rounds for it alone.
    Their runs are kept apart (``p99_ttft_points``) and the other capacities are those of
    ``points`` only, so that they are the same numbers as without it.  It is refined only while
    below the stable capacity, so it is at most that."""
    points: dict[str, list[dict]] = {s: [] for s in schedulers}
    for res in runner.run((s, q) for s in schedulers for q in qps_grid):
        points[res[runner.key_field]].append(res)
    for _ in range(refine_steps):
        todo = sorted(
            {
                (s, mid)
                for s in schedulers
                for key in keys
                if (mid := bisect_midpoint(*capacity_bracket(points[s], key))) is not None
            }
        )
        if not todo:
            break
        for res in runner.run(todo):
            points[res[runner.key_field]].append(res)
    extra: dict[str, list[dict]] = {s: [] for s in schedulers}
    if p99_ttft_bound_s is not None:
        key = "p99_ttft_slo_met"
        for p in (p for s in schedulers for p in points[s]):
            p[key] = p99_ttft_ok(p, p99_ttft_bound_s)
        stable = {s: capacity_bracket(points[s], "stable_slo_met")[0] for s in schedulers}
        for _ in range(refine_steps):
            # refined only below the stable capacity: a criterion that implies stability passes no
            # load above it, and refining past the stable one's resolution would report more
            todo = sorted({(s, mid) for s in schedulers
                           if capacity_bracket(points[s] + extra[s], key)[0] < stable[s]
                           and (mid := bisect_midpoint(*capacity_bracket(points[s] + extra[s], key))) is not None})
            if not todo:
                break
            for res in runner.run(todo):
                res[key] = p99_ttft_ok(res, p99_ttft_bound_s)
                extra[res[runner.key_field]].append(res)
    out = {}
    for s in schedulers:
        pts = sorted(points[s], key=lambda p: p["qps"])
        out[s] = {
            "capacity_qps": capacity_bracket(pts, "slo_met")[0],
            "stable_capacity_qps": capacity_bracket(pts, "stable_slo_met")[0],
            "points": pts,
        }
        if p99_ttft_bound_s is not None:
            out[s]["p99_ttft_capacity_qps"] = capacity_bracket(pts + extra[s], "p99_ttft_slo_met")[0]
            out[s]["p99_ttft_bound_s"] = p99_ttft_bound_s
            out[s]["p99_ttft_points"] = sorted(extra[s], key=lambda p: p["qps"])
    return out
