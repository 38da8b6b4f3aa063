"""Routing decision time per policy and replica count, on the Mooncake trace's prefixes.

  python -m loadtest.router_decision_time [--trace PATH] [--replicas 8 64] [--requests 5000]
                                          [--policies slo slo-no-prefix prefix-affinity pow2] [--json PATH]

A router's hot path, without Serve: for each (policy, N) a fresh policy (`make_router_policy`)
ranks the trace's requests, in order, over N replica views, and is told the choice (`on_routed`),
as the Serve adapter and the cluster simulator do.  Each request carries the trace's prefix block
hashes (512 tokens a block), its prompt length, and a tier (premium one in five).  The views are
what a router sees: a feedback snapshot per replica (waiting prompts drawn from the trace's prompt
lengths, running decodes per tier, KV use, batch time, per-tier p99 TBT), replaced by a fresh one
for a random replica ``--snapshots-per-decision`` times per decision on average (so the policies'
per-snapshot caches are rebuilt inside the timed calls at that rate), and the in-flight ledger of
what was routed since each replica's snapshot.  Building the views is the router's work, not the
policy's, and is not timed.

Timed with time.perf_counter_ns, per decision: ``rank`` alone, ``on_routed`` alone, and both;
``p99 warm`` is rank's p99 past the first ``--warmup`` decisions (while the prefix index and the
per-snapshot caches fill, decisions cost more).
Each (policy, N) run is replayed ``--rounds`` times from the same seeds (the same snapshots,
requests, choices and cache rebuilds each time) and a decision's time is its least over the
rounds: on a shared machine a decision that was descheduled in one round is not in all of them,
so the percentiles are of the decisions' own work (the JSON also keeps the first round's raw
percentiles).  Printed as a table (p50 / p99 / max, microseconds) and, with ``--json``, written as
JSON.  The garbage collector stays on, as in a router.  ``reuse`` is the share of prompt tokens the chosen
replica had been sent before (an unbounded count over this run's decisions): it shows whether a
policy's affinity engages, not how good the routing is (the loads here do not follow the choices).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from replica.slo import PROMPT_HISTOGRAM_EDGES, SNAPSHOT_VERSION
from replica.traces import MOONCAKE_TRACE_PATH
from replica.traces import load_trace as load_trace_file
from router.feedback import ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.base import RoutingContext, RoutingRequest
from router.policies.registry import make_router_policy

TIERS = {"premium": (0.1, 0), "free": (0.5, 1)}  # name -> (TBT SLO s, rank)
DECISION_DT_S = 0.01  # virtual time between two decisions


def load_requests(path: Path, limit: int) -> tuple[list[tuple[int, tuple[int, ...]]], int]:
    """The first ``limit`` (0: all) usable requests of a prefix trace (`replica.traces.load_trace`:
    requests longer than the model's context are left out, as in the simulators) as (prompt
    length, prefix hashes), and the trace's hash block size."""
    trace = load_trace_file(path)
    n = len(trace) if not limit else min(limit, len(trace))
    if not trace.has_prefixes:
        raise SystemExit(f"error: {path} has no prefix hashes")
    return [(int(trace.prompt_lens[i]), trace.prefix_hashes[i]) for i in range(n)], trace.hash_block_tokens


def _histogram(prompts: list[int]) -> list[int]:
    counts = [0] * len(PROMPT_HISTOGRAM_EDGES)
    for p in prompts:
        counts[max(k for k, e in enumerate(PROMPT_HISTOGRAM_EDGES) if p >= e)] += 1
    return counts


