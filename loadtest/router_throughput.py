"""Ingress + router throughput: our tier-aware router against Ray Serve's default router.

  python -m loadtest.router_throughput [--seconds 20] [--concurrency 32] [--replicas 3]

Runs the Serve app in this process on 127.0.0.1 (sim backend with a negligible cost: time_scale
1e-6, so the engine is not the bottleneck), once per router, and drives each with `concurrency`
clients sending 1-token completions, in ABBA order (slo, default, default, slo), `seconds` per
router in all; prints requests/s per run, the means and their ratio as JSON.  The cluster is closed
(every Ray port on 127.0.0.1: serve_app/ray_loopback.py) and Ray's token authentication stays on,
with a private token for the run (serve_app/ray_auth.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import httpx
from loadtest.ports import free_port as _free_port

KEY = "bench-key-0123456789"


async def _drive(url: str, seconds: float, concurrency: int) -> dict:
    body = {"model": "mistral-7b-sim", "prompt": "Hello, how are you?", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    done = errors = 0
    stop_at = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal done, errors
        while time.monotonic() < stop_at:
            r = await c.post(url, json=body, headers=headers)
            if r.status_code == 200:
                done += 1
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        for _ in range(20):  # warm-up
            await c.post(url, json=body, headers=headers)
        t0 = time.monotonic()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {"requests_per_s": round(done / elapsed, 1), "requests": done, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.router_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ["TIERED_API_KEYS"] = f"{KEY}:free"
    from serve_app.ray_loopback import local_only, require_loopback, runtime_env

    local_only()  # before Ray is imported: a closed, loopback-only cluster (serve_app/ray_loopback.py)
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.ray_auth import private_token, require_enabled

    port = _free_port()
    results = {}
    # Ray token authentication on, with a token of this run's own (serve_app/ray_auth.py)
    with tempfile.TemporaryDirectory() as tmp, private_token(prefix="router-throughput-auth-"):
        ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
                 log_to_driver=False, runtime_env=runtime_env({"TIERED_API_KEYS": os.environ["TIERED_API_KEYS"]}))
        try:
            require_enabled()
            require_loopback()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # ABBA order, so neither router always runs on a colder or warmer cluster
            for policy in ("slo", "serve-default", "serve-default", "slo"):
                serve.run(build_app({"overrides": {"engine.time_scale": 1e-6, "router.policy": policy,
                                                   "replicas.num_replicas": a.replicas,
                                                   "router.feedback_period_s": 1.0}}),
                          name="bench", route_prefix="/")
                run = asyncio.run(_drive(f"http://127.0.0.1:{port}/v1/completions", a.seconds / 2, a.concurrency))
                results.setdefault(policy, []).append(run)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    mean = {p: sum(r["requests_per_s"] for r in runs) / len(runs) for p, runs in results.items()}
    results["mean_requests_per_s"] = {p: round(v, 1) for p, v in mean.items()}
    results["ratio"] = round(mean["slo"] / mean["serve-default"], 3)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
