"""Capacity and cost planner: the fewest GPUs (replicas) a workload needs under its SLOs, per
serving stack, by binary search over the replica count with the virtual-time cluster simulator.

  python -m loadtest.plan WORKLOAD.yaml [--html PATH] [--json PATH] [--stacks default,slai]
                          [--requests N] [--jobs N] [--quiet]

The workload (a YAML file, `Workload` below; `--help` lists every field) gives the load (a peak
QPS, or a diurnal curve of (hour, QPS) points), the prompt/output lengths (a trace or parametric
distributions), the tiers with their SLOs and shares, the GPU cost profile, the price per
GPU-hour and the search bounds.

Criterion.  N replicas meet the SLOs at a QPS when a cluster run (Poisson arrivals at that QPS,
`requests_per_run` requests, the workload's lengths and tiers) has, for every tier, P99 TBT <=
the tier's ``tbt_slo_s`` and median TTFT <= the tier's ``ttft_target_s``, and is stable
(`loadtest.metrics.summarize`'s ``stable``: at most 1 % of the requests still waiting to start
when the last one arrived, and every request finished).  The paper's criterion uses the overall
median TTFT <= 0.5 s; with per-tier TTFT targets this planner checks each tier's median.

Answer.  For each stack the planner reports the fewest N that meets the criterion at the peak
QPS with N - 1 missing it, both simulated (same workload and seed); if a larger N was seen to
miss, N is the smallest passing count above the largest missing one.  Headroom = (largest
probed QPS that N replicas meet) / peak QPS - 1, probing between the peak and
peak x N / (N - 1).  GPU-hours per month = N x 730 h (a month of 365 x 24 / 12 hours), or, for a
diurnal curve, 365 / 12 x the sum over the day's 24 hours of the replicas each hour needs (each
hour planned for the curve's maximum within it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import sys
import textwrap
import time
import types
import typing
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from loadtest.metrics import STABLE_BACKLOG_FRACTION, summarize
from loadtest.simulate.cluster import ClusterConfig, run_cluster
from loadtest.simulate.replica import Workload as SimWorkload
from replica.traces import Trace, load_trace
from replica.cost.profile import CostProfile, load_profile
from replica.policy.registry import available_schedulers
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.tiers import TierMix, TierSpec, paper_tiers
from serve_app.yaml_source import FieldError, YAMLReadError, echo_ok, read_yaml, yaml_line

__all__ = ["HOURS_PER_MONTH", "STACKS", "PlanError", "Stack", "Workload", "available_stacks",
           "hourly_qps", "json_safe", "load_workload", "main", "plan", "slo_checks"]

HOURS_PER_MONTH = 365 * 24 / 12  # 730 h
DAYS_PER_MONTH = 365 / 12
DEFAULT_VIRTUAL_DURATION_S = 300.0
MIN_AUTO_REQUESTS, MAX_AUTO_REQUESTS = 600, 20_000
# Starting guess: a replica serves about this share of the token rate of a full 512-token batch
# (roughly what the one-replica capacities of docs/BENCHMARKS.md sections 1-2 give); the search
# only starts there, every answer is simulated.
GUESS_EFFICIENCY = 0.75
GUESS_TOKEN_BUDGET = 512


# ------------------------------------------------------------------------------------- the stacks

@dataclass(frozen=True)
class Stack:
    key: str
    label: str
    router: str
    scheduler: str
    note: str

    @property
    def pair(self) -> str:
        return f"{self.router}+{self.scheduler}"


STACKS: tuple[Stack, ...] = (
    Stack("default", "Ray Serve default + vLLM default", "pow2", "sarathi-fcfs",
          "Ray Serve's default request router is power-of-two-choices on queue length (router `pow2`); "
          "vLLM V1's default scheduler is chunked prefill with FCFS admission, running requests first "
          "(scheduler preset `sarathi-fcfs`; the preset `vllm` is vLLM v0's no-chunking scheduler, not "
          "the V1 default)"),
    Stack("slai", "our router + SLAI", "slo", "slai-spf-dynamic",
          "the SLO-aware router `slo` with its in-flight ledger + SLAI (shortest prompt first, dynamic "
          "Theta; preset `slai-spf-dynamic`)"),
    Stack("slai-plus", "our router + beyond-the-paper scheduler", "slo", "slai-plus",
          "the router `slo` + the scheduler preset `slai-plus` (only when the registry has it)"),
)
STACK_BY_KEY = {s.key: s for s in STACKS}


def available_stacks() -> list[Stack]:
    """The stacks whose scheduler is in the registry (``slai-plus`` may be absent)."""
    schedulers = set(available_schedulers())
    return [s for s in STACKS if s.scheduler in schedulers]


# ----------------------------------------------------------------------------------- the workload

class PlanError(ValueError):
    """A bad workload file or planner input; the message names the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LognormalTokens(_Strict):
    """Token counts drawn from a lognormal distribution, rounded and clipped."""

    distribution: Literal["lognormal"] = Field(description="selects this distribution")
    mean_tokens: float = Field(gt=0, description="mean of the distribution before clipping (tokens)")
    sigma: float = Field(ge=0, le=4, description="sigma of the underlying normal (spread; 0 = every request "
                                                 "has mean_tokens)")
    min_tokens: int = Field(1, ge=1, description="clip below (tokens)")
    max_tokens: int = Field(8192, ge=1, description="clip above (tokens)")

    @model_validator(mode="after")
    def _check(self) -> LognormalTokens:
        if self.max_tokens < self.min_tokens:
            raise FieldError(("max_tokens",), f"must be >= min_tokens ({self.min_tokens})")
        return self

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        mu = math.log(self.mean_tokens) - self.sigma ** 2 / 2  # so that the mean is mean_tokens
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, size=n)), self.min_tokens, self.max_tokens)

    def describe(self) -> str:
        return (f"lognormal(mean {self.mean_tokens:g}, sigma {self.sigma:g}, "
                f"clipped to {self.min_tokens}..{self.max_tokens})")


