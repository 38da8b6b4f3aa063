"""GPU + model cost profiles: how long one engine iteration takes for a given batch shape.

Iteration-time model (ms), with N = tokens in the batch (prefill tokens + decodes):

    t_ms = base_ms
         + per_token_ms   * N                       linear layers, KV write
         + prefill_sq_ms  * sum_i p_i^2             prefill attention within each chunk
         + prefill_ctx_ms * sum_i p_i * c_i         prefill attention to the chunk's prior context
         + decode_ctx_ms  * sum_j ctx_j             decode attention (reads each decode's KV)
         + mixed_ms       * [prefill chunks and decodes both in the batch]
         + per_decode_ms  * D                       each decode's own work beside its token
                                                    (D = decodes in the batch)

and an empty batch costs 0. `mixed_ms` and `per_decode_ms` are measured for the CPU engine only
(an iteration that mixes prefills and decodes costs more than the other terms say there, and a
decode more than a prefill token: its logits row, sampling and output processing are per request);
GPU profiles leave them 0.
A profile may add the engine's own costs around the batch (`EngineOverheads`, also measured for
the CPU engine only: taking in an arriving request, a prefill chunk beyond the shape model, the
first steps after the engine sat idle); GPU profiles have none. There is no tile-padding term:
the Vidur linear-layer data does not show padding steps (see docs/cost_profiles.md).
`tile_tokens` is still carried for schedulers that align batch sizes (RAD).

Profiles are JSON files in `profiles/`, written by `python -m loadtest.calibrate`.
"""

from __future__ import annotations

import bisect
import json
import math
from operator import itemgetter
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from replica.cost.model import CostModel
from replica.cost.shape import BatchShape

