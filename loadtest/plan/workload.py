"""The workload to plan for (`Workload`, read from YAML by `load_workload`, errors as `PlanError`
naming the file, line and field), the request lengths it draws from (`lengths_trace`), and the
field reference `python -m loadtest.plan --help` prints (`field_help`)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loadtest.arrivals import wrapped_curve
from replica.cost.profile import DEFAULT_COST_PROFILE, CostProfile, load_profile
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.seeds import stream_rng
from replica.tiers import TierMix, TierSpec, paper_tiers
from replica.traces import Trace, load_trace
from serve_app.field_help import field_help as render_field_help
from serve_app.yaml_source import FieldError, YAMLReadError, echo_ok, read_yaml, yaml_line

__all__ = ["Lengths", "LognormalTokens", "PlanError", "SearchSettings", "UniformTokens", "Workload",
           "field_help", "hourly_qps", "lengths_trace", "load_workload"]

DEFAULT_VIRTUAL_DURATION_S = 300.0
MIN_AUTO_REQUESTS, MAX_AUTO_REQUESTS = 600, 20_000


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

    trace: str | None = Field(None, description="'paper' (the paper's ShareGPT token counts), 'mooncake' (a "
                                                "production chat trace with prefix hashes), a CSV with "
                                                "num_prefill_tokens,num_decode_tokens columns, a ShareGPT JSON "
                                                "(needs tokenizer), or a Mooncake-style JSONL with prefix hashes "
                                                "(replayed in order; the replicas then have vLLM's prefix cache); "
                                                "relative paths are from the YAML's folder")
    tokenizer: str | None = Field(None, description="tokenizer.json that counts a ShareGPT JSON trace's tokens")
    max_model_len: int | None = Field(None, gt=0, description="drop requests longer than this (ShareGPT JSON: "
                                                              "default 8192; JSONL: default 32768)")
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
    gpu_profile: str = Field(DEFAULT_COST_PROFILE, description="cost profile: a name in replica/cost/profiles "
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
    hours, values = wrapped_curve(points)

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
    parametric distributions (numpy, the seed's "lengths" stream: `replica.seeds`)."""
    if lengths.trace is not None:
        return _file_trace(lengths.trace, lengths.tokenizer, lengths.max_model_len)
    rng = stream_rng(seed, "lengths")
    prompts = lengths.prompt.sample(num_requests, rng).astype(np.int64)
    outputs = lengths.output.sample(num_requests, rng).astype(np.int64)
    return Trace(prompts, outputs, source=lengths.describe())


# ------------------------------------------------------------------------------- field reference

def field_help(model: type[BaseModel] = Workload, prefix: str = "") -> list[str]:
    """One line per field (nested models and list items included), from the models' own types,
    defaults, constraints and Field descriptions (`serve_app.field_help`, the renderer the app's
    ``python -m serve_app --help`` uses too)."""
    return render_field_help(model, prefix)
