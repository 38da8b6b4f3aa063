"""The HTTP streaming path, benchmarked: tokens/s, CPU per token of every Serve process, and the
gaps between tokens the clients see next to the gaps the engine produced.

  python -m loadtest.stream_path                                   # default variants, N = 8..256
  python -m loadtest.stream_path --streams 8,32,128 --measure-s 20 --out results/stream-path
  python -m loadtest.stream_path --variant today=streaming.coalesce=false,ingress.num_replicas=1 --variant new= \\
      --serve-arg engine.time_scale=0.1 --streams 128
  git worktree add /tmp/before COMMIT && python -m loadtest.stream_path --variant before= \\
      --app-dir before=/tmp/before --variant after=

Variants (``--variant NAME=KEY=VALUE,KEY=VALUE``, repeatable; the overrides may be empty: ``NAME=``)
run one after another in one invocation, each with its own app: ``python -m serve_app`` started by
`loadtest.capacity.launch_app` (a closed loopback Ray cluster with its own Ray token, fresh API
keys), from this checkout or from ``--app-dir NAME=DIR`` (another checkout, e.g. a git worktree of
an older commit: a true "before").  Every variant runs the whole sweep; the report puts them side
by side.  Default variants: ``today`` (streaming.coalesce=false, ingress.num_replicas=1: every
engine output sent at once through one ingress) and ``new`` (the config's defaults) where the
config has those keys, else one variant ``default``.  The app's args are, in order (a later one
wins): the base args below (unless ``--no-base-serve-args``), every ``--serve-arg KEY=VALUE``, the
variant's overrides; ``http.host``/``http.port`` are the launcher's (127.0.0.1, a free port).
Each variant's config is checked (``serve_app.app.build_app``, in its checkout) before anything
is launched.

Base args: ``admission.enabled=false`` (a benchmark of the path, not of shedding: the ingress's
in-flight and fair-share bounds would refuse part of 256 free streams) and
``http.max_ongoing_requests=max(256, largest N + 16)``.  API keys: one per stream per tier
(``--streams-per-key``), so no key meets its tier's per-key limits.

Load, for each N in ``--streams``: N concurrent streaming ``/v1/completions`` requests, kept N at
a time (a stream that ends is followed at once by the next one; one that fails, after 0.5 s),
mixed tiers (``--premium-every 16``: 1 stream in 16 is in the first of ``--tiers``, at least 1;
e.g. 8 + 120 at N = 128), a fixed prompt of ``--prompt-tokens`` token ids and a fixed output
length (``max_tokens`` = ``--output-tokens`` with ``ignore_eos``).  Each stream's first request is
shorter (``output_tokens * (i + 1) / N`` for stream i) so the streams do not end in lockstep.
After ``--warmup-s`` the measuring window of ``--measure-s`` starts: only what happens inside it
counts; then the streams are cancelled (the engines abort them) and the next N starts once the
engines hold no request.  Every phase is bounded; ``--timeout-s`` bounds the whole run.  An app
that does not start is started once more (Ray's node start times out on an overloaded machine);
a variant whose app still does not start is reported as not measured, the others still run, and
the exit status is 1.

Measured in the window:

* tokens/s delivered: the completion tokens that arrived at the clients.  Each request asks for
  ``stream_options: {include_usage, continuous_usage_stats}``, so every SSE event says how many
  tokens the stream has so far; an event carrying k tokens counts as one gap (since the previous
  token event of its stream, at arrival) and k - 1 gaps of 0, which is what the client sees.
* CPU seconds per 1,000 delivered tokens (user + system, psutil) of each process of the app's
  session, by kind: ``proxy`` (ray::ProxyActor, and HAProxy where it serves HTTP), ``ingress``
  (ray::ServeReplica:APP:Ingress, summed over ingress replicas), ``replicas``
  (ray::ServeReplica:APP:LLMReplica, summed), ``serve`` (the three together), ``controller``
  (ray::ServeController), ``ray_daemons`` (GCS, raylet, agents, idle workers, the launcher);
  ``client`` (this process: the asyncio httpx client); ``total`` (all of these).  The
  engine-gaps driver (below) is reported apart (``probe``), not in the total.
  Also the machine's busy fraction (all processes, all cores) and the part of it that no process
  of this run used (``machine_other_busy_frac``: other work on the machine makes the numbers noisy).
* per tier, the gap p50/p99 the clients saw next to the gap p50/p99 the engines produced: each
  replica's SLO tracker (`replica.slo`) records every engine gap anyway; at the window's start and
  end a separate Ray driver process (`loadtest.engine_gaps`, joined to the app's cluster with its
  token) calls ``LLMReplica.tbt_gaps_since`` on every replica (``DeploymentHandle.broadcast``) and
  merges the gaps since the start mark.  Where the app's replicas lack that method (an older
  checkout) or the driver cannot join, the engine's gaps are reported missing, with the reason.
  Also: TTFT p50 per tier and requests ok / failed (status, error event, no ``[DONE]``, or a
  token count other than ``max_tokens``), counted from the N's start to the window's end.

Output: a table per variant and N on stdout, and in ``--out`` (default results/stream-path):
``stream_path.json`` (every number, the commands, the variants), ``stream_path.md`` (the
tables), ``variants/NAME/serve_app.log`` and ``engine_gaps.log``.  Everything runs on 127.0.0.1;
the apps, the driver process and the client's streams are stopped by this tool (the launcher's
own stop; the driver by its pid), nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest.capacity import ROOT, launch_app, session_pids
from loadtest.engine_gaps import READY, quantile_s, ray_access

__all__ = ["GapSamples", "ServeProcesses", "StreamTokens", "Variant", "main", "parse_variants", "tier_plan"]

DEFAULT_STREAMS = (8, 16, 32, 64, 128, 256)
DEFAULT_TODAY_OVERRIDES = {"streaming.coalesce": "false", "ingress.num_replicas": "1"}  # today's path
LAUNCH_ATTEMPTS = 2  # per variant
FAILURE_PAUSE_S = 0.5  # a stream whose request failed waits this long before its next one
IDLE_TIMEOUT_S = 60.0  # after an N: wait at most this long for the engines to drop every request
PROBE_START_TIMEOUT_S = 90.0
PROBE_CALL_TIMEOUT_S = 120.0
MAX_ENGINE_SAMPLES_PER_TIER = 200_000  # per replica and window (LLMReplica.tbt_gaps_since strides beyond)
MAX_STREAMS = 4096
PROMPT_TOKEN_ID_BASE = 100  # prompt token ids 100..999 (inside any real vocabulary; the sim's is 2,000)
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
CPU_KINDS = ("proxy", "ingress", "replicas", "controller", "ray_daemons")
SERVE_KINDS = ("proxy", "ingress", "replicas")


# ------------------------------------------------------------------------------------ gap arithmetic

@dataclass
class StreamTokens:
    """One stream's token events as its client sees them: ``advance(t, completion_tokens)`` with
    an event's arrival time and the stream's completion tokens so far (the event's usage) returns
    (the gap since the stream's previous token event, or None for its first; the tokens the event
    brought)."""

    tokens: int = 0
    last_token_s: float | None = None

    def advance(self, t_s: float, completion_tokens: int) -> tuple[float | None, int]:
        new_tokens = completion_tokens - self.tokens
        if new_tokens <= 0:
            return None, 0
        gap_s = None if self.last_token_s is None else t_s - self.last_token_s
        self.tokens, self.last_token_s = completion_tokens, t_s
        return gap_s, new_tokens


@dataclass
class GapSamples:
    """The gaps between tokens one tier's clients saw: an event with k tokens is one gap (none for
    a stream's first event: that is its TTFT) and k - 1 gaps of 0 (kept as a count)."""

    gaps_s: list[float] = field(default_factory=list)
    zero_gaps: int = 0

    def add_event(self, gap_s: float | None, num_tokens: int) -> None:
        if gap_s is not None:
            self.gaps_s.append(gap_s)
        self.zero_gaps += max(0, num_tokens - 1)

    def __len__(self) -> int:
        return len(self.gaps_s) + self.zero_gaps

    def values(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.gaps_s, dtype=np.float64), np.zeros(self.zero_gaps)])

    def quantile_s(self, q: float) -> float | None:
        return quantile_s(self.values(), q)


