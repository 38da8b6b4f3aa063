"""The engine's own gaps between tokens, per tier, from a running app: a Ray driver process for
`loadtest.stream_path` (run by it; not a command for people).

    python -m loadtest.engine_gaps --address 127.0.0.1:PORT --app default     (RAY_AUTH_TOKEN_PATH set)

It joins the app's loopback Ray cluster as a driver, with the cluster's own token (Ray's token
authentication stays on: the launcher prints where its private token is, `ray_access` reads that
line from the launcher's log), and answers one JSON request per stdin line with one JSON line on
stdout, calling every LLM replica through ``DeploymentHandle.broadcast``:

* ``{"op": "mark"}``: each replica's mark (`replica.deployment.LLMReplica.tbt_gaps_since`:
  ``{replica_id: clock_s}``, on the clock of its engine's SLO tracker);
* ``{"op": "collect", "marks": {...}, "max_samples_per_tier": N}``: the TBT gaps the engines
  produced since those marks, merged over the replicas, per tier: ``gap_p50_s``, ``gap_p99_s``,
  ``num_gaps``, ``sampled``, ``complete``;
* ``{"op": "idle", "timeout_s": S}``: waits until no engine holds a request (``engine_state``).

The tracker records every gap anyway (it feeds the routers); reading them here adds no work per
token on the serving path.  A separate process, so that the benchmark's HTTP client process does
not carry a Ray driver's threads (its CPU time is measured), and so that an app's Ray never shares
a process with the client.  Replies go to the file descriptor stdout had at start; everything
else this process prints (Ray's own output) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["APP_NAME", "REPLICA_DEPLOYMENT", "merge_tier_gaps", "quantile_s", "ray_access"]

APP_NAME = "default"  # serve_app.__main__.APP_NAME (importing it here would import the whole app)
REPLICA_DEPLOYMENT = "LLMReplica"  # serve_app.app's deployment name for replica.deployment.LLMReplica
READY = "ready"
_ACCESS = re.compile(r"RAY_AUTH_TOKEN_PATH=(\S+) ray status --address (\[?[0-9A-Fa-f.:]+\]?:[0-9]+)")


def ray_access(launcher_log: str) -> tuple[str, str] | None:
    """(token path, GCS address) from a ``python -m serve_app`` log: the line where the launcher
    says where its private Ray token is; None if it has not said it."""
    m = _ACCESS.search(launcher_log)
    return (m.group(1), m.group(2)) if m else None


def quantile_s(values: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of ``values`` (an observed value: numpy's ``inverted_cdf``), None if empty."""
    return float(np.quantile(values, q, method="inverted_cdf")) if len(values) else None


def merge_tier_gaps(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per tier over the replicas' `LLMReplica.tbt_gaps_since` results: p50/p99 of all their gaps
    (strided samples where a replica had more than its bound), how many there were, whether any
    replica strided (``sampled``) or may have lost some (not ``complete``)."""
    gaps: dict[str, list[np.ndarray]] = {}
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        for tier, t in (r.get("tiers") or {}).items():
            gaps.setdefault(tier, []).append(np.asarray(t["gaps_s"], dtype=np.float64))
            o = out.setdefault(tier, {"num_gaps": 0, "sampled": False, "complete": True})
            o["num_gaps"] += int(t["num_gaps"])
            o["sampled"] |= bool(t["sampled"])
            o["complete"] &= bool(t["complete"])
    for tier, arrays in gaps.items():
        merged = np.concatenate(arrays) if arrays else np.empty(0)
        out[tier].update(gap_p50_s=quantile_s(merged, 0.5), gap_p99_s=quantile_s(merged, 0.99))
    return out


# ------------------------------------------------------------------------------ the driver process

def _broadcast(handle: Any, method: str, *args: Any, timeout_s: float) -> tuple[list[Any], list[str]]:
    """``method`` on every running replica: (results, errors as text)."""
    results = handle.broadcast(method, *args).results(timeout_s=timeout_s, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if isinstance(r, BaseException)]
    return ok, errors


def _serve(handle: Any, request: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    op = request.get("op")
    if op == "mark":
        ok, errors = _broadcast(handle, "tbt_gaps_since", timeout_s=timeout_s)
        return {"marks": {r["replica_id"]: r["clock_s"] for r in ok}, "errors": errors}
    if op == "collect":
        marks = dict(request["marks"])
        ok, errors = _broadcast(handle, "tbt_gaps_since", marks, int(request.get("max_samples_per_tier", 200_000)),
                                timeout_s=timeout_s)
        answered = [r for r in ok if "tiers" in r]
        unmarked = sorted(r["replica_id"] for r in ok if "tiers" not in r)
        return {"tiers": merge_tier_gaps(answered), "replicas": len(answered), "replicas_without_mark": unmarked,
                "errors": errors}
    if op == "idle":
        t0 = time.monotonic()
        deadline = t0 + float(request.get("timeout_s", 30.0))
        while True:
            ok, errors = _broadcast(handle, "engine_state", timeout_s=timeout_s)
            unfinished = sum(int(r["num_unfinished"]) for r in ok)
            if (unfinished == 0 and not errors) or time.monotonic() >= deadline:
                return {"num_unfinished": unfinished, "waited_s": round(time.monotonic() - t0, 3), "errors": errors}
            time.sleep(0.2)
    raise ValueError(f"unknown op {op!r}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.engine_gaps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True, help="the app's GCS address (loopback)")
    ap.add_argument("--app", default=APP_NAME, help="the Serve application's name (default %(default)s)")
    ap.add_argument("--deployment", default=REPLICA_DEPLOYMENT, help="the replicas' deployment (default %(default)s)")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="per broadcast (default %(default)s)")
    args = ap.parse_args(argv)
    if not args.address.startswith("127.0.0.1:"):
        ap.error(f"--address {args.address}: only a loopback cluster (127.0.0.1:PORT)")
    if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        ap.error("RAY_AUTH_TOKEN_PATH must name the cluster's token (Ray's token authentication stays on)")
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # Ray's own output, even from C++, goes to stderr

    from serve_app.ray_auth import require_enabled, require_token_mode
    from serve_app.ray_loopback import local_only, require_loopback

    require_token_mode()
    local_only()  # before ray is imported: this driver's ports on 127.0.0.1 too
    import ray
    from ray import serve

    ray.init(address=args.address, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False,
             configure_logging=False)
    try:
        require_enabled()
        require_loopback()
        handle = serve.get_deployment_handle(args.deployment, app_name=args.app)
        replies.write(json.dumps({READY: True}) + "\n")
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = _serve(handle, json.loads(line), args.timeout_s)
            except Exception as e:  # noqa: BLE001 - every request gets an answer
                reply = {"error": f"{type(e).__name__}: {e}"[:500]}
            replies.write(json.dumps(reply) + "\n")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
