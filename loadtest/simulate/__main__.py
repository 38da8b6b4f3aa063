"""Virtual-time benchmarks.

  python -m loadtest.simulate paper [--requests N] [--profile P] [--trace T] [--tiers X] [--json PATH]
      the paper's single-GPU experiment for every scheduler: QPS sweep, capacity, comparison
  python -m loadtest.simulate run --scheduler S --qps Q [--requests N] ...
      one scheduler at one QPS, statistics printed as JSON
  python -m loadtest.simulate cluster --replicas N[,N...] [--pairs ROUTER+SCHEDULER,...] [--json PATH]
      N replicas behind routers (virtual time, stale feedback, ledger): capacity of each pair
  python -m loadtest.simulate ceiling [--budgets 512,1024] [--results RESULTS.json] [--json PATH] ...
      the cost model's throughput ceiling per token budget (no simulation), and each scheduler's
      capacities of a paper sweep as a fraction of it (loadtest/simulate/ceiling.py)
  python -m loadtest.simulate autoscale --policy fixed|ray-default|tier-aware [--workload day|mooncake] [--json PATH]
      a simulated day (or the Mooncake trace's timestamps) with the replica count fixed or
      autoscaled: GPU-hours, per-tier SLO attainment, scale events (loadtest/simulate/autoscale.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loadtest.cli_args import positive_floats
from loadtest.metrics import P99_TTFT_BOUND_S
from loadtest.simulate.report import write_paper_report
from loadtest.simulate.sweep import PAPER_QPS, Runner, SweepSetup, _profile, _trace, run_point, sweep_with_capacity
from replica.policy.registry import available_schedulers, paper_schedulers


def _schedulers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in available_schedulers()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scheduler(s) {unknown}; choose from {available_schedulers()}")
    return names


def _setup_args(p: argparse.ArgumentParser) -> None:
    d = SweepSetup()
    p.add_argument("--profile", default=d.profile, help="cost profile name or JSON path (default %(default)s)")
    p.add_argument("--trace", default=d.trace, help="'paper', 'mooncake', a CSV of token counts, a ShareGPT JSON, or a "
                                                  "Mooncake-style JSONL with prefix hashes (the engines then have vLLM's "
                                                  "prefix cache)")
    p.add_argument("--arrivals", choices=("poisson", "replay"), default=d.arrivals,
                   help="a JSONL trace's arrivals: Poisson at the QPS (default), or its timestamps scaled to the QPS")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="engines without a prefix cache, even for a trace with prefix hashes")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="leave out requests longer than this (prompt + output; default: 32768 for a JSONL trace, "
                        "8192 for ShareGPT JSON)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer.json that counts a ShareGPT JSON trace's tokens")
    p.add_argument("--tiers", default=d.tiers, help="e.g. premium:0.1:0.05,free:0.5:0.95 or a YAML file (default: the paper's)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per run (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kv-blocks", type=int, default=d.kv_blocks, help="KV blocks of 16 tokens (default %(default)s)")


def _setup(a: argparse.Namespace) -> SweepSetup:
    """The run's setup, with its trace, profile and tiers loaded once here so that bad input
    stops the command with the loader's message (file and line) before any work starts."""
    if a.requests < 1:
        raise SystemExit("error: --requests must be >= 1")
    if a.max_model_len < 0:
        raise SystemExit("error: --max-model-len must be >= 0")
    setup = SweepSetup(profile=a.profile, trace=a.trace, tokenizer=a.tokenizer, tiers=a.tiers,
                       requests=a.requests, seed=a.seed, kv_blocks=a.kv_blocks, arrivals=a.arrivals,
                       prefix_caching=not a.no_prefix_caching, max_model_len=a.max_model_len)
    try:
        trace = _trace(setup.trace, setup.tokenizer, setup.max_model_len)
        if trace.has_prefixes and setup.requests > len(trace):
            raise ValueError(f"--requests {setup.requests}: {trace.source} has {len(trace)} usable requests "
                             "(a prefix trace is replayed in order, once)")
        if a.arrivals == "replay" and trace.arrival_s is None:
            raise ValueError(f"--arrivals replay: {trace.source} has no timestamps")
        _profile(setup.profile)
        setup.tier_mix()
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return setup


