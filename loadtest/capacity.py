"""Capacity of the live Serve endpoint, measured with locust (open-loop Poisson arrivals).

  python -m loadtest.capacity --host http://127.0.0.1:8000 --qps 0.5,1,1.5 --step-seconds 90 --out DIR
  python -m loadtest.capacity --serve replicas.num_replicas=2 --qps 1,2,3 --step-seconds 90 --out DIR
  python -m loadtest.capacity --from-samples DIR        # rebuild the report from DIR's raw samples

For every offered QPS it runs ``locust -f loadtest/locustfile.py --headless`` (a subprocess: locust's
gevent patching and Ray do not mix in one process) for ``--step-seconds`` of Poisson arrivals plus a
drain (``--mode per-step``, the default: every step starts from an idle system, as the
virtual-time simulator's runs do), or once with every step in sequence (``--mode shape``).  The
locustfile writes one JSON line per request (TTFT, every token gap, status, schedule lag); the
statistics here come from those raw samples, so P99s are exact (locust's own percentiles, in its
CSV, are bucketed approximations).  Each step's statistics are `loadtest.metrics.summarize`'s, and
the capacity is `loadtest.metrics.capacity_bracket`'s: the largest offered QPS whose median TTFT is
at most 0.5 s and every tier's P99 TBT within its SLO, with every lower QPS passing too.  A request
that failed or never got its first token counts with an infinite TTFT.

Output (``--out``): ``capacity.json`` (every point, the capacity, the commands), ``capacity.md``
(a table), ``ttft_vs_qps.png`` (TTFT p50/p99 per tier), ``tbt_p99_vs_qps.png`` (per tier, with its
SLO) and ``steps/qps-Q/`` (raw samples, locust's CSV and log).

``--serve ARG ...`` starts ``python -m serve_app ARG ... http.port=FREE`` first (its own process
group, a closed Ray cluster: every port on 127.0.0.1 (serve_app/ray_loopback.py), a private
RAY_TMPDIR, fresh API keys, Ray token authentication with a token of the launch's own), waits for
``/health``, measures, then stops it (SIGTERM, wait; SIGKILL of that process group only if it
hangs).  Without it, API keys come from ``--keys`` or the environment
(LOADTEST_KEYS='premium=KEY,free=KEY' or TIERED_API_KEYS='KEY:TIER,...').

This module also holds the pieces the locustfile uses that need no locust (so tests can import
them without gevent's monkey patching): the arrival schedule, prompt synthesis, key parsing and
the SSE stream recorder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from loadtest.arrivals import effective_qps, poisson_arrival_times
from loadtest.cli_args import parse_positive_floats as parse_floats  # (the locustfile imports it from here)
from loadtest.ports import free_port
from loadtest.metrics import (
    P99_TTFT_BOUND_S,
    STABLE_BACKLOG_FRACTION,
    TTFT_P50_LIMIT_S,
    capacity_bracket,
    p99_ttft_ok,
    summarize,
)
from replica.traces import Trace, sample_requests
from replica.tiers import TierMix

__all__ = [
    "Arrival",
    "PromptSynth",
    "StreamRecorder",
    "build_schedule",
    "capacity_of",
    "launch_app",
    "load_samples",
    "parse_keys",
    "step_points",
    "write_report",
]

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LATE_S = 0.05  # a request sent more than this after its scheduled arrival is "late"
DEFAULT_MAX_CONTEXT = 8192  # serve_app.ingress.DEFAULT_MAX_CONTEXT_TOKENS


# ------------------------------------------------------------------------------------ parsing

def parse_keys(text: str) -> dict[str, str]:
    """API keys per tier from ``premium=KEY,free=KEY`` or TIERED_API_KEYS' ``KEY:TIER,KEY:TIER``
    (the first key of each tier wins)."""
    keys: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if "=" in part:
            tier, _, key = part.partition("=")
        elif ":" in part:
            key, _, tier = part.rpartition(":")
        else:
            raise ValueError(f"API key entry {part!r}: expected TIER=KEY or KEY:TIER")
        tier, key = tier.strip(), key.strip()
        if not tier or not key:
            raise ValueError(f"API key entry {part!r}: empty tier or key")
        keys.setdefault(tier, key)
    return keys


def keys_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    for var in ("LOADTEST_KEYS", "TIERED_API_KEYS"):
        if env.get(var, "").strip():
            return parse_keys(env[var])
    return {}


# ----------------------------------------------------------------------------- the schedule

@dataclass(frozen=True)
class Arrival:
    """One scheduled request: ``t_s`` seconds after the run's origin."""

    index: int
    step: int
    qps: float
    t_s: float
    tier: str
    prompt_tokens: int
    max_tokens: int