class UniformTokens(_Strict):
    """Token counts drawn uniformly from an integer range."""

    distribution: Literal["uniform"] = Field(description="selects this distribution")
    min_tokens: int = Field(ge=1, description="smallest count (tokens, inclusive)")
    max_tokens: int = Field(ge=1, description="largest count (tokens, inclusive)")

    @model_validator(mode="after")
    def _check(self) -> UniformTokens:
        if self.max_tokens < self.min_tokens:
            raise FieldError(("max_tokens",), f"must be >= min_tokens ({self.min_tokens})")
        return self

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.min_tokens, self.max_tokens + 1, size=n)

    def describe(self) -> str:
        return f"uniform({self.min_tokens}..{self.max_tokens})"


TokenDistribution = Annotated[LognormalTokens | UniformTokens, Field(discriminator="distribution")]


class Lengths(_Strict):
    """Prompt and output lengths: a trace, or one parametric distribution for each."""

    trace: str | None = Field(None, description="'paper' (the paper's ShareGPT token counts), a CSV with "
                                                "num_prefill_tokens,num_decode_tokens columns, or a ShareGPT "
                                                "JSON (needs tokenizer); relative paths are from the YAML's folder")
    tokenizer: str | None = Field(None, description="tokenizer.json that counts a ShareGPT JSON trace's tokens")
    max_model_len: int = Field(8192, gt=0, description="ShareGPT JSON: drop conversations longer than this")
    prompt: TokenDistribution | None = Field(None, description="prompt tokens: {distribution: lognormal, "
                                                               "mean_tokens, sigma} or {distribution: uniform, "
                                                               "min_tokens, max_tokens} (instead of trace)")
    output: TokenDistribution | None = Field(None, description="output tokens, as prompt (give both or a trace)")

    @model_validator(mode="after")
    def _check(self) -> Lengths:
        parametric = self.prompt is not None or self.output is not None
        if self.trace is not None and parametric:
            raise FieldError(("trace",), "give either trace or prompt + output, not both")
        if self.trace is None:
            if not parametric:
                raise ValueError("give trace (e.g. 'paper') or both prompt and output distributions")
            if self.prompt is None or self.output is None:
                missing = "prompt" if self.prompt is None else "output"
                raise FieldError((missing,), "parametric lengths need both prompt and output")
        if self.tokenizer is not None and (self.trace is None or not self.trace.lower().endswith(".json")):
            raise FieldError(("tokenizer",), "a tokenizer is only used with a ShareGPT JSON trace")
        return self

    def describe(self) -> str:
        if self.trace is not None:
            return "the paper's ShareGPT trace" if self.trace in ("paper", "sharegpt") else f"trace {self.trace}"
        return f"prompt {self.prompt.describe()}, output {self.output.describe()}"


