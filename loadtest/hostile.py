"""Hostile clients against the app, on loopback: does the strict tier keep its SLOs?

    python -m loadtest.hostile --serve [ARG=VALUE ...] [--out DIR] [--cases a,b,...]
    python -m loadtest.hostile --host http://127.0.0.1:8000 --keys premium=K,free=K1,free=K2

Each case plays an attacker with free keys while a premium client streams requests one after
another (a new one every ``--premium-interval`` seconds, 16 tokens each), and records what both
got: HTTP statuses, and the premium requests' time to first token and their longest gap between
tokens (as the client sees them).  Cases (``--cases``, default all but ``sigterm``):

* ``slow-bodies``: one free key opens 300 connections that send the headers and 1 byte of a
  64 KiB body, then wait (up to 15 s) - what happens to them, and to premium meanwhile;
* ``burst``: 200 free streams whose bodies all complete together, 3 s after their headers were
  sent - how many were admitted;
* ``key-hog``: one free key holds 130 long streams; a second free key sends one request;
* ``big-prompts``: 8 free requests with a 1 MB prompt, at once;
* ``hung-replica``: one replica process is stopped (SIGSTOP, then SIGCONT after the case; needs
  ``--serve``: the processes must be this tool's own) while premium and free traffic goes on;
* ``all-replicas-dead``: every replica process is killed (SIGKILL; Serve starts new ones):
  what requests and ``/health`` answer meanwhile;
* ``sigterm``: SIGTERM to the launcher during 10 streams (``--serve`` only; ends the run): do
  the streams end with ``[DONE]``, and how long does the launcher take to exit.

Everything goes to 127.0.0.1 only; every case has a deadline; with ``--serve`` the app is started
(`loadtest.capacity.launch_app`, the README's launcher) and stopped by this tool.  Writes
``hostile.json`` and ``hostile.md`` (the table in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CASES", "Target", "main", "run_cases"]

PREMIUM_TOKENS = 16


@dataclass
class Target:
    """The app under attack: its base URL (loopback), its model, its keys, and (when this tool
    started it) its launcher's pid."""

    base: str
    model: str
    premium_key: str
    free_keys: list[str]
    launcher_pid: int | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.base)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"hostile: refusing a non-loopback target {self.base}")
        return u.hostname, u.port or 80


# ------------------------------------------------------------------------------------ raw HTTP