def _step_times(qps: float, seconds: float, seed: int, max_gap_factor: float) -> np.ndarray:
    n = int(qps * seconds * 1.3) + 16
    while True:  # the paper's capped-exponential gaps (loadtest.arrivals); enough of them to pass `seconds`
        t = poisson_arrival_times(n, qps, seed=seed, max_gap_factor=max_gap_factor)
        if t[-1] >= seconds:
            return t[t < seconds]
        n *= 2


def build_schedule(steps: Sequence[tuple[float, float]], tiers: TierMix, trace: Trace, *, seed: int = 42,
                   max_gap_factor: float = 3.0, max_prompt_tokens: int | None = None,
                   max_output_tokens: int | None = None,
                   max_context_tokens: int = DEFAULT_MAX_CONTEXT) -> list[Arrival]:
    """Every request of a run, fixed before it starts (so the offered load cannot depend on
    response times): for step k (``steps[k] = (qps, seconds)``) Poisson arrivals at ``qps`` over
    ``seconds`` (gaps capped at ``max_gap_factor/qps``, as the paper's and the simulator's), offset
    by the earlier steps' durations.  Lengths and tiers are drawn as the simulator's workload
    (``sample_requests`` and ``TierMix.assign`` with ``seed``; arrivals of step k with ``seed + k``),
    so a one-step schedule holds the simulator's first requests at that QPS.  Prompts and outputs
    are clamped to ``max_prompt_tokens``/``max_output_tokens``, and the output shortened so that
    prompt + output fits ``max_context_tokens``."""
    if not steps:
        raise ValueError("no steps")
    times, step_idx, qps_of = [], [], []
    origin = 0.0
    for k, (qps, seconds) in enumerate(steps):
        if not (qps > 0 and seconds > 0):
            raise ValueError(f"step {k}: qps and seconds must be > 0, got {qps}, {seconds}")
        t = _step_times(qps, seconds, seed + k, max_gap_factor)
        times.append(origin + t)
        step_idx += [k] * len(t)
        qps_of += [float(qps)] * len(t)
        origin += seconds
    t_all = np.concatenate(times)
    n = len(t_all)
    prompts, outputs = sample_requests(trace, n, seed=seed)
    tier_idx = tiers.assign(n, seed=seed)
    names = tiers.names
    out = []
    for i in range(n):
        p = int(prompts[i]) if max_prompt_tokens is None else min(int(prompts[i]), max_prompt_tokens)
        p = min(p, max_context_tokens - 1)
        o = int(outputs[i]) if max_output_tokens is None else min(int(outputs[i]), max_output_tokens)
        o = max(1, min(o, max_context_tokens - p))
        out.append(Arrival(i, step_idx[i], qps_of[i], float(t_all[i]), names[int(tier_idx[i])], p, o))
    return out


# ------------------------------------------------------------------------------- prompts