class SearchSettings(_Strict):
    """How the planner searches and simulates."""

    max_replicas: int = Field(64, ge=1, le=4096, description="largest replica count tried; more needed = infeasible")
    min_replicas: int = Field(1, ge=1, description="diurnal curve: never fewer replicas than this in an hour")
    requests_per_run: int | None = Field(None, ge=20, description="requests per simulation run (default: "
                                         "virtual_duration_s x peak QPS, within 600..20000)")
    virtual_duration_s: float = Field(DEFAULT_VIRTUAL_DURATION_S, gt=0,
                                      description="default run length in virtual seconds at the peak QPS")
    headroom_probes: int = Field(2, ge=0, le=8, description="runs at N replicas above the peak QPS that measure "
                                                            "the headroom (0: skip)")
    seed: int = Field(42, description="seed of arrivals, tier draws, length sampling and pow2's choices")
    kv_blocks: int = Field(PAPER_KV_BLOCKS, gt=0, description="KV-cache blocks of 16 tokens per replica")


class Workload(_Strict):
    """A workload to plan for (the YAML file's top level)."""

    name: str = Field("", description="label for the report (default: the file name)")
    peak_qps: float | None = Field(None, gt=0, description="requests per second to plan for (or diurnal_qps)")
    diurnal_qps: list[tuple[float, float]] | None = Field(
        None, min_length=1, description="a day's load as [hour, qps] points (hours 0..24, increasing; linear "
                                        "between points, wrapping at midnight): planned at its peak, GPU-hours "
                                        "from the replicas each hour needs (instead of peak_qps)")
    lengths: Lengths = Field(default_factory=lambda: Lengths(trace="paper"),
                             description="prompt/output token counts (default: the paper's trace)")
    tiers: list[TierSpec] = Field(default_factory=lambda: list(paper_tiers().tiers), min_length=1,
                                  description="each tier: name, tbt_slo_s (its P99 TBT must be within), "
                                              "ttft_target_s (its median TTFT must be within, default 0.5), "
                                              "share (of the requests; shares sum to 1), rank (optional, 0 = "
                                              "strictest). Default: premium 0.1 s 5 %, free 0.5 s 95 %")
    gpu_profile: str = Field("rtx6000ada-mistral7b", description="cost profile: a name in replica/cost/profiles "
                                                                 "(rtx6000ada-mistral7b, a100-mistral7b, "
                                                                 "h100-mistral7b, ...) or a profile JSON path")
    price_per_gpu_hour_usd: float = Field(ge=0, description="price of one GPU (one replica) per hour, USD")
    search: SearchSettings = Field(default_factory=SearchSettings,
                                   description="search and simulation settings (each optional)")

    @field_validator("tiers")
    @classmethod
    def _tier_mix(cls, tiers: list[TierSpec]) -> list[TierSpec]:
        try:  # checks names, shares and ranks; fills in ranks
            return list(TierMix(tiers=tiers).tiers)
        except ValidationError as e:
            raise ValueError("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())) from None

    @field_validator("diurnal_qps")
    @classmethod
    def _curve(cls, points: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if points is None:
            return None
        for i, (hour, qps) in enumerate(points):
            if not 0 <= hour < 24:
                raise FieldError((i, 0), f"hour must be in [0, 24), got {hour:g}")
            if qps < 0:
                raise FieldError((i, 1), f"qps must be >= 0, got {qps:g}")
            if i and hour <= points[i - 1][0]:
                raise FieldError((i, 0), f"hours must increase, got {hour:g} after {points[i - 1][0]:g}")
        if max(q for _, q in points) <= 0:
            raise ValueError("the curve's peak must be > 0 QPS")
        return points

    @model_validator(mode="after")
    def _load(self) -> Workload:
        if (self.peak_qps is None) == (self.diurnal_qps is None):
            raise FieldError(("peak_qps",), "give exactly one of peak_qps and diurnal_qps")
        return self

    @property
    def peak(self) -> float:
        return self.peak_qps if self.peak_qps is not None else max(q for _, q in self.diurnal_qps)

    def tier_mix(self) -> TierMix:
        return TierMix(tiers=self.tiers)

    def requests_per_run(self) -> int:
        if self.search.requests_per_run is not None:
            return self.search.requests_per_run
        n = math.ceil(self.search.virtual_duration_s * self.peak)
        return min(MAX_AUTO_REQUESTS, max(MIN_AUTO_REQUESTS, n))


def hourly_qps(points: Sequence[tuple[float, float]]) -> list[float]:
    """The QPS to plan each hour 0..23 for: the curve's maximum within [h, h + 1] (the curve is
    linear between points and wraps from the last point to the first one + 24 h)."""
    pts = sorted(points)
    hours = [h for h, _ in pts] + [pts[0][0] + 24]
    values = [q for _, q in pts] + [pts[0][1]]
    hours = [pts[-1][0] - 24] + hours
    values = [pts[-1][1]] + values

    def at(t: float) -> float:
        return float(np.interp(t, hours, values))

    out = []
    for h in range(24):
        inside = [q for t, q in zip(hours, values) if h < t < h + 1]
        out.append(round(max([at(h), at(h + 1), *inside]), 6))
    return out


# --------------------------------------------------------------------------------------- loading

_UNION_TAGS = {"lognormal", "uniform"}


def _format_error(path: Path, root: yaml.Node | None, err: Any) -> str:
    loc = tuple(err["loc"])
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        loc, msg = (*loc, *ctx_error.loc), str(ctx_error)
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    # pydantic puts a discriminated union's tag in the location: lengths.prompt.lognormal.sigma
    loc = tuple(p for i, p in enumerate(loc) if not (p in _UNION_TAGS and i and loc[i - 1] in ("prompt", "output")))
    if err["type"] == "extra_forbidden":
        msg = "unknown field (not in the workload schema; see python -m loadtest.plan --help)"
    elif err["type"] not in ("missing", "value_error") and echo_ok(err.get("input")):
        msg = f"{msg} (got {err['input']!r})"
    field = ".".join(str(p) for p in loc)
    where = yaml_line(path, root, loc)
    return f"{where}: {field}: {msg}" if field else f"{where}: {msg}"


def _is_path(text: str) -> bool:
    return text.lower().endswith((".json", ".csv")) or "/" in text or "\\" in text


def load_workload(path: str | os.PathLike[str]) -> Workload:
    """Read, validate and check a workload YAML: its trace and cost profile are loaded here, so a
    bad file stops before any simulation.  Errors are `PlanError` naming the file, the line and the
    field (one problem per line).  Relative trace, tokenizer and profile paths are resolved
    against the file's folder."""
    path = Path(path)
    try:
        data, root = read_yaml(path, "workload")
    except YAMLReadError as e:
        raise PlanError(str(e)) from None
    if data is None:
        raise PlanError(f"{path}: empty workload file (needs at least peak_qps and price_per_gpu_hour_usd)")
    if not isinstance(data, dict):
        raise PlanError(f"{path}, line 1: a workload is a mapping of fields, got {type(data).__name__}")

    base = path.parent
    lengths = data.get("lengths")
    if isinstance(lengths, dict):
        for key in ("trace", "tokenizer"):
            v = lengths.get(key)
            if isinstance(v, str) and v not in ("paper", "sharegpt") and not Path(v).is_absolute():
                lengths[key] = str(base / v)
    prof = data.get("gpu_profile")
    if isinstance(prof, str) and _is_path(prof) and not Path(prof).is_absolute():
        data["gpu_profile"] = str(base / prof)
    data.setdefault("name", path.stem)

    try:
        workload = Workload.model_validate(data)
    except ValidationError as e:
        raise PlanError("\n".join(_format_error(path, root, err) for err in e.errors())) from None
    try:
        _profile(workload.gpu_profile)
    except ValueError as e:
        raise PlanError(f"{yaml_line(path, root, ('gpu_profile',))}: gpu_profile: {e}") from None
    try:
        lengths_trace(workload.lengths, 1, workload.search.seed)
    except (ValueError, OSError, ImportError) as e:
        loc = ("lengths", "trace") if workload.lengths.trace else ("lengths",)
        raise PlanError(f"{yaml_line(path, root, loc)}: {'.'.join(loc)}: {e}") from None
    return workload


@functools.lru_cache(maxsize=8)
def _profile(name: str) -> CostProfile:
    return load_profile(name)


@functools.lru_cache(maxsize=8)
def _file_trace(name: str, tokenizer: str | None, max_model_len: int) -> Trace:
    return load_trace(name, tokenizer=tokenizer, max_model_len=max_model_len)


def lengths_trace(lengths: Lengths, num_requests: int, seed: int) -> Trace:
    """The token counts to draw requests from: the trace file, or `num_requests` samples of the
    parametric distributions (numpy, `seed`)."""
    if lengths.trace is not None:
        return _file_trace(lengths.trace, lengths.tokenizer, lengths.max_model_len)
    rng = np.random.default_rng(seed)
    prompts = lengths.prompt.sample(num_requests, rng).astype(np.int64)
    outputs = lengths.output.sample(num_requests, rng).astype(np.int64)
    return Trace(prompts, outputs, source=lengths.describe())


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
    wl = SimWorkload.build(trace, setup.requests_per_run, qps, tiers, seed=seed)
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


def _check_text(c: dict[str, Any]) -> str:
    if c["metric"] == "backlog":
        return f"stability ({c['value']} waiting at the last arrival, limit {c['limit']:g})"
    what = {"tbt_p99_s": "P99 TBT", "ttft_p50_s": "median TTFT"}[c["metric"]]
    return f"{c['tier']} {what} {c['value']:.3f}/{c['limit']:g} s"


def binding_text(res: dict[str, Any]) -> str:
    b = res.get("binding")
    if not b:
        return "-"
    c = b["closest_at_n"]
    text = f"{_check_text(c)} ({c['ratio']:.0%}) at N"
    if b["failed_at_n_minus_1"]:
        text += f"; N-1 misses {_check_text(b['failed_at_n_minus_1'][0])}"
    return text


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


# ------------------------------------------------------------------------------------------ output

def _fewer(replicas: int) -> str:
    if not replicas:
        return "as many replicas at the peak"
    return f"{replicas} fewer replica{'s' if replicas > 1 else ''} at the peak"


def _money(x: float) -> str:
    return f"${x:,.0f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result["stacks"].values():
        if r.get("replicas") is None:
            rows.append([r["label"], f"{r['router']} + {r['scheduler']}",
                         f"> {result['workload']['search']['max_replicas']}", "-", "-", "-", "-", "not feasible"])
            continue
        h = r.get("headroom")
        if h is None:
            head = "-"
        else:
            head = (f">= {h['headroom_fraction']:+.0%} (meets {h['max_qps_met']:.4g} QPS, the highest probed)"
                    if h["at_least"] else
                    f"{h['headroom_fraction']:+.0%} (meets {h['max_qps_met']:.4g}, misses {h['first_qps_missed']:.4g} QPS)")
        conf = "yes" if r["confirmed"] else "NO"
        rows.append([r["label"], f"{r['router']} + {r['scheduler']}", str(r["replicas"]), conf,
                     f"{r['gpu_hours_per_month']:,.0f}", _money(r["cost_per_month_usd"]), head, binding_text(r)])
    return rows


TABLE_HEADER = ["stack", "router + scheduler", "replicas N", "N meets, N-1 misses", "GPU-hours/month",
                "cost/month", "headroom at N", "binding SLO"]


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines)


def summary_text(result: dict[str, Any]) -> str:
    w = result["workload"]
    load = (f"peak {result['peak_qps']:g} QPS" if w["diurnal_qps"] is None
            else f"diurnal curve, peak {result['peak_qps']:g} QPS")
    tiers = ", ".join(f"{t['name']} {t['share']:.0%} (P99 TBT <= {t['tbt_slo_s']:g} s, median TTFT <= "
                      f"{t['ttft_target_s']:g} s)" for t in w["tiers"])
    lines = [f"{w['name']}: {load}; {result['lengths']}; {w['gpu_profile']} at "
             f"${w['price_per_gpu_hour_usd']:g}/GPU-hour; tiers {tiers}",
             f"{result['requests_per_run']} requests per run ({result['virtual_duration_at_peak_s']:.0f} s of "
             f"virtual time at the peak), {result['simulation_runs']} runs, {result['wall_s']:.1f} s", "",
             markdown_table(result)]
    s = result["savings_vs_default"]
    if s is not None and s["best"] == s["baseline"]:
        lines += ["", f"Fewest GPU-hours: {result['stacks'][s['best']]['label']} (the baseline; no stack needs fewer)."]
    elif s is not None:
        st = result["stacks"]
        lines += ["", f"Best: {st[s['best']]['label']}: {_fewer(s['replicas'])}, "
                      f"{s['gpu_hours_per_month']:,.0f} GPU-hours and {_money(s['cost_per_month_usd'])} less per "
                      f"month than {st[s['baseline']]['label']} ({s['fraction']:.0%})."]
    for r in result["stacks"].values():
        if r.get("hourly"):
            lines.append(f"{r['label']}: replicas by hour " + " ".join(str(h["replicas"]) for h in r["hourly"]))
    return "\n".join(lines) + "\n"


def json_safe(x: Any) -> Any:
    """`x` with NaN and infinities as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------------------------- CLI

def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def field_help(model: type[BaseModel] = Workload, prefix: str = "") -> list[str]:
    """One line per field (nested models and list items included), from the models' own types,
    defaults, constraints and Field descriptions."""
    lines = []
    for name, f in model.model_fields.items():
        path = prefix + name
        default = "required" if f.is_required() else (
            "optional" if f.default is None else f"default {f.default!r}")
        if f.default_factory is not None:
            default = "default: see the description"
        limits = [f"{attr} {getattr(m, attr)}" for m in f.metadata
                  for attr in ("gt", "ge", "lt", "le", "min_length", "max_length") if hasattr(m, attr)]
        desc = f.description or ""
        extra = f"; {', '.join(limits)}" if limits else ""
        lines.append(f"  {path}  ({_type_name(f.annotation)}, {default}{extra})")
        if desc:
            lines.append(textwrap.fill(desc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        models = _models_in(f.annotation)
        is_list = typing.get_origin(f.annotation) is list
        for m in models:
            tag = m.model_fields.get("distribution")
            sub = f"{path}[]." if is_list else f"{path}."
            if tag is not None and len(models) > 1:
                lines.append(f"  {path} as {{distribution: {typing.get_args(tag.annotation)[0]}, ...}}:")
            lines += field_help(m, sub)
    return lines


def _epilog() -> str:
    def fill(text: str, indent: int) -> str:
        return textwrap.fill(text, width=100, initial_indent=" " * indent, subsequent_indent=" " * indent)

    stacks = "\n".join(f"  {s.key}: {s.label} = router {s.router} + scheduler {s.scheduler}\n{fill(s.note, 6)}"
                       for s in STACKS)
    return ("workload fields (YAML; examples in loadtest/workloads/):\n" + "\n".join(field_help())
            + "\n\nstacks (--stacks):\n" + stacks + "\n\ncriterion:\n" + fill(CRITERION, 2)
            + "\n\nGPU-hours per month: N x 730 h; with diurnal_qps, 365/12 x the sum of each hour's replicas.")


def _stacks_arg(text: str) -> list[Stack]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    avail = {s.key: s for s in available_stacks()}
    bad = [k for k in keys if k not in avail]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown or unavailable stack(s) {bad or text!r}; available: "
                                         f"{', '.join(avail)}")
    return [avail[k] for k in keys]


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected >= {minimum}, got {v}")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.plan", description=__doc__, epilog=_epilog(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", help="workload YAML file")
    ap.add_argument("--html", default=None, help="write the HTML report (one self-contained file) here")
    ap.add_argument("--json", default=None, help="write the full result (every simulated point) here")
    ap.add_argument("--stacks", type=_stacks_arg, default=None,
                    help="comma-separated stack keys (default: every available one: "
                         f"{', '.join(s.key for s in available_stacks())})")
    ap.add_argument("--requests", type=_int_at_least(20), default=None,
                    help="requests per simulation run (default: search.requests_per_run, else "
                         "search.virtual_duration_s x peak QPS within 600..20000)")
    ap.add_argument("--jobs", type=_int_at_least(1), default=None, help="worker processes (default: all cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        workload = load_workload(a.workload)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = plan(workload, a.stacks, jobs=a.jobs, progress=not a.quiet, requests_per_run=a.requests)
    print(summary_text(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(json_safe(result), indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    if a.html:
        from loadtest.plan_report import write_html

        write_html(result, Path(a.html))
        print(f"wrote {a.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