def make_snapshot(rid: str, t: float, rng: random.Random, prompt_lens: list[int]) -> ReplicaFeedback:
    """A plausible version-1 snapshot of a busy replica."""
    waiting = [rng.choice(prompt_lens) for _ in range(rng.randint(0, 6))]
    decodes = {"premium": rng.randint(0, 16), "free": rng.randint(0, 48)}
    tiers = {name: {"ttft_p50_s": 0.3, "ttft_p99_s": 1.5, "tbt_p50_s": slo * 0.3,
                    "tbt_p99_s": slo * rng.uniform(0.4, 1.1), "tbt_miss_frac": 0.0,
                    "ttft_misses_total": 0, "tbt_misses_total": 0, "tokens_total": 1000}
             for name, (slo, _) in TIERS.items()}
    return ReplicaFeedback.from_snapshot({
        "version": SNAPSHOT_VERSION, "replica_id": rid, "timestamp_s": t,
        "num_waiting": len(waiting), "num_running": sum(decodes.values()),
        "waiting_prefill_tokens": sum(waiting),
        "waiting_prompt_histogram": {"edges": list(PROMPT_HISTOGRAM_EDGES), "counts": _histogram(waiting)},
        "running_decodes_by_tier": decodes, "kv_usage": rng.uniform(0.2, 0.9),
        "mean_batch_time_s": rng.uniform(0.03, 0.07), "tiers": tiers,
    })