class PromptSynth:
    """Prompt text of an exact token count for a tokenizer (anything with ``encode(text) -> ids``
    and ``decode(ids) -> text``; `serve_app.tokenizer.Tokenizer` for the ingress's own).

    The words are the vocabulary's alphabetic tokens with a leading space (" the") that add
    exactly one token to a text: a pre-tokenizer that splits at spaces (byte-level BPE, Metaspace)
    keeps them one token each, so n words are n tokens, plus whatever the tokenizer adds at the
    start of a text; a few re-encode rounds take that off."""

    MAX_WORDS = 2000

    def __init__(self, tokenizer: Any, seed: int = 0, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        size = vocab_size or int(getattr(tokenizer, "vocab_size", 0))
        words: list[str] = []
        seen: set[str] = set()
        for i in range(size):
            s = " " + tokenizer.decode([i]).strip()
            if s in seen or not re.fullmatch(r" [A-Za-z]{2,12}", s):
                continue
            seen.add(s)
            if self.count(s * 3) - self.count(s * 2) == 1 and self.count(s * 2) - self.count(s) == 1:
                words.append(s)
                if len(words) >= self.MAX_WORDS:
                    break
        if len(words) < 8:
            raise ValueError(f"{tokenizer!r}: found only {len(words)} single-token words; cannot synthesise prompts")
        self.words = words
        self.rng = np.random.default_rng(seed)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def text(self, n_tokens: int) -> str:
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        picks = [self.words[i] for i in self.rng.integers(len(self.words), size=n_tokens)]
        for _ in range(50):
            text = "".join(picks)
            diff = self.count(text) - n_tokens
            if diff == 0:
                return text
            if diff > 0:
                del picks[-min(diff, len(picks) - 1):]
            else:
                picks += [self.words[i] for i in self.rng.integers(len(self.words), size=-diff)]
        raise ValueError(f"could not synthesise a prompt of exactly {n_tokens} tokens with {self.tokenizer!r}")


# --------------------------------------------------------------------------- the SSE stream

@dataclass
class StreamRecorder:
    """Times one streamed completion from its SSE lines, fed one line at a time as read.

    ``t0`` is the send time; ``feed(line, t)`` with the read time.  Every event with a choice is a
    token arrival (the ingress sends one per replica message; the last one also carries the
    ``finish_reason``, as vLLM's server sends it), but a chat stream's opening role event and a
    text-less finish-only event; an event that carries k tokens (its ``usage``, with
    ``continuous_usage_stats``, says how many) counts k arrivals at once; TTFT is the first
    one's time minus ``t0`` and the TBT gaps are the times between consecutive ones.  An event
    with an ``error`` object, malformed JSON or a missing ``[DONE]`` is an error."""

    t0: float
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False

    def feed(self, line: str, t: float) -> None:
        if not line or line.startswith(":") or self.done:
            return
        if not line.startswith("data:"):
            return  # event:/id:/retry: fields carry nothing here
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.error = self.error or f"malformed SSE data: {data[:120]!r}"
            return
        if not isinstance(obj, dict):
            self.error = self.error or f"unexpected SSE data: {data[:120]!r}"
            return
        if obj.get("error"):
            err = obj["error"]
            self.error = self.error or f"error event: {err.get('message') if isinstance(err, dict) else err}"
            return
        usage = obj.get("usage")
        before = self.usage.get("completion_tokens") if isinstance(self.usage, dict) else None
        if usage:
            self.usage = usage
        for choice in obj.get("choices") or []:
            delta = choice.get("delta")
            if isinstance(delta, dict) and not delta.get("content") and "role" in delta:
                continue  # a chat stream's opening role-only event is no token
            text = choice.get("text") if "text" in choice else (delta or {}).get("content")
            if choice.get("finish_reason") is None or text:
                # an event carrying k tokens (continuous usage says k): they arrive together, one gap
                # and k - 1 gaps of 0, as the client sees them
                now = usage.get("completion_tokens") if isinstance(usage, dict) else None
                k = now - (before or 0) if isinstance(now, int) and now > (before or 0) else 1
                self.token_times.extend([t] * k)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.t0 if self.token_times else None

    def gaps_s(self) -> list[float]:
        tt = self.token_times
        return [b - a for a, b in zip(tt, tt[1:])]

    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return len(self.token_times)

    def check(self, max_tokens: int | None = None) -> str | None:
        """Why the finished stream is a failure, or None."""
        if self.error:
            return self.error
        if not self.done:
            return "stream ended without data: [DONE]"
        if not self.token_times:
            return "no tokens"
        if max_tokens is not None and self.completion_tokens() != max_tokens:
            return f"{self.completion_tokens()} completion tokens, expected {max_tokens} (ignore_eos)"
        return None


# ----------------------------------------------------------------------------- statistics

def load_samples(paths: Path | str | Iterable[Path | str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metas, records) from one or more samples JSONL files (a ``{"meta": ...}`` line per run,
    then one line per request).  Each record gets ``run`` (index into metas)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    metas: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}, line {n}: {e}") from None
                if "meta" in obj:
                    metas.append(obj["meta"])
                else:
                    if not metas:
                        raise ValueError(f"{path}, line {n}: a sample before the meta line")
                    obj["run"] = len(metas) - 1
                    records.append(obj)
    return metas, records


def _tiers_of(meta: Mapping[str, Any]) -> TierMix:
    return TierMix.model_validate({"tiers": meta["tiers"]})


class _Workload(SimpleNamespace):
    """What `loadtest.metrics.summarize` reads of a workload."""

    def __len__(self) -> int:
        return len(self.tier_idx)


def _q(x: np.ndarray, q: float) -> float:
    return float(np.quantile(x, q, method="inverted_cdf")) if len(x) else float("nan")


def step_points(metas: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                warmup_s: float = 0.0, ttft_p50_limit_s: float = TTFT_P50_LIMIT_S) -> list[dict[str, Any]]:
    """One statistics point per (run, step): `loadtest.metrics.summarize` over the step's
    requests (those that arrived after ``warmup_s`` into the step), plus the client's view:
    failures, unfinished requests, schedule lag, arrival rate.  Sorted by offered QPS.

    TTFT is send to first token; a failed or unfinished request counts as an infinite TTFT.  TBT:
    every gap observed, per tier.  ``waiting_at_last_arrival``: requests sent before the step's
    last one that had no first token when it was sent (the simulator's backlog test)."""
    groups: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["run"], r["step"]), []).append(r)
    points = []
    for (run, step), recs in sorted(groups.items()):
        meta = metas[run]
        qps, seconds = meta["steps"][step]
        start = sum(s for _, s in meta["steps"][:step])
        recs = sorted((r for r in recs if r["t_sched"] - start >= warmup_s), key=lambda r: r["t_sched"])
        if not recs:
            continue
        points.append(_point(meta, recs, float(qps), float(seconds) - warmup_s, ttft_p50_limit_s))
    return sorted(points, key=lambda p: p["qps"])