# -------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Variant:
    """One configuration of the app: its name, its overrides (KEY=VALUE), its checkout (None: this one)."""

    name: str
    overrides: tuple[str, ...] = ()
    app_dir: Path | None = None


def _kv(text: str, what: str) -> str:
    key, sep, value = text.strip().partition("=")
    if not sep or not key or any(c.isspace() for c in key):
        raise ValueError(f"{what} {text!r}: expected KEY=VALUE (e.g. engine.time_scale=0.1)")
    return f"{key.strip()}={value.strip()}"


def parse_variants(variant_args: Sequence[str], app_dir_args: Sequence[str]) -> list[Variant]:
    """``NAME=KEY=VALUE,KEY=VALUE`` (overrides may be empty) and ``NAME=DIR`` -> variants, in order."""
    variants: dict[str, Variant] = {}
    for arg in variant_args:
        name, sep, rest = arg.partition("=")
        if not sep:
            raise ValueError(f"--variant {arg!r}: expected NAME=OVERRIDES (NAME= for the config's defaults)")
        if not _VARIANT_NAME.fullmatch(name):
            raise ValueError(f"--variant {arg!r}: a name of letters, digits, '_', '.', '-' (at most 40)")
        if name in variants:
            raise ValueError(f"--variant {name!r} given twice")
        overrides = tuple(_kv(p, f"--variant {name}: override") for p in rest.split(",") if p.strip())
        variants[name] = Variant(name, overrides)
    for arg in app_dir_args:
        name, sep, d = arg.partition("=")
        if not sep or not d:
            raise ValueError(f"--app-dir {arg!r}: expected NAME=DIR")
        if name not in variants:
            raise ValueError(f"--app-dir {arg!r}: no --variant named {name!r} (variants: {', '.join(variants)})")
        path = Path(d).expanduser().resolve()
        if not (path / "serve_app" / "__main__.py").is_file():
            raise ValueError(f"--app-dir {arg!r}: {path} is not a checkout of this project (no serve_app/__main__.py)")
        variants[name] = Variant(name, variants[name].overrides, path)
    return list(variants.values())


def _config_has(dotted: str) -> bool:
    """Whether this checkout's app config (serve_app.config.AppConfig) has the key ``dotted``."""
    from pydantic import BaseModel

    from serve_app.config import AppConfig

    model: Any = AppConfig
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def default_variants() -> list[Variant]:
    """``today`` (coalescing off, one ingress: the overrides this config has) and ``new`` (the
    config's defaults); one ``default`` variant if the config has none of those keys."""
    today = tuple(f"{k}={v}" for k, v in DEFAULT_TODAY_OVERRIDES.items() if _config_has(k))
    return [Variant("today", today), Variant("new")] if today else [Variant("default")]