PROFILES_DIR = Path(__file__).parent / "profiles"
# The paper's GPU and model (RTX 6000 Ada, Mistral-7B): the simulated replica's default profile
DEFAULT_COST_PROFILE = "rtx6000ada-mistral7b"

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_first = itemgetter(0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Coefficients(_Strict):
    """The coefficients of the iteration-time model (the module docstring), all in milliseconds."""

    base_ms: NonNegative  # per iteration (weights read once, launch and CPU overhead)
    per_token_ms: NonNegative  # per batch token
    prefill_sq_ms: NonNegative  # per (new prefill tokens of a chunk)^2
    prefill_ctx_ms: NonNegative  # per new prefill token x prior-context token of its request
    decode_ctx_ms: NonNegative  # per context token of each decode
    mixed_ms: NonNegative = 0.0  # per iteration running both prefill chunks and decodes
    per_decode_ms: NonNegative = 0.0  # per decode in the batch, beyond its token's per_token_ms

    @model_serializer(mode="wrap")
    def _omit_unused_terms(self, handler):  # the GPU profiles' JSON stays as it was
        out = handler(self)
        for name in ("mixed_ms", "per_decode_ms"):
            if getattr(self, name) == 0.0:
                out.pop(name, None)
        return out


class EngineOverheads(_Strict):
    """What an engine spends beside the batch-shape model above (ms), added to an iteration by
    the simulated engine (`replica.sim.engine.SimEngine.begin`):

        intake_ms * (requests taken in since the last iteration)
      + prefill_chunk_ms * (prefill chunks in this iteration)
      + wake_ms_per_e_fold * ln(idle_s / wake_after_idle_s)      if idle_s > wake_after_idle_s
        (or, with `wake_curve`, the measured curve at idle_s)
      + the wake's tail: wake_tail_ratio^k of that on the k-th iteration after it

    - intake: the engine thread's own work to take in a request (vLLM in-process:
      `LLMEngine.add_request`), done between iterations, so it delays the next one;
    - prefill chunk: what a prefill costs on a serving engine beyond the shape model fitted on a
      repeated grid (whose medians see every attention shape warm; a serving engine rarely sees
      the same prompt and context twice);
    - wake: the first iteration after the engine sat idle for idle_s is slower, the more so the
      longer it sat (caches gone cold), and the next few a little (a geometric tail).  Either a
      line in ln(idle_s) (`wake_ms_per_e_fold` above `wake_after_idle_s`) or a measured curve
      (`wake_curve`: (idle_s, ms) points, ascending; linear in ln(idle_s) between them, nothing
      below the first, the last one's beyond it), not both.

    Measured for the CPU engine only (`python -m loadtest.sim_to_real fit`, from a Poisson run's
    own steps and requests run one at a time after set idle gaps; its docstring says how). GPU
    profiles have none: `CostProfile.overheads` is None."""

    intake_ms: NonNegative = 0.0
    prefill_chunk_ms: NonNegative = 0.0
    wake_ms_per_e_fold: NonNegative = 0.0
    wake_after_idle_s: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    wake_curve: tuple[tuple[Annotated[float, Field(gt=0.0, allow_inf_nan=False)], NonNegative], ...] = ()
    wake_tail_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    source: str = ""  # how they were measured

    @model_validator(mode="after")
    def _one_wake_model(self) -> "EngineOverheads":
        idle = [x for x, _ in self.wake_curve]
        if any(b <= a for a, b in zip(idle, idle[1:])):
            raise ValueError(f"wake_curve: idle times must ascend, got {idle}")
        if self.wake_curve and self.wake_ms_per_e_fold:
            raise ValueError("give the wake as wake_curve or as wake_ms_per_e_fold, not both")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_curve(self, handler):  # profiles with the line keep their JSON as it was
        out = handler(self)
        if not self.wake_curve:
            out.pop("wake_curve", None)
        return out

    def wake_s(self, idle_s: float) -> float:
        """The first iteration's wake cost after `idle_s` idle (s)."""
        curve = self.wake_curve
        if curve:
            if idle_s < curve[0][0]:
                return 0.0
            k = bisect.bisect_right(curve, idle_s, key=_first)
            if k == len(curve):
                return curve[-1][1] / 1000.0
            (x0, y0), (x1, y1) = curve[k - 1], curve[k]
            return (y0 + (y1 - y0) * math.log(idle_s / x0) / math.log(x1 / x0)) / 1000.0
        if idle_s <= self.wake_after_idle_s:
            return 0.0
        return self.wake_ms_per_e_fold * math.log(idle_s / self.wake_after_idle_s) / 1000.0

    def iteration_s(self, num_taken_in: int, num_prefill_chunks: int, idle_s: float,
                    tail_s: float = 0.0) -> tuple[float, float]:
        """Seconds added to an iteration with `num_prefill_chunks` prefill chunks, run after the
        engine took in `num_taken_in` requests and sat idle for `idle_s` (0 if busy), `tail_s`
        being what earlier wakes' tails owe it; and the tail it leaves the next iteration (s)."""
        wake = self.wake_s(idle_s) + tail_s
        intake_and_chunks = (self.intake_ms * num_taken_in + self.prefill_chunk_ms * num_prefill_chunks) / 1000.0
        return intake_and_chunks + wake, wake * self.wake_tail_ratio


class FitPoint(_Strict):
    label: str
    measured_ms: float
    predicted_ms: float
    rel_error: float  # predicted / measured - 1


class FitError(_Strict):
    """Relative errors of the profile against the points it was fitted to."""

    num_points: int = Field(gt=0)
    mean_rel_error: NonNegative  # mean |predicted / measured - 1|
    max_rel_error: NonNegative
    points: list[FitPoint] = []  # listed when there are few; else see `loadtest.calibrate --per-point`


class Provenance(_Strict):
    sources: list[str] = Field(min_length=1)
    fitted_to: str  # which measurements, what was fitted, how
    tile_tokens_source: str  # where `tile_tokens` comes from
    tile_padding_term: str  # why the model has (or has not) a tile-padding term
    fit_error: FitError
    notes: list[str] = []


class _TimeFn:
    """The hot path: plain floats, no pydantic. Coefficients converted to seconds once."""

    __slots__ = ("base_s", "per_token_s", "prefill_sq_s", "prefill_ctx_s", "decode_ctx_s")

    def __init__(self, c: Coefficients) -> None:
        self.base_s = c.base_ms / 1000.0
        self.per_token_s = c.per_token_ms / 1000.0
        self.prefill_sq_s = c.prefill_sq_ms / 1000.0
        self.prefill_ctx_s = c.prefill_ctx_ms / 1000.0
        self.decode_ctx_s = c.decode_ctx_ms / 1000.0

    def time_s(self, shape: BatchShape) -> float:
        num_tokens = shape.num_prefill_tokens + shape.num_decodes
        if num_tokens == 0:
            return 0.0
        return (
            self.base_s
            + self.per_token_s * num_tokens
            + self.prefill_sq_s * shape.sum_prefill_sq
            + self.prefill_ctx_s * shape.sum_prefill_ctx
            + self.decode_ctx_s * shape.sum_decode_ctx
        )


    def decode_stretch_times_s(self, num_decodes: int, sum_decode_ctx: int, num_iterations: int) -> np.ndarray:
        """Durations of `num_iterations` back-to-back decode-only iterations of the same
        `num_decodes` requests (each context grows by one token per iteration); element j equals
        `time_s` of that iteration's shape exactly (same operations, same order)."""
        ctx = sum_decode_ctx + num_decodes * np.arange(num_iterations, dtype=np.float64)
        return self.base_s + self.per_token_s * num_decodes + self.prefill_sq_s * 0 + self.prefill_ctx_s * 0 + self.decode_ctx_s * ctx

    def decode_stretch_ends_s(self, num_decodes: int, sum_decode_ctx: int, start_s: float, max_iterations: int,
                              until_s: float) -> list[float]:
        """`CostModel.decode_stretch_ends_s` in plain floats, computing only the ends it returns
        (stretches are short: numpy's per-call overhead cost more).  Each duration is
        `decode_stretch_times_s`'s element, by the same operations in the same order, and the ends
        are its running sum from `start_s`, so the floats are the same to the last bit."""
        fixed_s = self.base_s + self.per_token_s * num_decodes + self.prefill_sq_s * 0 + self.prefill_ctx_s * 0
        per_ctx_s = self.decode_ctx_s
        ends: list[float] = []
        t = start_s
        for j in range(max_iterations):
            t += fixed_s + per_ctx_s * (sum_decode_ctx + num_decodes * j)
            ends.append(t)
            if t >= until_s:
                break
        return ends


class _EngineTimeFn(_TimeFn):
    """`_TimeFn` plus the CPU engine's terms, the mixed-batch one and the per-decode one (a profile
    with either > 0 only: the GPU profiles' hot path stays as it was).  Each stretch duration is
    `time_s` of its iteration's shape by the same operations in the same order (a stretch has no
    prefill, so no mixed term)."""

    __slots__ = ("mixed_s", "per_decode_s")

    def __init__(self, c: Coefficients) -> None:
        super().__init__(c)
        self.mixed_s = c.mixed_ms / 1000.0
        self.per_decode_s = c.per_decode_ms / 1000.0

    def time_s(self, shape: BatchShape) -> float:
        # the five terms, then the per-decode one (0 for an empty batch), then the mixed one
        num_decodes = shape.num_decodes
        t = _TimeFn.time_s(self, shape) + self.per_decode_s * num_decodes
        if shape.num_prefill_tokens and num_decodes:
            t += self.mixed_s
        return t

    def decode_stretch_times_s(self, num_decodes: int, sum_decode_ctx: int, num_iterations: int) -> np.ndarray:
        return _TimeFn.decode_stretch_times_s(self, num_decodes, sum_decode_ctx, num_iterations) \
            + self.per_decode_s * num_decodes

    def decode_stretch_ends_s(self, num_decodes: int, sum_decode_ctx: int, start_s: float, max_iterations: int,
                              until_s: float) -> list[float]:
        fixed_s = self.base_s + self.per_token_s * num_decodes + self.prefill_sq_s * 0 + self.prefill_ctx_s * 0
        per_ctx_s = self.decode_ctx_s
        decodes_s = self.per_decode_s * num_decodes
        ends: list[float] = []
        t = start_s
        for j in range(max_iterations):
            t += fixed_s + per_ctx_s * (sum_decode_ctx + num_decodes * j) + decodes_s
            ends.append(t)
            if t >= until_s:
                break
        return ends


def _time_fn(c: Coefficients) -> _TimeFn:
    return _EngineTimeFn(c) if c.mixed_ms or c.per_decode_ms else _TimeFn(c)


class CostProfile(_Strict, CostModel):
    name: str = Field(min_length=1)
    gpu: str
    model: str
    coefficients: Coefficients
    # GEMM tile, in tokens, that a RAD scheduler aligns batch sizes to (not used in the timing).
    tile_tokens: int = Field(gt=0)
    provenance: Provenance
    # What the engine spends beside the batch shape (None: nothing, as for every GPU profile).
    overheads: EngineOverheads | None = None

    @model_serializer(mode="wrap")
    def _omit_no_overheads(self, handler):  # the GPU profiles' JSON stays as it was
        out = handler(self)
        if self.overheads is None:
            out.pop("overheads", None)
        return out

    def model_post_init(self, _context: object) -> None:
        # Shadow the method below with a bound method of a plain object: the simulator calls
        # this millions of times and pydantic attribute access would dominate its cost.
        fn = _time_fn(self.coefficients)
        object.__setattr__(self, "iteration_time_s", fn.time_s)
        object.__setattr__(self, "decode_stretch_times_s", fn.decode_stretch_times_s)
        object.__setattr__(self, "decode_stretch_ends_s", fn.decode_stretch_ends_s)

    def iteration_time_s(self, shape: BatchShape) -> float:  # replaced per instance, see above
        return _time_fn(self.coefficients).time_s(shape)

    def decode_stretch_times_s(self, num_decodes: int, sum_decode_ctx: int, num_iterations: int) -> np.ndarray:
        return _time_fn(self.coefficients).decode_stretch_times_s(num_decodes, sum_decode_ctx, num_iterations)

    def decode_stretch_ends_s(self, num_decodes: int, sum_decode_ctx: int, start_s: float, max_iterations: int,
                              until_s: float) -> list[float]:
        return _time_fn(self.coefficients).decode_stretch_ends_s(num_decodes, sum_decode_ctx, start_s, max_iterations,
                                                                until_s)

    def model_copy(self, *, update=None, deep: bool = False) -> "CostProfile":
        copy = super().model_copy(update=update, deep=deep)
        copy.model_post_init(None)  # the copied timing function may be stale after `update`
        return copy


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    """Names of the shipped profiles (the JSON files in `profiles/`)."""
    return sorted(p.stem for p in profiles_dir.glob("*.json"))


def load_profile(name_or_path: str | Path) -> CostProfile:
    """Load a profile by name (`a100-mistral7b`) or by path to a JSON file.

    Raises ValueError naming the file for unknown names, unreadable or malformed files (with the
    line for JSON syntax errors and the field for validation errors).
    """
    text = str(name_or_path)
    by_path = isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text or "\\" in text
    path = Path(text) if by_path else PROFILES_DIR / f"{text}.json"
    if not path.is_file():
        if by_path:
            raise ValueError(f"cost profile file {path} does not exist")
        raise ValueError(f"unknown cost profile {text!r} (no {path}); available: {available_profiles()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read cost profile: {e}") from None
    try:
        profile = CostProfile.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field {'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{path}: invalid cost profile: {problems}") from None
    if not by_path and profile.name != text:
        raise ValueError(f"{path}: profile name {profile.name!r} does not match the file name")
    return profile