def _point(meta: Mapping[str, Any], recs: list[Mapping[str, Any]], qps: float, seconds: float,
           ttft_p50_limit_s: float) -> dict[str, Any]:
    tiers = _tiers_of(meta)
    names = tiers.names
    slo = {t.name: t.tbt_slo_s for t in tiers.tiers}
    n = len(recs)
    ttft = np.array([r["ttft_s"] if (r["ok"] and r["ttft_s"] is not None) else math.inf for r in recs], dtype=float)
    tier_idx = np.array([names.index(r["tier"]) for r in recs], dtype=np.int64)
    gaps = {name: [] for name in names}
    miss = np.zeros(n)
    for i, r in enumerate(recs):
        g = r.get("tbt_s") or []
        gaps[r["tier"]].extend(g)
        if g:
            miss[i] = float(np.mean(np.asarray(g) > slo[r["tier"]]))
    sent = np.array([r["t_sent"] if r.get("t_sent") is not None else r["t_sched"] for r in recs])
    first = np.array([r["t_sent"] + r["ttft_s"] if r.get("ttft_s") is not None and r.get("t_sent") is not None
                      else math.inf for r in recs])
    ends = [r["t_sent"] + r["e2e_s"] for r in recs if r.get("e2e_s") is not None and r.get("t_sent") is not None]
    last_arrival = float(sent.max())
    unfinished = sum(1 for r in recs if r.get("unfinished"))
    failures = sum(1 for r in recs if not r["ok"] and not r.get("unfinished"))
    wl = _Workload(tiers=tiers, tier_idx=tier_idx, qps=qps,
                   prompt_lens=np.array([r["prompt_tokens"] for r in recs]),
                   output_lens=np.array([r["max_tokens"] for r in recs]))
    run = SimpleNamespace(
        workload=wl, ttft_s=ttft, tbt_s={k: np.asarray(v, dtype=float) for k, v in gaps.items()},
        tbt_miss_frac=miss, makespan_s=(max(ends) if ends else last_arrival) - float(sent.min()),
        waiting_at_last_arrival=int(np.sum((sent < last_arrival) & (first > last_arrival))),
        unfinished=unfinished + failures, num_iterations=0, num_preemptions=0, wall_s=0.0)
    p = summarize(run, ttft_p50_limit_s)
    for k in ("iterations", "preemptions", "sim_wall_s"):
        p.pop(k, None)
    p["unfinished"] = unfinished
    ok = np.array([r["ok"] for r in recs])
    for k, name in enumerate(names):
        g = run.tbt_s[name]
        p["tiers"][name].update({"tbt_p50_s": _q(g, 0.5), "tbt_slo_s": slo[name],
                                 "failures": int(np.sum((tier_idx == k) & ~ok))})
    lag = np.array([r["lag_s"] for r in recs if r.get("lag_s") is not None])
    errors: dict[str, int] = {}
    for r in recs:
        if r.get("error"):
            key = str(r["error"])[:160]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(int(r.get("completion_tokens") or 0) for r in recs)
    p.update({
        "run_dir": meta.get("run_dir"),
        "output_tokens": out_tokens,
        "step_seconds": seconds,
        "arrival_rate": n / seconds if seconds > 0 else float("nan"),
        "nominal_effective_qps": effective_qps(qps, float(meta.get("max_gap_factor", 3.0))),
        "failures": failures,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "lag_p50_s": _q(lag, 0.5), "lag_p99_s": _q(lag, 0.99),
        "lag_max_s": float(lag.max()) if len(lag) else float("nan"),
        "late_frac": float(np.mean(lag > LATE_S)) if len(lag) else float("nan"),
        "output_tokens_per_s": out_tokens / max(p["makespan_s"], 1e-9),
    })
    p["stable"] = bool(p["stable"] and failures == 0)
    p["stable_slo_met"] = bool(p["slo_met"] and p["stable"])
    return p


