"""Locust load test of the live endpoint: open-loop Poisson arrivals per offered-QPS step, tiers
drawn per request, prompt/output lengths from the paper's trace, TTFT and every TBT gap timed from
the SSE stream.

  locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
         --qps-steps 0.5,1,1.5 --step-seconds 60 --samples-out samples.jsonl --csv out/locust

(``python -m loadtest.capacity`` runs this step by step and writes the capacity report.)  One
process only: no ``--processes``/``--master``/``--worker`` (the schedule is this process's).
Never import this module next to Ray: locust's gevent patching breaks ``ray.init``.

**Open loop.**  `loadtest.capacity.build_schedule` fixes every request before the run starts:
for step k, Poisson arrivals (the paper's capped-exponential gaps) at ``qps_k`` for
``--step-seconds``, one step after the other, each with its tier (drawn with the mix's shares;
default the paper's 5 % premium / 95 % free), prompt length and output length (the trace's, as the
simulator draws them).  `OpenLoopShape` keeps a fixed pool of users (``--pool-users``; default:
every request of the run, up to 1000); each user takes the next unclaimed request of the schedule,
sleeps until its arrival time, sends it, reads the whole stream, and takes the next one.  A user
never waits after a response, so arrivals follow the schedule whatever the response times, as
long as fewer than pool-size requests are in flight (a request becomes late only when every user
is busy).  The send time minus the scheduled time is each request's ``lag_s``, in the samples;
``loadtest.capacity`` reports its P99 and the fraction of requests later than 50 ms.  The shape
ends the run when every request has finished, or ``--drain-seconds`` after the last arrival
(requests still open are then recorded as unfinished).

**Each request**: ``POST /v1/completions`` with ``stream: true``, ``max_tokens`` = the trace's output
length, ``ignore_eos: true``, ``stream_options.include_usage`` and ``continuous_usage_stats`` (the
tokens each event carries), a prompt synthesised (before the run,
so that no tokenizing stalls the greenlets that time streams) to exactly the trace's prompt length
with the ingress's tokenizer (the sim backend's built-in one, or ``--tokenizer tokenizer.json``;
`loadtest.capacity.PromptSynth`), and the tier's API key (env LOADTEST_KEYS='premium=KEY,free=KEY'
or TIERED_API_KEYS='KEY:TIER,...').  The stream is read with httpx line by line (not
``FastHttpUser.iter_content``, which waits for whole chunks and misreports TTFT); every token
event is timed on arrival.  Failures: a non-200 status, an ``error`` event, no ``[DONE]``, a
completion shorter than ``max_tokens``, a transport error.

**Reported into locust's stats** (console, ``--csv``): request type ``TTFT`` and ``TBT`` (one entry
per gap) named by tier, and ``POST`` ``/v1/completions [tier]`` (whole request; failures here).
Raw per-request samples (JSON lines; a ``{"meta": ...}`` line first) go to ``--samples-out`` for
exact percentiles.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import gevent
import httpx
from locust import LoadTestShape, User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtest.capacity import (
    DEFAULT_MAX_CONTEXT,
    Arrival,
    PromptSynth,
    StreamRecorder,
    build_schedule,
    keys_from_env,
    parse_floats,
)
from replica.traces import load_trace
from replica.tiers import paper_tiers, parse_tiers

log = logging.getLogger("loadtest.locustfile")
MAX_POOL = 1000


class Plan:
    """The run's shared state (one process; greenlets switch only on I/O, so no locks)."""

    def __init__(self) -> None:
        self.schedule: list[Arrival] = []
        self.next = 0
        self.pending = 0  # claimed and not finished (waiting for its arrival time or in flight)
        self.origin: float | None = None  # perf_counter of schedule time 0
        self.pool = 1
        self.drain_s = 120.0
        self.start_delay_s = 2.0
        self.prompts: list[str] = []
        self.keys: dict[str, str] = {}
        self.model = ""
        self.timeout_s = 600.0
        self.samples: Any = None

    def claim(self) -> Arrival | None:
        if self.next >= len(self.schedule):
            return None
        a = self.schedule[self.next]
        self.next += 1
        return a

    @property
    def last_arrival_s(self) -> float:
        return self.schedule[-1].t_s if self.schedule else 0.0

    def write(self, obj: dict[str, Any]) -> None:
        if self.samples is not None and not self.samples.closed:
            self.samples.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self.samples.flush()


