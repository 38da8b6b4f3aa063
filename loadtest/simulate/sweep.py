"""QPS sweeps of several schedulers on one replica, in parallel processes, with capacity search.

One task = (scheduler, qps): build the workload, run it to completion in virtual time, summarise.
Workers cache the trace and the cost profile, so a task costs only its simulation.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Generator, Iterable, Sequence
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


Task = tuple[str, float]  # (key, qps)
Chain = Generator[list[Task], list[dict[str, Any]], None]


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

    def run(self, tasks: Iterable[Task]) -> list[dict[str, Any]]:
        """Every task's result, in the order they finish."""
        out: list[dict[str, Any]] = []

        def chain() -> Chain:
            out.extend((yield list(tasks)))

        self.run_chains([chain()])
        return out

    def run_chains(self, chains: Iterable[Chain]) -> None:
        """Drive independent chains of batches at once: a chain yields a batch of tasks, is sent
        that batch's results (in the order they finished) and yields its next batch, until it
        returns.  A chain's next batch is queued as soon as its own batch is done, not when every
        chain's is, so the workers are not left idle behind the slowest task of a round; each
        chain sees what it would see run alone.  Tasks run in the order queued: the first batches
        of all chains together, then each next batch, each heaviest (highest QPS) first, so no
        worker is left with a long tail alone."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        waiting: dict[int, list] = {}  # chain -> [tasks left, results so far]

        def next_batch(gen: Chain, results: list[dict[str, Any]] | None) -> list[Task] | None:
            """The chain's next non-empty batch (None: it has finished)."""
            try:
                batch = next(gen) if results is None else gen.send(results)
                while not batch:
                    batch = gen.send([])
            except StopIteration:
                return None
            return list(batch)

        def queue_tasks(tasks: list[tuple[int, Task]]) -> None:
            for c, _ in tasks:
                waiting.setdefault(c, [0, []])[0] += 1
            self._bar.total += len(tasks)
            self._bar.refresh()
            for c, (key, qps) in sorted(tasks, key=lambda ct: -ct[1][1]):
                args = (self.point_fn, self.setup, key, qps)
                if self._pool is None:
                    done.put((c, _task(args), None))
                else:
                    self._pool.apply_async(_task, (args,), callback=lambda res, c=c: done.put((c, res, None)),
                                           error_callback=lambda e, c=c: done.put((c, None, e)))

        gens = dict(enumerate(chains))
        queue_tasks([(c, t) for c, gen in gens.items() for t in (next_batch(gen, None) or [])])
        while waiting:
            c, res, err = done.get()
            if err is not None:
                raise err
            self._bar.update(1)
            left = waiting[c]
            left[0] -= 1
            left[1].append(res)
            if left[0] == 0:
                del waiting[c]
                batch = next_batch(gens[c], left[1])
                if batch is not None:
                    queue_tasks([(c, t) for t in batch])

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to finish what is queued, or (``abort``) stop them at once."""
        self._bar.close()
        if self._pool is not None:
            if abort:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(abort=exc_type is not None)  # a failed run (or ^C) does not wait for the rest


def sweep_with_capacity(
    runner: Runner,
    schedulers: Sequence[str],
    qps_grid: Sequence[float],
    refine_steps: int = 3,
    keys: Sequence[str] = ("slo_met", "stable_slo_met"),
    p99_ttft_bound_s: float | None = None,
    also: Iterable[Chain] = (),
) -> dict[str, dict[str, Any]]:
    """Every scheduler at every QPS, then `refine_steps` bisection rounds between each one's last
    passing and first failing QPS, for each criterion in `keys` (the paper's capacity and the
    stable one).  Each scheduler's rounds follow one another, the schedulers' side by side
    (`Runner.run_chains`: a scheduler's next round starts when its own round is done); `also`:
    more chains of runs to drive alongside.

    With `p99_ttft_bound_s`, also the P99-TTFT-bounded capacity (`loadtest.metrics.p99_ttft_ok`):
    every point gets ``p99_ttft_slo_met``, then `refine_steps` more bisection rounds for it alone.
    Their runs are kept apart (``p99_ttft_points``) and the other capacities are those of
    ``points`` only, so that they are the same numbers as without it.  It is refined only while
    below the stable capacity, so it is at most that."""
    points: dict[str, list[dict]] = {s: [] for s in schedulers}
    extra: dict[str, list[dict]] = {s: [] for s in schedulers}
    p99_key = "p99_ttft_slo_met"

    def rounds(s: str) -> Chain:
        """One scheduler's runs, round by round (a chain of `Runner.run_chains`)."""
        pts, more = points[s], extra[s]
        pts += yield [(s, q) for q in qps_grid]
        for _ in range(refine_steps):
            todo = sorted({mid for key in keys if (mid := bisect_midpoint(*capacity_bracket(pts, key))) is not None})
            if not todo:
                break
            pts += yield [(s, q) for q in todo]
        if p99_ttft_bound_s is None:
            return
        for p in pts:
            p[p99_key] = p99_ttft_ok(p, p99_ttft_bound_s)
        stable = capacity_bracket(pts, "stable_slo_met")[0]
        for _ in range(refine_steps):
            # refined only below the stable capacity: a criterion that implies stability passes no
            # load above it, and refining past the stable one's resolution would report more
            lo, hi = capacity_bracket(pts + more, p99_key)
            if not (lo < stable and (mid := bisect_midpoint(lo, hi)) is not None):
                break
            for res in (yield [(s, mid)]):
                res[p99_key] = p99_ttft_ok(res, p99_ttft_bound_s)
                more.append(res)

    runner.run_chains([*(rounds(s) for s in schedulers), *also])
    out = {}
    for s in schedulers:
        pts = sorted(points[s], key=lambda p: p["qps"])
        out[s] = {
            "capacity_qps": capacity_bracket(pts, "slo_met")[0],
            "stable_capacity_qps": capacity_bracket(pts, "stable_slo_met")[0],
            "points": pts,
        }
        if p99_ttft_bound_s is not None:
            out[s]["p99_ttft_capacity_qps"] = capacity_bracket(pts + extra[s], p99_key)[0]
            out[s]["p99_ttft_bound_s"] = p99_ttft_bound_s
            out[s]["p99_ttft_points"] = sorted(extra[s], key=lambda p: p["qps"])
    return out