async def _open(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = t.host_port
    return await asyncio.open_connection(host, port)


def _head(t: Target, key: str, body_len: int, path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {t.host_port[0]}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n").encode()


async def _response(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the whole body of a ``Connection: close`` response (status 0: none
    within ``timeout_s``; -1: the connection was closed without one)."""
    try:
        async with asyncio.timeout(timeout_s):
            line = await reader.readline()
            if not line:
                return -1, {}, b""
            status = int(line.split()[1])
            headers: dict[str, str] = {}
            while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            body = await reader.read()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = _dechunk(body)
            return status, headers, body
    except TimeoutError:
        return 0, {}, b""
    except (ConnectionError, ValueError, IndexError):
        return -1, {}, b""


def _dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body's data (as much as arrived)."""
    out, i = bytearray(), 0
    while i < len(raw):
        j = raw.find(b"\r\n", i)
        if j < 0:
            break
        size = int(raw[i:j].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += raw[j + 2:j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


def _body(t: Target, prompt: str = "hello", max_tokens: int = 16, stream: bool = False) -> bytes:
    return json.dumps({"model": t.model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}).encode()


async def request(t: Target, key: str, body: bytes, timeout_s: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One whole request (headers and body at once); its status, headers and body."""
    try:
        reader, writer = await _open(t)
    except OSError:
        return -1, {}, b""
    try:
        writer.write(_head(t, key, len(body)) + body)
        await writer.drain()
        return await _response(reader, timeout_s)
    finally:
        writer.close()


# ------------------------------------------------------------------------------------- premium

@dataclass
class PremiumProbe:
    """Premium streaming requests, one after another, while a case runs."""

    statuses: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    max_gap_s: list[float] = field(default_factory=list)

    async def run(self, t: Target, stop: asyncio.Event, interval_s: float) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await self.one(t)
            await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))

    async def one(self, t: Target) -> None:
        body = _body(t, "The premium client asks a short question.", PREMIUM_TOKENS, stream=True)
        t0 = time.perf_counter()
        try:
            reader, writer = await _open(t)
        except OSError:
            self.statuses.append(-1)
            return
        try:
            writer.write(_head(t, t.premium_key, len(body)) + body)
            await writer.drain()
            async with asyncio.timeout(60.0):
                line = await reader.readline()
                status = int(line.split()[1]) if line else -1
                times = []
                while (raw := await reader.readline()) != b"":
                    if raw.startswith(b"data: ") and b'"text"' in raw and b'"text": ""' not in raw:
                        times.append(time.perf_counter())
                    if raw.startswith(b"data: [DONE]"):
                        break
            self.statuses.append(status)
            if status == 200 and times:
                self.ttft_s.append(times[0] - t0)
                self.max_gap_s.append(max((b - a for a, b in zip(times, times[1:])), default=0.0))
        except (TimeoutError, ConnectionError, ValueError, IndexError):
            self.statuses.append(0)
        finally:
            writer.close()

    def summary(self) -> dict[str, Any]:
        q = statistics.quantiles
        return {
            "requests": len(self.statuses), "statuses": dict(Counter(self.statuses)),
            "ttft_p50_s": statistics.median(self.ttft_s) if self.ttft_s else None,
            "ttft_max_s": max(self.ttft_s, default=None),
            "ttft_p90_s": q(self.ttft_s, n=10)[-1] if len(self.ttft_s) >= 2 else None,
            "max_gap_s": max(self.max_gap_s, default=None),
        }


# ---------------------------------------------------------------------------------------- cases

async def case_slow_bodies(t: Target) -> dict[str, Any]:
    body = _body(t, "x" * (64 * 1024 - 100))
    conns = []
    for _ in range(300):
        try:
            reader, writer = await _open(t)
        except OSError:
            continue
        writer.write(_head(t, t.free_keys[0], len(body)) + body[:1])
        conns.append((reader, writer))
    await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
    results = await asyncio.gather(*(_response(r, 15.0) for r, _ in conns))
    for _, w in conns:
        w.close()
    return {"connections": len(conns), "statuses": dict(Counter(s for s, _, _ in results))}


async def case_burst(t: Target) -> dict[str, Any]:
    body = _body(t, "a burst of free streams", 200, stream=True)
    conns = []
    for _ in range(200):
        try:
            reader, writer = await _open(t)
        except OSError:
            continue
        writer.write(_head(t, t.free_keys[0], len(body)) + body[:1])
        conns.append((reader, writer))
    await asyncio.sleep(3.0)
    for _, w in conns:
        w.write(body[1:])
    await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
    results = await asyncio.gather(*(_response(r, 120.0) for r, _ in conns))
    for _, w in conns:
        w.close()
    statuses = Counter(s for s, _, _ in results)
    return {"streams": len(conns), "statuses": dict(statuses), "admitted": statuses.get(200, 0)}


async def case_key_hog(t: Target) -> dict[str, Any]:
    body = _body(t, "the hog holds a long stream", 2000, stream=True)
    conns = []
    for _ in range(130):
        reader, writer = await _open(t)
        writer.write(_head(t, t.free_keys[0], len(body)) + body)
        conns.append((reader, writer))
    await asyncio.sleep(3.0)  # the hog's streams are admitted (or refused) by now
    status, headers, content = await request(t, t.free_keys[1], _body(t, "the neighbour", 8), 60.0)
    for _, w in conns:
        w.close()
    ratelimit = sorted(h for h in headers if h.startswith("x-ratelimit-"))
    return {"neighbour_status": status, "neighbour_ratelimit_headers": ratelimit,
            "neighbour_error": json.loads(content).get("error", {}).get("code") if status != 200 and content else None}


async def case_big_prompts(t: Target) -> dict[str, Any]:
    body = _body(t, "word " * 200_000)  # 1 MB
    t0 = time.perf_counter()
    results = await asyncio.gather(*(request(t, t.free_keys[0], body, 60.0) for _ in range(8)))
    return {"statuses": dict(Counter(s for s, _, _ in results)), "all_answered_s": round(time.perf_counter() - t0, 3)}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child not reaped yet is a zombie: not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def replica_pids(launcher_pid: int) -> list[int]:
    """The LLMReplica actor processes of the app this tool launched."""
    pids = []
    for p in _tree(launcher_pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"LLMReplica" in f.read():
                    pids.append(p)
    return pids


async def _traffic(t: Target, n: int, key: str) -> Counter:
    results = await asyncio.gather(*(request(t, key, _body(t, "free traffic", 16), 60.0) for _ in range(n)))
    return Counter(s for s, _, _ in results)


async def case_hung_replica(t: Target) -> dict[str, Any]:
    if t.launcher_pid is None:
        return {"skipped": "needs --serve"}
    pids = replica_pids(t.launcher_pid)
    if not pids:
        return {"skipped": "no replica process found"}
    victim = pids[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        statuses = await _traffic(t, 12, t.free_keys[0])
        return {"replicas": len(pids), "free_statuses": dict(statuses), "free_all_answered_s":
                round(time.perf_counter() - t0, 2)}
    finally:
        os.kill(victim, signal.SIGCONT)


async def case_all_replicas_dead(t: Target) -> dict[str, Any]:
    if t.launcher_pid is None:
        return {"skipped": "needs --serve"}
    pids = replica_pids(t.launcher_pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    status, headers, _ = await request(t, t.free_keys[0], _body(t), 60.0)
    first_s = time.perf_counter() - t0
    hstatus, _, _ = await _get(t, "/health")
    back = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve starts new replicas
        if (await request(t, t.free_keys[0], _body(t), 30.0))[0] == 200:
            back = round(time.monotonic() - (deadline - 90), 1)
            break
        await asyncio.sleep(1.0)
    return {"killed": len(pids), "status": status, "retry_after": headers.get("retry-after"),
            "answered_s": round(first_s, 3), "health_status": hstatus, "served_again_after_s": back}


async def _get(t: Target, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await _open(t)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {t.host_port[0]}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await _response(reader, 30.0)
    finally:
        writer.close()


async def case_sigterm(t: Target) -> dict[str, Any]:
    if t.launcher_pid is None:
        return {"skipped": "needs --serve"}
    body = _body(t, "a stream cut by shutdown", 400, stream=True)

    async def stream() -> tuple[int, bool]:
        status, _, content = await request(t, t.free_keys[0], body, 120.0)
        return status, content.rstrip().endswith(b"data: [DONE]")

    tasks = [asyncio.create_task(stream()) for _ in range(10)]
    await asyncio.sleep(2.0)
    t0 = time.perf_counter()
    os.kill(t.launcher_pid, signal.SIGTERM)
    results = await asyncio.gather(*tasks)
    exited = None
    while time.perf_counter() - t0 < 120:
        if not _running(t.launcher_pid):
            exited = round(time.perf_counter() - t0, 1)
            break
        await asyncio.sleep(0.5)
    return {"streams": len(results), "statuses": dict(Counter(s for s, _ in results)),
            "ended_with_done": sum(d for _, d in results), "launcher_exited_after_s": exited}


CASES: dict[str, Callable[[Target], Awaitable[dict[str, Any]]]] = {
    "slow-bodies": case_slow_bodies, "burst": case_burst, "key-hog": case_key_hog, "big-prompts": case_big_prompts,
    "hung-replica": case_hung_replica, "all-replicas-dead": case_all_replicas_dead, "sigterm": case_sigterm,
}
DEFAULT_CASES = [c for c in CASES if c != "sigterm"]


async def run_case(t: Target, name: str, premium_interval_s: float = 0.5) -> dict[str, Any]:
    stop = asyncio.Event()
    probe = PremiumProbe()
    premium = asyncio.create_task(probe.run(t, stop, premium_interval_s))
    await asyncio.sleep(0.5)  # the premium client is going
    t0 = time.perf_counter()
    try:
        result = await CASES[name](t)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(premium, 70.0)
    return {"case": name, "seconds": round(time.perf_counter() - t0, 1), "attack": result, "premium": probe.summary()}


async def run_cases(t: Target, names: Sequence[str], premium_interval_s: float = 0.5,
                    settle_s: float = 5.0) -> list[dict[str, Any]]:
    out = []
    for name in names:
        out.append(await run_case(t, name, premium_interval_s))
        await asyncio.sleep(settle_s)  # the cluster drains before the next case
    return out


def markdown(results: list[dict[str, Any]], ttft_target_s: float, tbt_slo_s: float) -> str:
    rows = ["| case | attack result | premium: requests (statuses) | TTFT p50 / max (s) | longest gap (s) | "
            "premium within target |", "|---|---|---|---|---|---|"]
    for r in results:
        p = r["premium"]
        ok = (p["ttft_max_s"] is not None and p["ttft_max_s"] <= ttft_target_s and (p["max_gap_s"] or 0) <= tbt_slo_s
              and set(p["statuses"]) == {200})
        verdict = "n/a (the app shuts down)" if r["case"] == "sigterm" else "yes" if ok else "NO"
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append(f"| {r['case']} | {json.dumps(r['attack'], sort_keys=True)} | {p['requests']} "
                    f"({', '.join(f'{k}: {v}' for k, v in sorted(p['statuses'].items()))}) | "
                    f"{fmt(p['ttft_p50_s'])} / {fmt(p['ttft_max_s'])} | {fmt(p['max_gap_s'])} | "
                    f"{verdict} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.hostile", description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="a running app (loopback only): needs --keys")
    where.add_argument("--serve", nargs="*", metavar="ARG=VALUE", help="start the app with these build_app args")
    ap.add_argument("--keys", help="premium=KEY,free=KEY,free=KEY (two free keys) for --host")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated, from: " + ", ".join(CASES))
    ap.add_argument("--premium-interval", type=float, default=0.5, help="seconds between premium requests")
    ap.add_argument("--out", type=Path, default=Path("results/hostile"))
    ap.add_argument("--app-dir", type=Path, default=None, help="start the app from this checkout (--serve)")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)

    import httpx

    def target_of(base: str, premium: str, frees: list[str], pid: int | None) -> Target:
        model = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {premium}"}, timeout=10).json()
        return Target(base, model["data"][0]["id"], premium, frees, pid)

    if args.host:
        pairs = [p.split("=", 1) for p in (args.keys or "").split(",") if p]
        premium = [k for t, k in pairs if t == "premium"]
        frees = [k for t, k in pairs if t == "free"]
        if len(premium) != 1 or len(frees) < 2:
            ap.error("--keys needs premium=KEY and two free=KEY")
        results = asyncio.run(run_cases(target_of(args.host, premium[0], frees, None), names, args.premium_interval))
    else:
        from loadtest.capacity import launch_app

        keys = {"premium": "hs-premium-" + os.urandom(8).hex(), "free": "hs-free-" + os.urandom(8).hex()}
        free2 = "hs-free2-" + os.urandom(8).hex()
        with launch_app(args.serve or [], keys=keys, extra_keys=[(free2, "free")], log_path=args.out / "app.log",
                        app_dir=args.app_dir) as app:
            t = target_of(app.base, keys["premium"], [keys["free"], free2], app.pid)
            results = asyncio.run(run_cases(t, names, args.premium_interval))
    (args.out / "hostile.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, ttft_target_s=0.5, tbt_slo_s=0.1)
    (args.out / "hostile.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