def _pct(xs: list[int], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1e3


def _stats(ns: list[int]) -> dict:
    xs = sorted(ns)
    return {"p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99), "max": xs[-1] / 1e3}


def run_one(policy_name: str, n: int, rows: list[tuple[int, tuple[int, ...]]], block_tokens: int, seed: int,
            snapshots_per_decision: float,
            rounds: int = 3, warmup: int = 1000) -> dict:
    runs = [replay(policy_name, n, rows, block_tokens, seed, snapshots_per_decision) for _ in range(max(1, rounds))]
    (rank0, routed0, choices0, reuse), rest = runs[0], runs[1:]
    assert all(r[2] == choices0 for r in rest), "a replay chose differently: the run is not deterministic"
    rank_ns = [min(xs) for xs in zip(*(r[0] for r in runs))]
    routed_ns = [min(xs) for xs in zip(*(r[1] for r in runs))]
    both = [min(a + b for a, b in zip(xa, xb)) for xa, xb in zip(zip(*(r[0] for r in runs)), zip(*(r[1] for r in runs)))]
    return {
        "policy": policy_name, "replicas": n, "decisions": len(rows), "rounds": len(runs),
        "rank_us": _stats(rank_ns), "on_routed_us": _stats(routed_ns), "decision_us": _stats(both),
        "warmup": warmup if len(rows) > warmup else 0,
        "rank_us_after_warmup": _stats(rank_ns[warmup:] if len(rows) > warmup else rank_ns),
        "first_round_raw": {"rank_us": _stats(rank0), "on_routed_us": _stats(routed0),
                            "decision_us": _stats([a + b for a, b in zip(rank0, routed0)])},
        "reuse": reuse,
    }


def replay(policy_name: str, n: int, rows: list[tuple[int, tuple[int, ...]]], block_tokens: int, seed: int,
           snapshots_per_decision: float) -> tuple[list[int], list[int], list[str], float]:
    """One run: per decision the rank and on_routed times (ns), the choices, and the reuse share."""
    rng = random.Random(seed)
    prompt_lens = [p for p, _ in rows]
    ids = [f"replica-{i:03d}" for i in range(n)]
    now = 0.0
    # a pool of snapshots built ahead (parsing one is not the policy's work)
    pool = [make_snapshot(ids[i % n], 0.0, rng, prompt_lens) for i in range(max(4 * n, 256))]
    feedback = {rid: make_snapshot(rid, 0.0, rng, prompt_lens) for rid in ids}
    ledger = InFlightLedger(clock=lambda: now)
    ctx = RoutingContext(tier_tbt_slo_s={k: v[0] for k, v in TIERS.items()}, seed=seed)
    policy = make_router_policy(policy_name, ctx)
    seen: dict[str, set[int]] = {rid: set() for rid in ids}  # every block hash each replica was sent
    rank_ns: list[int] = []
    routed_ns: list[int] = []
    choices: list[str] = []
    reused = total = 0
    clock = time.perf_counter_ns
    for k, (prompt_len, hashes) in enumerate(rows):
        now = k * DECISION_DT_S
        refresh = snapshots_per_decision
        while refresh > 0:
            if rng.random() < refresh:
                rid = rng.choice(ids)
                fb = pool[rng.randrange(len(pool))]
                feedback[rid] = fb.model_copy(update={"replica_id": rid, "timestamp_s": now})
                ledger.on_snapshot(rid, now)
            refresh -= 1
        tier = "premium" if rng.random() < 0.2 else "free"
        slo, rank_ = TIERS[tier]
        request = RoutingRequest(request_id=f"q{k}", tier=tier, tbt_slo_s=slo, tier_rank=rank_,
                                 prompt_len=prompt_len, prefix_hashes=hashes,
                                 prefix_block_tokens=block_tokens)
        views = build_views(ids, feedback, ledger, now)
        t0 = clock()
        choice = policy.rank(request, views)[0]
        t1 = clock()
        policy.on_routed(request, choice)
        t2 = clock()
        rank_ns.append(t1 - t0)
        routed_ns.append(t2 - t1)
        ledger.record(choice, request)
        held = seen[choice]
        blocks = 0
        for h in hashes:
            if h not in held:
                break
            blocks += 1
        reused += min(blocks * block_tokens, request.prompt_len)
        total += request.prompt_len
        held.update(hashes)
        choices.append(choice)
    return rank_ns, routed_ns, choices, (reused / total if total else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=None, help="a Mooncake-style JSONL trace (default: the shipped Mooncake trace)")
    ap.add_argument("--replicas", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--policies", nargs="+", default=["slo", "slo-no-prefix", "prefix-affinity", "pow2"])
    ap.add_argument("--requests", type=int, default=5000, help="the trace's first requests (0: all)")
    ap.add_argument("--snapshots-per-decision", type=float, default=0.5,
                    help="fresh replica snapshots per decision, on average")
    ap.add_argument("--rounds", type=int, default=3, help="replays per (policy, N); a decision's time is its least")
    ap.add_argument("--warmup", type=int, default=1000,
                    help="decisions left out of the 'after warm-up' rank percentiles (the prefix index and the "
                         "per-snapshot caches fill during the first ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    trace = args.trace or MOONCAKE_TRACE_PATH
    rows, block_tokens = load_requests(trace, args.requests)
    if not rows:
        print(f"no requests in {trace}", file=sys.stderr)
        return 1
    results = []
    load_before = os.getloadavg()[0]
    header = (f"{'policy':<16} {'N':>3} {'rank p50':>9} {'p99':>7} {'max':>8} {'p99 warm':>8} | {'on_routed p50':>13} "
              f"{'p99':>6} {'max':>7} | {'both p99':>8} | {'reuse':>5}")
    print(f"{len(rows)} requests of {trace.name}, microseconds per decision (least of {args.rounds} replays)")
    print(header)
    print("-" * len(header))
    for n in args.replicas:
        for name in args.policies:
            r = run_one(name, n, rows, block_tokens, args.seed, args.snapshots_per_decision, args.rounds, args.warmup)
            results.append(r)
            a, b, c = r["rank_us"], r["on_routed_us"], r["decision_us"]
            w = r["rank_us_after_warmup"]
            print(f"{name:<16} {n:>3} {a['p50']:>9.1f} {a['p99']:>7.1f} {a['max']:>8.0f} {w['p99']:>8.1f} | "
                  f"{b['p50']:>13.1f} {b['p99']:>6.1f} {b['max']:>7.0f} | {c['p99']:>8.1f} | {r['reuse']:>5.2f}",
                  flush=True)
    load_after = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {load_after:.1f} after")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"trace": str(trace), "requests": len(rows), "rounds": args.rounds,
                                         "snapshots_per_decision": args.snapshots_per_decision,
                                         "python": sys.version.split()[0], "cpus": os.cpu_count(),
                                         "load_average_1min": [load_before, load_after],
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