def parse_streams(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--streams {text!r}: expected comma-separated whole numbers, e.g. 8,32,128") from None
    if not values or any(not 1 <= v <= MAX_STREAMS for v in values):
        raise ValueError(f"--streams {text!r}: each N must be in 1..{MAX_STREAMS}")
    return values


def tier_plan(n: int, tiers: Sequence[str], premium_every: int) -> list[str]:
    """The tier of each of ``n`` streams: the first tier for stream 0 and every ``premium_every``-th
    after it (at least one stream; max(1, n // premium_every) of them), the second for the rest."""
    first, rest = tiers[0], tiers[1]
    count = max(1, n // premium_every)
    return [first if i % premium_every == 0 and i // premium_every < count else rest for i in range(n)]


@dataclass(frozen=True)
class StreamSpec:
    index: int
    tier: str
    key: str
    first_max_tokens: int


def stream_specs(n: int, tiers: Sequence[str], premium_every: int, keys: Mapping[str, Sequence[str]],
                 streams_per_key: int, output_tokens: int) -> list[StreamSpec]:
    plan = tier_plan(n, tiers, premium_every)
    seen: Counter[str] = Counter()
    specs = []
    for i, tier in enumerate(plan):
        key = keys[tier][seen[tier] // streams_per_key]
        seen[tier] += 1
        specs.append(StreamSpec(i, tier, key, max(1, round(output_tokens * (i + 1) / n))))
    return specs


# ---------------------------------------------------------------------------------- CPU per process

def process_kind(cmdline: Sequence[str], pid: int, launcher_pid: int) -> str:
    """The kind of one process of a launched app, from Ray's process titles (``ray::ProxyActor``,
    ``ray::ServeReplica:APP:DEPLOYMENT``, ``ray::ServeController...``)."""
    if pid == launcher_pid:
        return "ray_daemons"
    text = " ".join(cmdline).strip()
    if "ProxyActor" in text or (cmdline and os.path.basename(cmdline[0]) == "haproxy"):  # ingress.haproxy: both
        return "proxy"
    if "ServeReplica:" in text:  # ray::ServeReplica:APP:DEPLOYMENT, or ...:DEPLOYMENT.METHOD while it runs one
        deployment = text.split("ServeReplica:", 1)[1].split()[0].rsplit(":", 1)[-1].split(".", 1)[0]
        return {"Ingress": "ingress", "LLMReplica": "replicas"}.get(deployment, "ray_daemons")
    if "ServeController" in text:
        return "controller"
    return "ray_daemons"


class ServeProcesses:
    """The processes of one launched app (its launcher's session) and their CPU time, by kind."""

    def __init__(self, launcher_pid: int) -> None:
        self.launcher_pid = launcher_pid
        self._procs: dict[int, psutil.Process] = {}
        self._kinds: dict[tuple[int, float], str] = {}  # a Serve actor's kind, once seen (its title changes)
        self.titles: dict[str, set[str]] = {}  # the process titles seen, by kind (to check the classification)

    def sample(self) -> dict[tuple[int, float], tuple[str, float]]:
        """{(pid, start time): (kind, CPU seconds so far: user + system)} of every live process."""
        out = {}
        for pid in session_pids(self.launcher_pid):
            try:
                p = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                with p.oneshot():
                    cpu = p.cpu_times()
                    key = (pid, p.create_time())
                    kind = self._kinds.get(key)
                    if kind is None:
                        cmdline = p.cmdline()
                        kind = process_kind(cmdline, pid, self.launcher_pid)
                        self.titles.setdefault(kind, set()).add(" ".join(cmdline).strip()[:60])
                        if kind != "ray_daemons":  # an idle worker may become an actor later
                            self._kinds[key] = kind
                    out[key] = (kind, cpu.user + cpu.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
        return out


def cpu_delta(before: Mapping[tuple[int, float], tuple[str, float]],
              after: Mapping[tuple[int, float], tuple[str, float]]) -> tuple[dict[str, float], dict[str, int], int]:
    """(CPU seconds by kind between two samples, processes by kind at the end, processes gone
    meanwhile: their time in the window is lost).  A process started in between counts whole."""
    seconds = dict.fromkeys(CPU_KINDS, 0.0)
    counts = dict.fromkeys(CPU_KINDS, 0)
    for key, (kind, cpu) in after.items():
        seconds[kind] += cpu - before.get(key, (kind, 0.0))[1]
        counts[kind] += 1
    return seconds, counts, sum(1 for k in before if k not in after)


def _own_cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _machine_busy_s() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, all CPU seconds) so far."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest time is in user already
    return total - t.idle - getattr(t, "iowait", 0.0), total


# ------------------------------------------------------------------------------- the engine's gaps

class EngineGapsProbe:
    """`loadtest.engine_gaps` as a child process joined to the app's cluster (asyncio pipes)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Any) -> None:
        self.proc = proc
        self.log = log
        self.psutil = psutil.Process(proc.pid)

    @classmethod
    async def start(cls, launcher_log: Path, log_path: Path) -> EngineGapsProbe:
        access = ray_access(launcher_log.read_text(errors="replace"))
        if access is None:
            raise RuntimeError(f"the launcher's log ({launcher_log}) does not say where its Ray token is")
        token_path, address = access
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            env.pop(var, None)
        log = open(log_path, "wb")  # noqa: SIM115, ASYNC230 - closed in close(); a local file, at once
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.engine_gaps", "--address", address, cwd=ROOT, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
        probe = cls(proc, log)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), PROBE_START_TIMEOUT_S)  # type: ignore[union-attr]
            if not line or not json.loads(line).get(READY):
                raise RuntimeError(f"the engine-gaps driver did not start (log: {log_path})")
        except BaseException:
            await probe.close()
            raise
        return probe

    async def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), PROBE_CALL_TIMEOUT_S)
        if not line:
            raise RuntimeError("the engine-gaps driver exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"engine-gaps driver: {reply['error']}")
        return reply

    def cpu_s(self) -> float:
        try:
            return _own_cpu_s(self.psutil)
        except psutil.NoSuchProcess:
            return float("nan")

    async def close(self) -> None:
        """Close its stdin (it exits), wait; SIGTERM, then SIGKILL that pid if it does not."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 15.0)
                break
            except TimeoutError:
                continue
        self.log.close()


# ------------------------------------------------------------------------------------- the load

@dataclass
class TierWindow:
    """What one tier's streams got inside the measuring window."""

    streams: int = 0
    tokens: int = 0
    gaps: GapSamples = field(default_factory=GapSamples)
    ttft_s: list[float] = field(default_factory=list)
    requests_ok: int = 0
    requests_failed: int = 0


class StreamLoad:
    """N streams kept N at a time against the app, recording into a window while it is open."""

    def __init__(self, base: str, model: str, specs: Sequence[StreamSpec], output_tokens: int,
                 prompt_token_ids: Sequence[int]) -> None:
        self.url = f"{base}/v1/completions"
        self.model = model
        self.specs = list(specs)
        self.output_tokens = output_tokens
        self.prompt = list(prompt_token_ids)
        self.tiers: dict[str, TierWindow] = {}
        for s in self.specs:
            self.tiers.setdefault(s.tier, TierWindow()).streams += 1
        self.recording = False
        self.counting = True  # requests ended while counting are ok/failed (until the window closes)
        self.errors: Counter[str] = Counter()
        self.usage_missing = 0
        self._bodies: dict[int, bytes] = {}

    def body(self, max_tokens: int) -> bytes:
        b = self._bodies.get(max_tokens)
        if b is None:
            b = self._bodies[max_tokens] = json.dumps({
                "model": self.model, "prompt": self.prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }).encode()
        return b

    async def run_stream(self, client: Any, spec: StreamSpec) -> None:
        max_tokens = spec.first_max_tokens
        headers = {"Authorization": f"Bearer {spec.key}", "Content-Type": "application/json"}
        while True:
            error = await self.one_request(client, spec.tier, headers, max_tokens)
            if self.counting:
                tw = self.tiers[spec.tier]
                if error is None:
                    tw.requests_ok += 1
                else:
                    tw.requests_failed += 1
                    self.errors[error[:200]] += 1
            max_tokens = self.output_tokens
            if error is not None:
                await asyncio.sleep(FAILURE_PAUSE_S)

    async def one_request(self, client: Any, tier: str, headers: Mapping[str, str], max_tokens: int) -> str | None:
        """One streamed request; None if it delivered ``max_tokens`` and ``[DONE]``, else why not."""
        import httpx

        tw = self.tiers[tier]
        stream = StreamTokens()
        done, error = False, None
        t_sent = time.perf_counter()
        try:
            async with client.stream("POST", self.url, content=self.body(max_tokens), headers=headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread())[:200].decode(errors="replace")
                    return f"HTTP {resp.status_code}: {text}"
                buf = b""
                async for data in resp.aiter_raw():
                    t = time.perf_counter()
                    buf += data
                    while (j := buf.find(b"\n\n")) >= 0:
                        event, buf = buf[:j], buf[j + 2:]
                        if not event.startswith(b"data:"):
                            continue
                        if event.endswith(b"[DONE]"):
                            done = True
                            continue
                        if b'"error":' in event:
                            error = error or _error_message(event)
                            continue
                        m = _COMPLETION_TOKENS.search(event)
                        if m is not None:
                            completion_tokens = int(m.group(1))
                        else:  # no usage in the event: one token per event with text
                            self.usage_missing += 1
                            completion_tokens = stream.tokens + _has_text(event)
                        gap_s, k = stream.advance(t, completion_tokens)
                        if k and self.recording:
                            tw.tokens += k
                            tw.gaps.add_event(gap_s, k)
                            if gap_s is None:
                                tw.ttft_s.append(t - t_sent)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        if error is not None:
            return f"error event: {error}"
        if not done:
            return "stream ended without data: [DONE]"
        if stream.tokens != max_tokens:
            return f"{stream.tokens} completion tokens, expected {max_tokens} (ignore_eos)"
        return None


def _error_message(event: bytes) -> str:
    try:
        err = json.loads(event[5:])["error"]
        return str(err.get("message") if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError):
        return event[:200].decode(errors="replace")


def _has_text(event: bytes) -> int:
    try:
        return int(any(c.get("text") for c in json.loads(event[5:]).get("choices") or []))
    except (ValueError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------- one point

@dataclass
class RunSettings:
    tiers: tuple[str, str]
    premium_every: int
    output_tokens: int
    prompt_tokens: int
    warmup_s: float
    measure_s: float
    streams_per_key: int


async def measure_point(base: str, model: str, n: int, keys: Mapping[str, Sequence[str]], settings: RunSettings,
                        processes: ServeProcesses, probe: EngineGapsProbe | None) -> dict[str, Any]:
    """N streams: warm up, measure, stop; the point's numbers (module docstring)."""
    import httpx

    specs = stream_specs(n, settings.tiers, settings.premium_every, keys, settings.streams_per_key,
                         settings.output_tokens)
    prompt = [PROMPT_TOKEN_ID_BASE + i % 900 for i in range(settings.prompt_tokens)]
    load = StreamLoad(base, model, specs, settings.output_tokens, prompt)
    me = psutil.Process()
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    timeout = httpx.Timeout(connect=10.0, read=120.0, write=10.0, pool=120.0)
    engine: dict[str, Any] = {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(load.run_stream(client, s)) for s in specs]
        try:
            await asyncio.sleep(settings.warmup_s)
            marks = None
            if probe is not None:
                try:
                    marks = (await probe.call("mark"))["marks"]
                except Exception as e:  # noqa: BLE001 - the engine's gaps are then missing, with the reason
                    engine["unavailable"] = f"mark: {e}"
            cpu0, t_cpu0 = processes.sample(), time.perf_counter()
            client0, probe0, machine0 = _own_cpu_s(me), probe.cpu_s() if probe else None, _machine_busy_s()
            t0 = time.perf_counter()
            load.recording = True
            await asyncio.sleep(settings.measure_s)
            load.recording = False
            load.counting = False
            t1 = time.perf_counter()
            client1, probe1, machine1 = _own_cpu_s(me), probe.cpu_s() if probe else None, _machine_busy_s()
            cpu1, t_cpu1 = processes.sample(), time.perf_counter()
            if probe is not None and marks is not None:
                try:
                    engine = await probe.call("collect", marks=marks, max_samples_per_tier=MAX_ENGINE_SAMPLES_PER_TIER)
                except Exception as e:  # noqa: BLE001
                    engine = {"unavailable": f"collect: {e}"}
        finally:
            for task in tasks:
                task.cancel()
            ended = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled = sum(1 for r in ended if isinstance(r, asyncio.CancelledError))
            for r in ended:  # a stream's task that died of a bug, not of its request
                if isinstance(r, Exception):
                    load.errors[f"client task crashed: {type(r).__name__}: {r}"[:200]] += 1
    idle: dict[str, Any] = {}
    if probe is not None:
        try:
            idle = await probe.call("idle", timeout_s=IDLE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            idle = {"error": str(e)}
    else:
        await asyncio.sleep(2.0)

    window_s = t1 - t0
    cpu_wall_s = t_cpu1 - t_cpu0
    tokens = sum(tw.tokens for tw in load.tiers.values())
    tokens_per_s = tokens / window_s if window_s > 0 else 0.0
    seconds, counts, gone = cpu_delta(cpu0, cpu1)
    seconds["serve"] = sum(seconds[k] for k in SERVE_KINDS)
    seconds["client"] = (client1 - client0) * cpu_wall_s / window_s  # on the same wall span as the others
    seconds["total"] = sum(seconds[k] for k in (*CPU_KINDS, "client"))
    if probe0 is not None and probe1 is not None:
        seconds["probe"] = probe1 - probe0
    per_1k = {k: (1000.0 * (v / cpu_wall_s) / tokens_per_s if tokens_per_s > 0 else None) for k, v in seconds.items()}
    machine_cpu_s = machine1[1] - machine0[1]
    busy = (machine1[0] - machine0[0]) / max(machine_cpu_s, 1e-9)
    # what the rest of the machine ran meanwhile (other users' processes): a noisy measurement shows here
    others_s = max(0.0, (machine1[0] - machine0[0]) - seconds["total"] - seconds.get("probe", 0.0))
    eng_tiers = engine.get("tiers") or {}
    if "unavailable" not in engine and probe is None:
        engine["unavailable"] = "no engine-gaps driver (see the variant's engine_gaps.log)"
    if not engine.get("unavailable") and not engine.get("replicas"):
        engine["unavailable"] = "no replica answered with its gaps: " + "; ".join(engine.get("errors") or [])[:300]
    tiers_out = {}
    for tier, tw in load.tiers.items():
        e = eng_tiers.get(tier) or {}
        tiers_out[tier] = {
            "streams": tw.streams, "tokens": tw.tokens, "tokens_per_s": tw.tokens / window_s if window_s > 0 else 0.0,
            "client_gap_p50_s": tw.gaps.quantile_s(0.5), "client_gap_p99_s": tw.gaps.quantile_s(0.99),
            "client_gaps": len(tw.gaps), "client_zero_gaps": tw.gaps.zero_gaps,
            "engine_gap_p50_s": e.get("gap_p50_s"), "engine_gap_p99_s": e.get("gap_p99_s"),
            "engine_gaps": e.get("num_gaps"), "engine_gaps_sampled": e.get("sampled"),
            "engine_gaps_complete": e.get("complete"),
            "ttft_p50_s": quantile_s(np.asarray(tw.ttft_s), 0.5),
            "requests_ok": tw.requests_ok, "requests_failed": tw.requests_failed,
        }
    return {
        "streams": n, "streams_by_tier": {t: tw.streams for t, tw in load.tiers.items()},
        "window_s": window_s, "tokens": tokens, "tokens_per_s": tokens_per_s,
        "cpu_s": seconds, "cpu_wall_s": cpu_wall_s, "cpu_s_per_1k_tokens": per_1k, "processes": counts,
        "processes_gone": gone, "machine_busy_frac": busy,
        "machine_other_busy_frac": others_s / max(machine_cpu_s, 1e-9), "loadavg_1min_after": os.getloadavg()[0],
        "tiers": tiers_out,
        "requests_ok": sum(t["requests_ok"] for t in tiers_out.values()),
        "requests_failed": sum(t["requests_failed"] for t in tiers_out.values()),
        "requests_cancelled_at_end": cancelled,
        "errors": dict(load.errors.most_common(5)), "events_without_usage": load.usage_missing,
        "engine": {k: v for k, v in engine.items() if k != "tiers"}, "engines_idle_after": idle,
    }


# --------------------------------------------------------------------------------------- variants

def base_serve_args(streams: Sequence[int]) -> list[str]:
    return ["admission.enabled=false", f"http.max_ongoing_requests={max(256, max(streams) + 16)}"]


def preflight(variant: Variant, serve_args: Sequence[str]) -> None:
    """Build the variant's app (its config validated, nothing started) in its checkout; raise
    ValueError with the app's own message if it does not build."""
    args = dict(a.split("=", 1) for a in [*serve_args, "http.host=127.0.0.1", "http.port=8000"])
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # serve_app.ray_loopback.LOCAL_ONLY
    app_dir = variant.app_dir or ROOT
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")]))
    code = "import json, sys\nfrom serve_app.app import build_app\nbuild_app(json.loads(sys.argv[1]))\n"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=app_dir, env=env, capture_output=True,
                       text=True, timeout=180, check=False)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        start = max((i for i, ln in enumerate(lines) if not ln[0].isspace()), default=0)  # the exception's text
        raise ValueError(f"variant {variant.name!r} ({app_dir}): the app does not build with "
                         f"{' '.join(serve_args)}:\n  " + "\n  ".join(lines[start:][-6:]))


def make_keys(tiers: Sequence[str], streams: Sequence[int], premium_every: int,
              streams_per_key: int) -> dict[str, list[str]]:
    """Fresh API keys per tier, enough for the largest N at ``streams_per_key``."""
    need = Counter[str]()
    for n in streams:
        for tier, count in Counter(tier_plan(n, tiers, premium_every)).items():
            need[tier] = max(need[tier], count)
    return {t: [f"sp-{t}-{i}-{os.urandom(8).hex()}" for i in range(max(1, math.ceil(need[t] / streams_per_key)))]
            for t in tiers}


async def run_variant(variant: Variant, serve_args: Sequence[str], streams: Sequence[int], settings: RunSettings,
                      out: Path, report: dict[str, Any]) -> None:
    """Launch the variant's app, sweep N, stop it; appends to ``report["variants"]`` as it goes."""
    vdir = out / "variants" / variant.name
    vdir.mkdir(parents=True, exist_ok=True)
    keys = make_keys(settings.tiers, streams, settings.premium_every, settings.streams_per_key)
    entry: dict[str, Any] = {"name": variant.name, "overrides": list(variant.overrides),
                             "app_dir": str(variant.app_dir) if variant.app_dir else None,
                             "serve_args": list(serve_args), "points": []}
    report["variants"].append(entry)
    print(f"[{variant.name}] starting python -m serve_app {' '.join(serve_args)}"
          + (f" (from {variant.app_dir})" if variant.app_dir else "") + " ...", file=sys.stderr, flush=True)
    log_path = vdir / "serve_app.log"
    first = {t: ks[0] for t, ks in keys.items()}
    extra = [(k, t) for t, ks in keys.items() for k in ks[1:]]
    with contextlib.ExitStack() as stack:
        for attempt in range(1, LAUNCH_ATTEMPTS + 1):  # Ray's node start times out on an overloaded machine
            try:
                app = stack.enter_context(launch_app(serve_args, keys=first, extra_keys=extra, log_path=log_path,
                                                     app_dir=variant.app_dir))
                break
            except RuntimeError as e:
                if attempt == LAUNCH_ATTEMPTS:
                    raise
                log_path.replace(vdir / f"serve_app.failed-{attempt}.log")
                print(f"[{variant.name}] {e}; starting it again", file=sys.stderr, flush=True)
        import httpx

        entry["launcher_pid"] = app.pid

        async with httpx.AsyncClient(timeout=30.0) as c:
            r = await c.get(f"{app.base}/v1/models", headers={"Authorization": f"Bearer {first[settings.tiers[0]]}"})
            model = r.json()["data"][0]["id"]
        probe = None
        try:
            probe = await EngineGapsProbe.start(log_path, vdir / "engine_gaps.log")
            entry["engine_gaps_pid"] = probe.proc.pid
        except Exception as e:  # noqa: BLE001 - the benchmark goes on without the engine's gaps
            entry["engine_gaps_unavailable"] = str(e)
            print(f"[{variant.name}] no engine gaps: {e}", file=sys.stderr, flush=True)
        processes = ServeProcesses(app.pid)
        try:
            for n in streams:
                print(f"[{variant.name}] N={n}: {settings.warmup_s:g} s warm-up + {settings.measure_s:g} s "
                      f"measured ...", file=sys.stderr, flush=True)
                point = await measure_point(app.base, model, n, keys, settings, processes, probe)
                entry["points"].append(point)
                print("  " + _one_line(point), file=sys.stderr, flush=True)
        finally:
            entry["process_titles"] = {k: sorted(v) for k, v in sorted(processes.titles.items())}
            if probe is not None:
                await probe.close()


def _one_line(p: Mapping[str, Any]) -> str:
    c = p["cpu_s_per_1k_tokens"]
    return (f"{p['tokens_per_s']:.0f} tok/s, CPU s/1k tokens: serve {_f(c.get('serve'), 2)} "
            f"(proxy {_f(c.get('proxy'), 2)}, ingress {_f(c.get('ingress'), 2)}, replicas {_f(c.get('replicas'), 2)}), "
            f"client {_f(c.get('client'), 2)}; "
            + "; ".join(f"{t} gaps client {_ms(v['client_gap_p50_s'])}/{_ms(v['client_gap_p99_s'])} ms, engine "
                        f"{_ms(v['engine_gap_p50_s'])}/{_ms(v['engine_gap_p99_s'])} ms" for t, v in p["tiers"].items())
            + f"; requests ok {p['requests_ok']}, failed {p['requests_failed']}")


# ----------------------------------------------------------------------------------------- report

def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{1000.0 * v:.0f}" if v >= 0.01 else f"{1000.0 * v:.1f}"


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


def markdown(report: Mapping[str, Any]) -> str:
    """The tables: per N, the variants side by side."""
    variants = report["variants"]
    tiers = list(report["settings"]["tiers"])
    rows: dict[int, list[tuple[str, Mapping[str, Any]]]] = {}
    for v in variants:
        for p in v["points"]:
            rows.setdefault(p["streams"], []).append((v["name"], p))
    lines = [f"# Stream path: {report.get('label') or 'python -m loadtest.stream_path'}", ""]
    s = report["settings"]
    lines += [(f"{s['output_tokens']} output tokens per request (ignore_eos), {s['prompt_tokens']}-token prompts, "
               f"1 {tiers[0]} stream in {s['premium_every']} (at least 1), the rest {tiers[1]}; "
               f"{s['warmup_s']:g} s warm-up, {s['measure_s']:g} s measured per N."), ""]
    for v in variants:
        where = f" from {v['app_dir']}" if v.get("app_dir") else ""
        lines.append(f"- **{v['name']}**{where}: `python -m serve_app {' '.join(v['serve_args'])}`"
                     + (f" (engine gaps unavailable: {v['engine_gaps_unavailable']})"
                        if v.get("engine_gaps_unavailable") else "")
                     + (f" **not measured**: {v['error']}" if v.get("error") else ""))
    lines += ["", ("Throughput and CPU seconds per 1,000 delivered tokens (serve = proxy + ingress + replicas; "
                   "total adds the Serve controller, Ray's daemons and the client):"), ""]
    head = ["N", "streams", "variant", "tokens/s", "proxy", "ingress", "replicas", "serve", "controller + daemons",
            "client", "total", "machine busy (others)", "requests ok / failed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted(rows):
        for name, p in rows[n]:
            c = p["cpu_s_per_1k_tokens"]
            other = (c["controller"] + c["ray_daemons"]) if c.get("controller") is not None else None
            streams = " + ".join(str(p["streams_by_tier"].get(t, 0)) for t in tiers)
            lines.append("| " + " | ".join([
                str(n), streams, name, f"{p['tokens_per_s']:,.0f}", _f(c["proxy"], 2), _f(c["ingress"], 2),
                _f(c["replicas"], 2), _f(c["serve"], 2), _f(other, 2), _f(c["client"], 2), _f(c["total"], 2),
                f"{p['machine_busy_frac']:.0%} ({p['machine_other_busy_frac']:.0%})",
                f"{p['requests_ok']} / {p['requests_failed']}"]) + " |")
    lines += ["", "Gaps between tokens (ms), p50 / p99: what the clients saw next to what the engines produced:", ""]
    head = ["N", "variant"] + [f"{t} {side}" for t in tiers for side in ("client", "engine")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted(rows):
        for name, p in rows[n]:
            cells = [str(n), name]
            for t in tiers:
                pt = p["tiers"].get(t)
                if pt is None:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{_ms(pt['client_gap_p50_s'])} / {_ms(pt['client_gap_p99_s'])}")
                cells.append(f"{_ms(pt['engine_gap_p50_s'])} / {_ms(pt['engine_gap_p99_s'])}")
            lines.append("| " + " | ".join(cells) + " |")
    missing = [(v["name"], p["streams"], p["engine"]["unavailable"]) for v in variants for p in v["points"]
               if p["engine"].get("unavailable")]
    if missing:
        lines += ["", "Engine gaps missing: " + "; ".join(f"{v} N={n}: {why}" for v, n, why in missing[:6])]
    errors = [(v["name"], p["streams"], p["errors"]) for v in variants for p in v["points"] if p["errors"]]
    if errors:
        lines += ["", "Failed requests: " + "; ".join(f"{v} N={n}: {json.dumps(e)}" for v, n, e in errors[:6])]
    if report.get("commands"):
        lines += ["", "```bash", *report["commands"], "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_path.json").write_text(json.dumps(_clean(report), indent=1) + "\n")
    (out / "stream_path.md").write_text(markdown(report))


# -------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest.stream_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=[KEY=VALUE,...]",
                    help="a variant of the app: its name and its config overrides, comma-separated (repeatable; "
                         "default: today/new where the config has streaming.coalesce and ingress.num_replicas, "
                         "else one 'default')")
    ap.add_argument("--app-dir", action="append", default=[], metavar="NAME=DIR",
                    help="run variant NAME from the checkout DIR (e.g. a git worktree of an older commit)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an app arg for every variant (repeatable), e.g. engine.time_scale=0.1, "
                         "replicas.num_replicas=3, config=serve_app/configs/sim.yaml")
    ap.add_argument("--no-base-serve-args", action="store_true",
                    help="leave out the base args (admission.enabled=false, http.max_ongoing_requests)")
    ap.add_argument("--streams", default=",".join(map(str, DEFAULT_STREAMS)), metavar="N,N,...",
                    help="concurrent streams per point (default %(default)s)")
    ap.add_argument("--tiers", default="premium,free", metavar="STRICT,BULK",
                    help="the two tiers: 1 stream in --premium-every is STRICT, the rest BULK (default %(default)s)")
    ap.add_argument("--premium-every", type=int, default=16, metavar="K",
                    help="one STRICT-tier stream per K streams, at least one (default %(default)s)")
    ap.add_argument("--output-tokens", type=int, default=200, help="max_tokens of every request, with ignore_eos "
                                                                    "(default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default %(default)s)")
    ap.add_argument("--warmup-s", type=float, default=5.0,
                    help="seconds of load before each window (default %(default)s)")
    ap.add_argument("--measure-s", type=float, default=20.0,
                    help="seconds measured per N (default %(default)s; at most the replicas' SLO window)")
    ap.add_argument("--streams-per-key", type=int, default=1,
                    help="streams sharing one API key (default %(default)s: a key per stream)")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="bound on the whole run (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("results/stream-path"), help="report folder (default %(default)s)")
    ap.add_argument("--label", default="", help="a title for the report")
    return ap


def _check(a: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[list[Variant], list[int], RunSettings]:
    from replica.slo import SLOTracker

    try:
        variants = parse_variants(a.variant, a.app_dir) if a.variant else default_variants()
        if a.app_dir and not a.variant:
            raise ValueError("--app-dir names a --variant: give the variants too")
        streams = parse_streams(a.streams)
        serve_args = [_kv(x, "--serve-arg") for x in a.serve_arg]
    except ValueError as e:
        ap.error(str(e))
    tiers = tuple(t.strip() for t in a.tiers.split(","))
    if len(tiers) != 2 or not all(tiers) or tiers[0] == tiers[1]:
        ap.error(f"--tiers {a.tiers!r}: expected two different tier names, e.g. premium,free")
    slo_window_s = inspect.signature(SLOTracker).parameters["window_s"].default
    for name, ok, why in (
        ("--premium-every", a.premium_every >= 1, "must be >= 1"),
        ("--output-tokens", 2 <= a.output_tokens <= 100_000, "must be in 2..100000 (gaps need two tokens)"),
        ("--prompt-tokens", 1 <= a.prompt_tokens <= 100_000, "must be in 1..100000"),
        ("--warmup-s", 0 <= a.warmup_s <= 600, "must be in 0..600"),
        ("--measure-s", 0 < a.measure_s <= slo_window_s - 5,
         f"must be > 0 and at most {slo_window_s - 5:g} (the replicas' SLO window, {slo_window_s:g} s, less 5 s)"),
        ("--streams-per-key", a.streams_per_key >= 1, "must be >= 1"),
        ("--timeout-s", a.timeout_s > 0, "must be > 0"),
    ):
        if not ok:
            ap.error(f"{name}: {why}")
    a.serve_args = serve_args
    settings = RunSettings((tiers[0], tiers[1]), a.premium_every, a.output_tokens, a.prompt_tokens, a.warmup_s,
                           a.measure_s, a.streams_per_key)
    return variants, streams, settings


async def _run(variants: Sequence[Variant], streams: Sequence[int], settings: RunSettings, common: Sequence[str],
               out: Path, report: dict[str, Any], timeout_s: float) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr] # stop what was started
    async with asyncio.timeout(timeout_s):
        for v in variants:
            try:
                await run_variant(v, [*common, *v.overrides], streams, settings, out, report)
            except RuntimeError as e:  # its app did not start: the next variants still run
                report["variants"][-1]["error"] = str(e)
                print(f"[{v.name}] {e}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    variants, streams, settings = _check(a, ap)
    common = ([] if a.no_base_serve_args else base_serve_args(streams)) + list(a.serve_args)
    for v in variants:  # every config checked before anything is launched
        try:
            preflight(v, [*common, *v.overrides])
        except (ValueError, subprocess.TimeoutExpired) as e:
            raise SystemExit(f"python -m loadtest.stream_path: {e}") from None
    cmdline = "python -m loadtest.stream_path " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report: dict[str, Any] = {
        "label": a.label, "commands": [cmdline], "settings": {**settings.__dict__, "streams": list(streams)},
        "base_serve_args": [] if a.no_base_serve_args else base_serve_args(streams), "serve_args": list(a.serve_args),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "variants": [],
    }
    t_start = time.monotonic()
    status = 0
    try:
        asyncio.run(_run(variants, streams, settings, common, a.out, report, a.timeout_s))
    except TimeoutError:
        report["error"] = f"the run passed --timeout-s {a.timeout_s:g}: the report holds what was measured"
        status = 1
    except (asyncio.CancelledError, KeyboardInterrupt):
        report["error"] = "stopped (SIGTERM or Ctrl-C): the report holds what was measured"
        status = 130
    failed = [f"{v['name']}: {v['error']}" for v in report["variants"] if v.get("error")]
    if failed and "error" not in report:
        report["error"] = "; ".join(failed)
        status = 1
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    write_report(a.out, report)
    print(markdown(report))
    if report.get("error"):
        print(f"python -m loadtest.stream_path: {report['error']}", file=sys.stderr)
    print(f"report: {a.out / 'stream_path.md'}, {a.out / 'stream_path.json'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