def cmd_paper(a: argparse.Namespace) -> int:
    setup = _setup(a)
    t0 = time.perf_counter()
    saturation: dict[str, dict] = {}

    def saturation_runs():  # independent of the sweep: run alongside it
        sat = [n for n in a.saturation_schedulers if n in a.schedulers] if a.saturation_qps else []
        for res in (yield [(name, a.saturation_qps) for name in sat]):
            saturation[res["scheduler"]] = res

    with Runner(setup, jobs=a.jobs, progress=not a.quiet) as runner:
        results = sweep_with_capacity(runner, a.schedulers, a.qps, refine_steps=a.refine,
                                      p99_ttft_bound_s=a.p99_ttft_bound_s or None, also=[saturation_runs()])
        ref_name = "sarathi-fcfs" if "sarathi-fcfs" in results else a.schedulers[0]
        ref_qps = results[ref_name]["capacity_qps"] or min(a.qps)
        at_ref = {}
        todo = []
        for name, r in results.items():
            hit = [p for p in r["points"] if abs(p["qps"] - ref_qps) < 1e-9]
            if hit:
                at_ref[name] = hit[0]
            else:
                todo.append((name, ref_qps))
        for res in runner.run(todo):
            at_ref[res["scheduler"]] = res
    wall_s = time.perf_counter() - t0
    paths = write_paper_report(setup, results, ref_name, ref_qps, at_ref, saturation, wall_s, Path(a.out), a.json)
    print((Path(a.out) / "summary.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}; {wall_s:.1f} s", file=sys.stderr)
    return 0


def cmd_ceiling(a: argparse.Namespace) -> int:
    from loadtest.simulate import ceiling

    return ceiling.run(_setup(a), a.budgets, a.results, a.json)


def cmd_run(a: argparse.Namespace) -> int:
    res = run_point(_setup(a), a.scheduler, a.qps)
    print(json.dumps(res, indent=2))
    return 0


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _pairs(text: str) -> list[str]:
    from loadtest.simulate.cluster_sweep import split_pair
    from router.policies.registry import available_router_policies

    pairs = [x.strip() for x in text.split(",") if x.strip()]
    routers = {r.replace("-", "_") for r in available_router_policies()}
    for pair in pairs:
        try:
            router, scheduler = split_pair(pair)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if router.replace("-", "_") not in routers:
            raise argparse.ArgumentTypeError(f"unknown router {router!r} in {pair!r}; choose from {sorted(routers)}")
        _schedulers(scheduler)
    return pairs


def _router_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def cmd_cluster(a: argparse.Namespace) -> int:
    from loadtest.simulate.cluster_sweep import ClusterSetup, cluster_capacity, make_runner, report

    names = [x.strip() for x in a.profile.split(",") if x.strip()]
    _setup(argparse.Namespace(**{**vars(a), "profile": names[0] if names else a.profile}))  # trace, tiers
    for name in names:
        try:
            _profile(name.strip())
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if a.router_option:
        from loadtest.simulate.cluster_sweep import split_pair
        from router.policies.registry import make_router_policy

        for pair in a.pairs:
            try:
                make_router_policy(split_pair(pair)[0], None, **dict(a.router_option))
            except ValueError as e:
                print(f"error: --router-option: {e}", file=sys.stderr)
                raise SystemExit(2) from None
    t0 = time.perf_counter()
    scaling: dict[int, dict[str, float]] = {}
    pairs: dict = {}
    setup = None
    for n in a.replicas:
        requests = a.requests if a.requests_total else a.requests * n
        trace = _trace(a.trace, a.tokenizer, a.max_model_len)
        if trace.has_prefixes and requests > len(trace):
            print(f"error: {requests} requests for {n} replicas: {trace.source} has {len(trace)} usable requests "
                  "(a prefix trace is replayed in order, once); lower --requests", file=sys.stderr)
            raise SystemExit(2)
        setup = ClusterSetup(num_replicas=n, profiles=a.profile, trace=a.trace, tokenizer=a.tokenizer, tiers=a.tiers,
                             requests=requests, seed=a.seed, kv_blocks=a.kv_blocks, num_routers=a.routers,
                             feedback_period_s=a.feedback_period, feedback_delay_s=a.feedback_delay,
                             use_ledger=not a.no_ledger, arrivals=a.arrivals,
                             prefix_caching=not a.no_prefix_caching, max_model_len=a.max_model_len,
                             router_options=tuple(a.router_option))
        with make_runner(setup, a.jobs, not a.quiet) as runner:
            pairs = cluster_capacity(runner, a.pairs, a.qps, refine_steps=a.refine)
        scaling[n] = {p: r["capacity_qps"] for p, r in pairs.items()}
    wall_s = time.perf_counter() - t0
    out = Path(a.out or f"results/cluster-{Path(a.profile.split(',')[0]).stem}-n{a.replicas[-1]}")
    paths = report(setup, pairs, scaling, wall_s, out, a.json)
    print((out / "summary.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}; {wall_s:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("paper", help="the paper's sweep for every scheduler")
    _setup_args(p)
    p.add_argument("--schedulers", type=_schedulers, default=paper_schedulers(),
                   help="comma-separated (default: the paper's and RAD; slai-plus and its ablation by name)")
    p.add_argument("--qps", type=positive_floats, default=list(PAPER_QPS), help="QPS points (default 0.2..2.0)")
    p.add_argument("--saturation-qps", type=float, default=3.0,
                   help="also run --saturation-schedulers at this overload QPS to measure throughput (0: skip)")
    p.add_argument("--saturation-schedulers", type=_schedulers, default=["sarathi-fcfs", "rad"],
                   help="schedulers run at --saturation-qps (default %(default)s)")
    p.add_argument("--refine", type=int, default=3, help="bisection rounds for each capacity (default %(default)s)")
    p.add_argument("--p99-ttft-bound-s", type=float, default=P99_TTFT_BOUND_S,
                   help="also the P99-TTFT capacity: stable, SLOs met and P99 TTFT (all requests) at most this many "
                        "seconds (default %(default)s: the 10-second attention limit of interactive response times, "
                        "loadtest/metrics.py; 0: skip it and its extra runs)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--out", default=None, help="results folder (default results/paper-PROFILE)")
    p.add_argument("--json", default=None, help="also write the results JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("run", help="one scheduler at one QPS")
    _setup_args(r)
    r.add_argument("--scheduler", required=True, type=lambda s: _schedulers(s)[0])
    r.add_argument("--qps", required=True, type=float)
    c = sub.add_parser("cluster", help="N replicas behind routers: capacity of (router, scheduler) pairs")
    _setup_args(c)
    from loadtest.simulate.cluster_sweep import CLUSTER_QPS_PER_REPLICA, DEFAULT_PAIRS

    c.set_defaults(requests=1000)
    c.add_argument("--replicas", type=_ints, required=True,
                   help="replicas N, or a list (1,4,8,16) for capacity vs N; the JSON's pairs are the last N's")
    c.add_argument("--requests-total", action="store_true",
                   help="--requests is per run for the whole cluster (default: per replica, scaled by N)")
    c.add_argument("--pairs", type=_pairs, default=list(DEFAULT_PAIRS), help="ROUTER+SCHEDULER,... (default %(default)s)")
    c.add_argument("--qps", type=positive_floats, default=list(CLUSTER_QPS_PER_REPLICA),
                   help="QPS points per replica, scaled by N (default %(default)s)")
    c.add_argument("--routers", type=int, default=1, help="routers in front of the replicas (default 1)")
    c.add_argument("--feedback-period", type=float, default=1.0, help="snapshot period, s (default 1)")
    c.add_argument("--feedback-delay", type=float, default=0.0, help="snapshot delivery delay, s (default 0)")
    c.add_argument("--no-ledger", action="store_true", help="routers keep no in-flight ledger")
    c.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE", type=_router_option,
                   help="an option for the routers (e.g. prefix_guard_share=1.0; a JSON value), repeatable")
    c.add_argument("--refine", type=int, default=3, help="bisection rounds for each capacity (default %(default)s)")
    c.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    c.add_argument("--out", default=None, help="results folder (default results/cluster-PROFILE-nN)")
    c.add_argument("--json", default=None, help="also write the results JSON here")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("ceiling", help="the cost model's throughput ceiling per token budget (no simulation)")
    _setup_args(e)
    e.add_argument("--budgets", type=_ints, default=[512], help="token budgets, comma-separated (default 512)")
    e.add_argument("--results", default=None,
                   help="a paper sweep's results JSON (same profile, trace, requests, seed, KV blocks): each "
                        "scheduler's capacities as a fraction of the ceiling at its budget")
    e.add_argument("--json", default=None, help="also write the numbers here")
    s = sub.add_parser("autoscale", help="a day with the replica count fixed or autoscaled (GPU-hours, attainment)")
    from loadtest.simulate import autoscale

    autoscale.add_args(s)
    a = ap.parse_args(argv)
    if a.cmd == "autoscale":
        return autoscale.cli(a)
    if a.cmd == "ceiling":
        return cmd_ceiling(a)
    if a.cmd == "cluster":
        if a.routers < 1 or a.feedback_period <= 0 or a.feedback_delay < 0:
            raise SystemExit("error: --routers must be >= 1, --feedback-period > 0, --feedback-delay >= 0")
        return cmd_cluster(a)
    if a.cmd == "paper":
        if a.p99_ttft_bound_s < 0:
            raise SystemExit("error: --p99-ttft-bound-s must be >= 0")
        a.out = a.out or f"results/paper-{Path(a.profile).stem}"
        return cmd_paper(a)
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