def capacity_of(points: Sequence[Mapping[str, Any]], p99_ttft_bound_s: float = P99_TTFT_BOUND_S) -> dict[str, Any]:
    """The paper's capacity, the stable one and the P99-TTFT-bounded one (`loadtest.metrics.p99_ttft_ok`:
    also a P99 TTFT of at most ``p99_ttft_bound_s``), each with its first failing QPS."""
    lo, hi = capacity_bracket(points, "slo_met")
    slo, shi = capacity_bracket(points, "stable_slo_met")
    plo, phi = capacity_bracket([{"qps": p["qps"], "ok": p99_ttft_ok(dict(p), p99_ttft_bound_s)} for p in points], "ok")
    return {"capacity_qps": lo, "first_failing_qps": hi, "stable_capacity_qps": slo, "stable_first_failing_qps": shi,
            "p99_ttft_capacity_qps": plo, "p99_ttft_first_failing_qps": phi, "p99_ttft_bound_s": p99_ttft_bound_s}


# --------------------------------------------------------------------------------- report

def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "inf" if isinstance(v, float) and math.isinf(v) else "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: Mapping[str, Any]) -> str:
    pts = report["points"]
    tiers = list(pts[0]["tiers"]) if pts else []
    cap = report["capacity"]
    title = report.get("label") or (f"python -m serve_app {' '.join(report['serve_args'])}" if report.get("serve_args")
                                     else report.get("host")) or "live endpoint"
    lines = [f"# Locust capacity: {title}", ""]
    lines.append(f"Capacity (median TTFT <= {TTFT_P50_LIMIT_S} s and every tier's P99 TBT within its SLO, every lower "
                 f"QPS passing): **{_fmt(cap['capacity_qps'])} QPS** (first failing: {_fmt(cap['first_failing_qps'])}); "
                 f"stable (also <= {STABLE_BACKLOG_FRACTION:.0%} waiting at the last arrival, none unfinished or "
                 f"failed): {_fmt(cap['stable_capacity_qps'])} QPS"
                 + (f"; P99-TTFT-bounded (also P99 TTFT <= {cap['p99_ttft_bound_s']:g} s): "
                    f"{_fmt(cap['p99_ttft_capacity_qps'])} QPS." if "p99_ttft_capacity_qps" in cap else "."))
    lines.append("")
    head = ["offered QPS", "requests", "arrival rate", "TTFT p50 (s)", "TTFT p99 (s)"]
    for t in tiers:
        head += [f"{t} TTFT p50", f"{t} TTFT p99", f"{t} TBT p99 (SLO {_fmt(pts[0]['tiers'][t]['tbt_slo_s'])})"]
    head += ["failed", "unfinished", "waiting at last arrival", "lag p99 (s)", "SLOs met", "stable"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pts:
        row = [_fmt(p["qps"]), str(p["requests"]), _fmt(p["arrival_rate"], 2), _fmt(p["ttft_p50_s"]),
               _fmt(p["ttft_p99_s"])]
        for t in tiers:
            pt = p["tiers"][t]
            row += [_fmt(pt["ttft_p50_s"]), _fmt(pt["ttft_p99_s"]), _fmt(pt["tbt_p99_s"])]
        row += [str(p["failures"]), str(p["unfinished"]), str(p["waiting_at_last_arrival"]), _fmt(p["lag_p99_s"]),
                "yes" if p["slo_met"] else "**no**", "yes" if p["stable"] else "no"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    cpu_rows = [p for p in pts if p.get("cpu_ms_per_token")]
    if cpu_rows:
        kinds = list(cpu_rows[0]["cpu_ms_per_token"])
        lines += ["CPU time per streamed token (ms; the processes' user + system time during the step and its drain, "
                  "over its completion tokens) and the machine's load average after the step:", "",
                  "| offered QPS | tokens | " + " | ".join(kinds) + " | load avg (1 min) |",
                  "|" + "---|" * (len(kinds) + 3)]
        for p in cpu_rows:
            la = p.get("loadavg_after") or [None]
            lines.append(f"| {_fmt(p['qps'])} | {p['output_tokens']} | "
                         + " | ".join(_fmt(p["cpu_ms_per_token"][k], 2) for k in kinds) + f" | {_fmt(la[0], 1)} |")
        lines.append("")
    if report.get("commands"):
        lines += ["Commands:", "", "```bash", *report["commands"], "```", ""]
    lines += ["![TTFT vs offered QPS](ttft_vs_qps.png)", "![P99 TBT vs offered QPS](tbt_p99_vs_qps.png)", ""]
    return "\n".join(lines)


def plot_report(points: Sequence[Mapping[str, Any]], out: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def val(v: Any) -> float:
        return float("nan") if v is None else float(v)

    qps = [p["qps"] for p in points]
    tiers = list(points[0]["tiers"]) if points else []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(qps, [val(p["ttft_p50_s"]) for p in points], "k-o", ms=4, label="all: p50")
    for k, t in enumerate(tiers):
        c = f"C{k}"
        ax.plot(qps, [val(p["tiers"][t]["ttft_p50_s"]) for p in points], "-o", color=c, ms=3, label=f"{t}: p50")
        ax.plot(qps, [val(p["tiers"][t]["ttft_p99_s"]) for p in points], "--s", color=c, ms=3, label=f"{t}: p99")
    ax.axhline(TTFT_P50_LIMIT_S, color="grey", ls=":", lw=1, label=f"{TTFT_P50_LIMIT_S} s (median limit)")
    ax.set_yscale("log")
    ax.set_xlabel("offered QPS")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"TTFT vs offered QPS\n{title}".strip(), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "ttft_vs_qps.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, max(1, len(tiers)), figsize=(5 * max(1, len(tiers)), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tiers):
        ax.plot(qps, [val(p["tiers"][t]["tbt_p99_s"]) for p in points], "-o", ms=4, label="P99 TBT")
        ax.plot(qps, [val(p["tiers"][t].get("tbt_p50_s")) for p in points], "-.", ms=3, label="median TBT")
        slo = points[0]["tiers"][t]["tbt_slo_s"]
        ax.axhline(slo, color="grey", ls="--", lw=1, label=f"SLO {slo:g} s")
        ax.set_xlabel("offered QPS")
        ax.set_ylabel("TBT (s)")
        ax.set_title(f"tier {t}")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out / "tbt_p99_vs_qps.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_report(out: Path, points: list[dict[str, Any]], p99_ttft_bound_s: float = P99_TTFT_BOUND_S,
                 **info: Any) -> dict[str, Any]:
    """capacity.json, capacity.md and the two plots in ``out``; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    raw = {**info, "capacity": capacity_of(points, p99_ttft_bound_s), "points": points}
    report = _clean(raw)  # strict JSON: infinite (a TTFT that never came) and NaN (no data) become null
    (out / "capacity.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "capacity.md").write_text(markdown(raw))
    if points:
        plot_report(report["points"], out, info.get("label", ""))
    return report


# ------------------------------------------------------------------------------ processes

def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux /proc; a process started with
    ``start_new_session=True`` leads a session whose id is its pid: Ray's daemons and workers
    started under it stay in it, though in process groups of their own)."""
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if os.getsid(int(name)) == sid:
                    with open(f"/proc/{name}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone but not reaped
                            pids.append(int(name))
    return pids


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process, wait; if it outlives the grace period, SIGKILL it; then SIGKILL
    whatever is left of the session it leads (only processes started under it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    deadline = time.monotonic() + 3.0  # Ray's agents exit shortly after ray.shutdown() returns
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    deadline = time.monotonic() + 10.0
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


_COMPONENTS = (("ProxyActor", "proxy"), ("Ingress", "ingress"), ("LLMReplica", "replicas"))


def session_cpu_s(sid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of session ``sid``'s live processes, by Serve
    component: proxy, ingress, replicas, other (Ray's daemons, the controller, the launcher)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {"proxy": 0.0, "ingress": 0.0, "replicas": 0.0, "other": 0.0}
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        kind = next((k for marker, k in _COMPONENTS if marker in cmd), "other")
        out[kind] += cpu
    return out


@dataclass(frozen=True)
class App:
    """A running app started by `launch_app`: base URL, API keys per tier, its launcher's pid
    (also its session id)."""

    base: str
    keys: dict[str, str]
    pid: int


@contextlib.contextmanager
def launch_app(serve_args: Sequence[str], *, port: int | None = None, keys: Mapping[str, str] | None = None,
               extra_keys: Sequence[tuple[str, str]] = (), log_path: Path | None = None,
               ready_timeout_s: float = 120.0, stop_grace_s: float = 60.0,
               app_dir: Path | None = None) -> Iterator[App]:
    """``python -m serve_app SERVE_ARGS http.host=127.0.0.1 http.port=PORT`` in a session of its
    own with a private RAY_TMPDIR, the given (or fresh) API keys, a closed loopback-only cluster (the
    launcher sets Ray's local-only switch itself: serve_app/ray_loopback.py) and Ray token authentication
    (the launcher generates a private token: serve_app/ray_auth.py); yields an `App` once
    ``/health`` answers 200 and one completion went through; stops it on exit.  ``extra_keys``:
    more (key, tier) pairs; ``app_dir``: start the app from that checkout (default this one)."""
    import httpx

    port = port or free_port()
    keys = dict(keys or {"premium": "lt-premium-" + secrets.token_hex(8), "free": "lt-free-" + secrets.token_hex(8)})
    ray_tmp = tempfile.mkdtemp(prefix="ltray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token",
           "TIERED_API_KEYS": ",".join([f"{k}:{t}" for t, k in keys.items()] + [f"{k}:{t}" for k, t in extra_keys])}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # the launcher makes a private token
        env.pop(var, None)
    cmd = [sys.executable, "-m", "serve_app", *serve_args, "http.host=127.0.0.1", f"http.port={port}"]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    if app_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(app_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(cmd, cwd=app_dir or ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        ready = False
        with httpx.Client(timeout=10.0) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.get(f"{base}/health").status_code == 200:
                        key = next(iter(keys.values()))
                        models = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
                        body = {"model": models["data"][0]["id"], "prompt": "warm up", "max_tokens": 1}
                        r = client.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                                        timeout=60.0)
                        if r.status_code == 200:
                            ready = True
                            break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.5)
        if not ready:
            raise RuntimeError(f"the app did not become ready in {ready_timeout_s:.0f} s "
                               f"(exit code {proc.poll()}; log: {log_path or 'not kept'}): {' '.join(cmd)}")
        yield App(base, keys, proc.pid)
    finally:
        _stop(proc, stop_grace_s)
        if log_path:
            log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def locust_command(host: str, qps: Sequence[float], step_seconds: float, out_prefix: Path, samples: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
            "--csv", str(out_prefix), "--only-summary", "--loglevel", "WARNING",
            "--qps-steps", ",".join(f"{q:g}" for q in qps), "--step-seconds", f"{step_seconds:g}",
            "--samples-out", str(samples), *extra]


def run_locust(cmd: Sequence[str], env: Mapping[str, str], log_path: Path, timeout_s: float) -> int:
    """Run one headless locust (its own process group); SIGTERM/SIGKILL it after ``timeout_s``."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc, 20)
            return -9
        finally:
            _stop(proc, 20)


# ------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000", help="the app's base URL (default %(default)s)")
    ap.add_argument("--serve", nargs="+", metavar="ARG", default=None,
                    help="start `python -m serve_app ARG ...` on a free loopback port for the run (e.g. "
                         "replicas.num_replicas=2); --host is then ignored")
    ap.add_argument("--qps", default="0.5,1,1.5", help="offered QPS steps, comma-separated (default %(default)s)")
    ap.add_argument("--step-seconds", type=float, default=90.0, help="seconds of arrivals per step (default %(default)s)")
    ap.add_argument("--drain-seconds", type=float, default=180.0,
                    help="after a run's last arrival, wait at most this long for open requests (default %(default)s)")
    ap.add_argument("--warmup-seconds", type=float, default=0.0,
                    help="leave out requests arriving in each step's first S seconds (default %(default)s)")
    ap.add_argument("--mode", choices=("per-step", "shape"), default="per-step",
                    help="one locust run per QPS from an idle system (default), or one run stepping through all")
    ap.add_argument("--out", type=Path, default=None,
                    help="report folder (default results/locust-capacity, or --from-samples' DIR)")
    ap.add_argument("--label", default="", help="a title for the report")
    ap.add_argument("--p99-ttft-bound-s", type=float, default=P99_TTFT_BOUND_S,
                    help="the P99-TTFT capacity's bound on the P99 TTFT, s (default %(default)s: the 10-second "
                         "attention limit of interactive response times, loadtest/metrics.py)")
    ap.add_argument("--keys", default=None, help="premium=KEY,free=KEY (default: LOADTEST_KEYS or TIERED_API_KEYS)")
    ap.add_argument("--from-samples", type=Path, default=None, metavar="DIR",
                    help="no load: rebuild the report from DIR/steps/*/samples.jsonl (written into --out, default DIR)")
    ap.add_argument("locust_args", nargs=argparse.REMAINDER,
                    help="after --: more locustfile options (--tiers, --trace, --seed, --tokenizer, --model, "
                         "--max-output-tokens, --max-prompt-tokens, --users, ...)")
    return ap


def _report_from_dir(src: Path, out: Path, warmup_s: float, p99_ttft_bound_s: float = P99_TTFT_BOUND_S,
                     **info: Any) -> dict[str, Any]:
    files = sorted(src.glob("steps/*/samples.jsonl"))
    if not files:
        raise SystemExit(f"error: no steps/*/samples.jsonl under {src}")
    metas, records = load_samples(files)
    for m, f in zip(metas, files):
        m["run_dir"] = f.parent.name
    points = step_points(metas, records, warmup_s=warmup_s)
    for f in files:  # the machine's load and the CPU time per component during each run (written by main)
        h = f.parent / "host.json"
        if not h.is_file():
            continue
        host = json.loads(h.read_text())
        mine = [p for p in points if p.get("run_dir") == f.parent.name]
        tokens = sum(p["output_tokens"] for p in mine)
        for p in mine:
            p["loadavg_after"] = host.get("loadavg_1_5_15")
            p["cpu_s"] = host.get("cpu_s")
            if host.get("cpu_s") and tokens and len(mine) == 1:
                p["cpu_ms_per_token"] = {k: 1000.0 * v / tokens for k, v in host["cpu_s"].items()}
    return write_report(out, points, p99_ttft_bound_s, metas=metas, warmup_s=warmup_s, **info)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    extra = [x for x in (a.locust_args or []) if x != "--"]
    if a.from_samples is not None:
        info: dict[str, Any] = {}
        old = a.from_samples / "capacity.json"
        if old.is_file():  # keep the run's description (label, commands, ...)
            info = {k: v for k, v in json.loads(old.read_text()).items()
                    if k not in ("capacity", "points", "metas", "warmup_s", "host_after_step")}
        if a.label:
            info["label"] = a.label
        report = _report_from_dir(a.from_samples, a.out or a.from_samples, a.warmup_seconds, a.p99_ttft_bound_s, **info)
        print(json.dumps(report["capacity"]))
        return 0
    a.out = a.out or Path("results/locust-capacity")
    try:
        qps = parse_floats(a.qps)
    except ValueError as e:
        raise SystemExit(f"error: --qps: {e}") from None
    a.out.mkdir(parents=True, exist_ok=True)
    for old in a.out.glob("steps/*"):
        shutil.rmtree(old, ignore_errors=True)
    t_start = time.monotonic()
    cmdline = "python -m loadtest.capacity " + shlex.join(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        app = None
        if a.serve:
            print(f"starting python -m serve_app {' '.join(a.serve)} ...", file=sys.stderr, flush=True)
            app = stack.enter_context(launch_app(a.serve, log_path=a.out / "serve_app.log"))
            host, keys = app.base, app.keys
        else:
            host = a.host
            keys = parse_keys(a.keys) if a.keys else keys_from_env()
            if not keys:
                raise SystemExit("error: no API keys: --keys premium=KEY,free=KEY, LOADTEST_KEYS or TIERED_API_KEYS")
        env = {**os.environ, "LOADTEST_KEYS": ",".join(f"{t}={k}" for t, k in keys.items()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        runs = [[q] for q in qps] if a.mode == "per-step" else [qps]
        for qs in runs:
            d = a.out / "steps" / ("qps-" + "-".join(f"{q:g}" for q in qs))
            d.mkdir(parents=True, exist_ok=True)
            cmd = locust_command(host, qs, a.step_seconds, d / "locust", d / "samples.jsonl",
                                 ["--drain-seconds", f"{a.drain_seconds:g}", *extra])
            t0 = time.monotonic()
            print(f"QPS {','.join(f'{q:g}' for q in qs)}: locust for {a.step_seconds * len(qs):g} s + drain ...",
                  file=sys.stderr, flush=True)
            cpu0 = session_cpu_s(app.pid) if app else None
            child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            rc = run_locust(cmd, env, d / "locust.log", a.step_seconds * len(qs) + a.drain_seconds + 120)
            child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = {"locust": (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)}
            if cpu0 is not None:
                cpu.update({k: v - cpu0[k] for k, v in session_cpu_s(app.pid).items()})
            if not (d / "samples.jsonl").is_file():
                tail = (d / "locust.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"error: locust wrote no samples (exit code {rc}); its log:\n{tail}")
            (d / "host.json").write_text(json.dumps({"loadavg_1_5_15": os.getloadavg(), "cpus": os.cpu_count(),
                                                    "locust_exit_code": rc, "wall_s": time.monotonic() - t0,
                                                    "cpu_s": cpu}))
            metas, records = load_samples(d / "samples.jsonl")
            for p in step_points(metas, records, warmup_s=a.warmup_seconds):
                tiers_s = ", ".join(f"{t} TBT p99 {_fmt(v['tbt_p99_s'])}" for t, v in p["tiers"].items())
                print(f"  QPS {p['qps']:g}: {p['requests']} requests, TTFT p50 {_fmt(p['ttft_p50_s'])} s, {tiers_s}, "
                      f"failed {p['failures']}, unfinished {p['unfinished']}, SLOs {'met' if p['slo_met'] else 'MISSED'} "
                      f"(locust exit {rc}, {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    report = _report_from_dir(a.out, a.out, a.warmup_seconds, a.p99_ttft_bound_s, label=a.label, host=a.host if not a.serve else None,
                              serve_args=a.serve, mode=a.mode, step_seconds=a.step_seconds,
                              drain_seconds=a.drain_seconds, locust_args=extra, commands=[cmdline],
                              wall_s=round(time.monotonic() - t_start, 1))
    print(json.dumps(report["capacity"]))
    print(f"report: {a.out / 'capacity.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