PLAN = Plan()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("open-loop tiered load (loadtest/locustfile.py)")
    g.add_argument("--qps-steps", default="1", env_var="LOADTEST_QPS_STEPS",
                   help="offered QPS per step, comma-separated (default %(default)s)")
    g.add_argument("--step-seconds", type=float, default=60.0, env_var="LOADTEST_STEP_SECONDS",
                   help="seconds of arrivals per step (default %(default)s)")
    g.add_argument("--drain-seconds", type=float, default=120.0,
                   help="after the last arrival, wait at most this long for open requests (default %(default)s)")
    g.add_argument("--tiers", default="", env_var="LOADTEST_TIERS",
                   help="tier mix, e.g. premium:0.1:0.05,free:0.5:0.95 (name:tbt_slo_s:share) or a YAML file "
                        "(default: the paper's 5/95)")
    g.add_argument("--trace", default="paper", help="'paper' or a CSV of num_prefill_tokens,num_decode_tokens")
    g.add_argument("--seed", type=int, default=42, help="seed of lengths, tiers and arrivals (default %(default)s)")
    g.add_argument("--max-gap-factor", type=float, default=3.0, help="inter-arrival gaps capped at F/qps (the paper's 3)")
    g.add_argument("--tokenizer", default="", help="tokenizer.json of the ingress (default: the sim backend's built-in)")
    g.add_argument("--model", default="", help="model name (default: the first of GET /v1/models)")
    g.add_argument("--max-prompt-tokens", type=int, default=0, help="clamp prompts to N tokens (0: no clamp)")
    g.add_argument("--max-output-tokens", type=int, default=0, help="clamp outputs to N tokens (0: no clamp)")
    g.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT,
                   help="prompt + output at most this (the ingress's context; default %(default)s)")
    g.add_argument("--pool-users", type=int, default=0,
                   help=f"users in the pool (default: the run's request count, at most {MAX_POOL})")
    g.add_argument("--samples-out", default="loadtest-samples.jsonl", env_var="LOADTEST_SAMPLES",
                   help="raw per-request samples, JSON lines (default %(default)s)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="httpx read timeout in seconds")
    g.add_argument("--start-delay", type=float, default=2.0, help="seconds from the start to the first arrival")


def _fail(msg: str) -> None:
    log.error("%s", msg)
    print(f"loadtest/locustfile.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


@events.init.add_listener
def _init(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, (MasterRunner, WorkerRunner)):
        _fail("run this locustfile in one process (no --master/--worker/--processes): the schedule is per process")
    o = environment.parsed_options
    if o is None:
        return  # imported as a library (e.g. locust's --list): nothing to set up
    try:
        steps = [(q, float(o.step_seconds)) for q in parse_floats(o.qps_steps)]
        tiers = parse_tiers(o.tiers) if o.tiers else paper_tiers()
        trace = load_trace(o.trace)
    except (ValueError, OSError) as e:
        _fail(str(e))
    keys = keys_from_env()
    missing = [t for t in tiers.names if t not in keys]
    if missing:
        _fail(f"no API key for tier(s) {missing}: set LOADTEST_KEYS='premium=KEY,free=KEY' (or TIERED_API_KEYS)")
    from serve_app.tokenizer import default_tokenizer, load_tokenizer  # no Ray: tokenizers only

    tok = load_tokenizer(o.tokenizer) if o.tokenizer else default_tokenizer()
    p = PLAN
    p.schedule = build_schedule(steps, tiers, trace, seed=o.seed, max_gap_factor=o.max_gap_factor,
                                max_prompt_tokens=o.max_prompt_tokens or None,
                                max_output_tokens=o.max_output_tokens or None,
                                max_context_tokens=o.max_context_tokens)
    synth = PromptSynth(tok, seed=o.seed)
    t0 = time.perf_counter()
    # every prompt before the run: tokenizing during it would stall the greenlets timing streams
    p.prompts = [synth.text(a.prompt_tokens) for a in p.schedule]
    log.warning("synthesised %d prompts in %.1f s", len(p.prompts), time.perf_counter() - t0)
    p.keys = {t: keys[t] for t in tiers.names}
    p.pool = max(1, o.pool_users or min(len(p.schedule), MAX_POOL))
    p.drain_s, p.start_delay_s, p.timeout_s = o.drain_seconds, o.start_delay, o.request_timeout
    p.model = o.model or _discover_model(environment.host, p.keys[tiers.names[0]])
    p.samples = open(o.samples_out, "w", encoding="utf-8")  # noqa: SIM115 (closed at quit)
    p.write({"meta": {
        "host": environment.host, "model": p.model, "steps": steps, "tiers": [t.model_dump() for t in tiers.tiers],
        "trace": o.trace, "seed": o.seed, "max_gap_factor": o.max_gap_factor, "pool_users": p.pool,
        "max_prompt_tokens": o.max_prompt_tokens or None, "max_output_tokens": o.max_output_tokens or None,
        "tokenizer": repr(tok), "requests": len(p.schedule), "drain_seconds": p.drain_s,
        "started_unix": time.time()}})
    log.warning("open-loop plan: %d requests over %d step(s) %s, pool of %d users, model %s",
                len(p.schedule), len(steps), steps, p.pool, p.model)


def _discover_model(host: str | None, key: str) -> str:
    if not host:
        _fail("--host is required")
    try:
        r = httpx.get(f"{host.rstrip('/')}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10.0)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        _fail(f"GET {host}/v1/models failed ({e!r}); pass --model")
    return ""


@events.quitting.add_listener
def _close(**_: Any) -> None:
    if PLAN.samples is not None:
        PLAN.samples.close()


class OpenLoopShape(LoadTestShape):
    """A constant pool of users for the whole schedule, then stop once every request finished (or
    the drain time after the last arrival ran out).  The offered QPS per step lives in the schedule
    (see the module docstring), not in the user count."""

    def tick(self) -> tuple[int, float] | None:
        p = PLAN
        if not p.schedule:
            return None
        if p.origin is None:
            p.origin = time.perf_counter() + p.start_delay_s
        now = time.perf_counter() - p.origin
        if p.next < len(p.schedule) or p.pending > 0:
            if now <= p.last_arrival_s + p.drain_s:
                return p.pool, float(max(p.pool, 1))
            log.warning("drain time over: %d request(s) still open", p.pending)
        return None


class TieredUser(User):
    """One member of the pool: takes the next scheduled request, sends it at its time, streams it."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.client = httpx.Client(base_url=self.host, timeout=httpx.Timeout(PLAN.timeout_s, connect=30.0))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def scheduled_request(self) -> None:
        p = PLAN
        a = p.claim() if p.origin is not None else None
        if a is None:
            gevent.sleep(1.0)  # the schedule is done: idle until the shape stops the run
            return
        p.pending += 1
        try:
            delay = p.origin + a.t_s - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            self._send(a)
        finally:
            p.pending -= 1

    def _send(self, a: Arrival) -> None:
        p = PLAN
        assert p.origin is not None
        body = {"model": p.model, "prompt": p.prompts[a.index], "max_tokens": a.max_tokens,
                "stream": True, "ignore_eos": True,
                # continuous usage: each event says how many tokens it carries (the replica coalesces them)
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        headers = {"Authorization": f"Bearer {p.keys[a.tier]}"}
        t0 = time.perf_counter()
        rec = StreamRecorder(t0)
        status: int | None = None
        err: str | None = None
        finished = False
        try:
            with self.client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                status = r.status_code
                if status != 200:
                    err = f"HTTP {status}: {r.read()[:300].decode(errors='replace')}"
                else:
                    for line in r.iter_lines():
                        rec.feed(line, time.perf_counter())
                        if rec.done:
                            break
                    err = rec.check(a.max_tokens)
            finished = True
        except Exception as e:  # noqa: BLE001  (transport errors, timeouts: a failed request)
            err = f"{type(e).__name__}: {e}"
            finished = True
        finally:  # also on GreenletExit, when the shape stops the run with this request open
            t_end = time.perf_counter()
            if not finished:
                err = "unfinished when the run stopped (drain time over)"
            self._record(a, rec, t0, t_end, status, err, unfinished=not finished)

    def _record(self, a: Arrival, rec: StreamRecorder, t0: float, t_end: float, status: int | None,
                err: str | None, unfinished: bool) -> None:
        p = PLAN
        assert p.origin is not None
        ttft = rec.ttft_s()
        gaps = rec.gaps_s()
        ok = err is None
        p.write({"i": a.index, "step": a.step, "qps": a.qps, "tier": a.tier, "prompt_tokens": a.prompt_tokens,
                 "max_tokens": a.max_tokens, "t_sched": round(a.t_s, 6), "t_sent": round(t0 - p.origin, 6),
                 "lag_s": round(t0 - p.origin - a.t_s, 6), "status": status, "ok": ok, "error": err,
                 "unfinished": unfinished, "ttft_s": None if ttft is None else round(ttft, 6),
                 "e2e_s": round(t_end - t0, 6), "tokens": len(rec.token_times),
                 "completion_tokens": rec.completion_tokens(), "tbt_s": [round(g, 6) for g in gaps]})
        fire = self.environment.events.request.fire
        if ttft is not None:
            fire(request_type="TTFT", name=a.tier, response_time=ttft * 1000.0, response_length=0,
                 exception=None, context={})
        for g in gaps:
            fire(request_type="TBT", name=a.tier, response_time=g * 1000.0, response_length=0,
                 exception=None, context={})
        fire(request_type="POST", name=f"/v1/completions [{a.tier}]", response_time=(t_end - t0) * 1000.0,
             response_length=rec.completion_tokens(), exception=None if ok else RuntimeError(err), context={})


