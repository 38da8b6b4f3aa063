"""Cluster capacity for (router, scheduler) pairs: QPS sweeps of `run_cluster`, in parallel.

One task = (``"ROUTER+SCHEDULER"``, cluster QPS): build the workload (the paper's trace, Poisson
arrivals, tiers by share), run it through `N` replicas in virtual time, summarise it as one run
(`loadtest.metrics.summarize`: the paper's capacity criterion over the whole cluster).
`cluster_capacity` sweeps every pair over per-replica QPS points scaled by `N` and bisects to
each pair's capacity (`loadtest.simulate.sweep.sweep_with_capacity`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.metrics import summarize
from loadtest.simulate.cluster import ClusterConfig, run_cluster
from loadtest.simulate.replica import Workload
from loadtest.simulate.sweep import Runner, _profile, _trace, sweep_with_capacity
from replica.cost.profile import DEFAULT_COST_PROFILE
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.tiers import TierMix, paper_tiers, parse_tiers

DEFAULT_PAIRS = ("pow2+sarathi-fcfs", "pow2+slai-spf-dynamic", "slo+slai-spf-dynamic",
                 "least_work+slai-spf-dynamic", "sita+slai-spf-dynamic", "round_robin+slai-spf-dynamic")
CLUSTER_QPS_PER_REPLICA = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)


@dataclass(frozen=True)
class ClusterSetup:
    num_replicas: int = 8
    profiles: str = DEFAULT_COST_PROFILE  # comma-separated: cycled over the replicas
    trace: str = "paper"
    tokenizer: str = ""
    tiers: str = ""
    requests: int = 8_000  # per run, the whole cluster
    seed: int = 42
    kv_blocks: int = PAPER_KV_BLOCKS
    num_routers: int = 1
    feedback_period_s: float = 1.0
    feedback_delay_s: float = 0.0
    use_ledger: bool = True
    arrivals: str = "poisson"  # a prefix trace's arrivals: re-drawn at the QPS, or "replay"ed scaled to it
    prefix_caching: bool = True  # the engines' prefix cache, for a trace with prefix hashes
    max_model_len: int = 0  # requests longer than this are left out (0: the trace loader's default)
    router_options: tuple[tuple[str, Any], ...] = ()  # options for every pair's router (an ablation)

    def tier_mix(self) -> TierMix:
        return parse_tiers(self.tiers) if self.tiers else paper_tiers()

    def profile_names(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.profiles.split(",") if p.strip())


def split_pair(pair: str) -> tuple[str, str]:
    router, sep, scheduler = pair.partition("+")
    if not sep or not router or not scheduler:
        raise ValueError(f"a pair is ROUTER+SCHEDULER (e.g. slo+slai-spf-dynamic), got {pair!r}")
    return router, scheduler


def run_cluster_point(setup: ClusterSetup, pair: str, qps: float) -> dict[str, Any]:
    """One (pair, cluster QPS) run, summarised."""
    router, scheduler = split_pair(pair)
    wl = Workload.build(_trace(setup.trace, setup.tokenizer, setup.max_model_len), setup.requests, qps,
                        setup.tier_mix(), seed=setup.seed, arrivals=setup.arrivals)
    names = setup.profile_names()
    config = ClusterConfig(num_replicas=setup.num_replicas, schedulers=scheduler, profiles=names,
                           kv_blocks=setup.kv_blocks, router=router, router_options=dict(setup.router_options),
                           num_routers=setup.num_routers,
                           feedback_period_s=setup.feedback_period_s, feedback_delay_s=setup.feedback_delay_s,
                           use_ledger=setup.use_ledger, seed=setup.seed,
                           prefix_caching=setup.prefix_caching and wl.prefix_hashes is not None)
    run = run_cluster(wl, config, profiles={n: _profile(n) for n in names})
    return {"pair": pair, "router": router, "scheduler": scheduler, "replicas": setup.num_replicas,
            **summarize(run), "requests_per_replica": run.requests_per_replica}


def cluster_capacity(runner: Runner, pairs: list[str], qps_per_replica: list[float],
                     refine_steps: int = 3) -> dict[str, dict[str, Any]]:
    """Every pair's capacity (cluster QPS) with its per-tier P99 TBT and median TTFT at that load."""
    n = runner.setup.num_replicas
    grid = sorted({round(q * n, 6) for q in qps_per_replica})
    results = sweep_with_capacity(runner, pairs, grid, refine_steps=refine_steps)
    out = {}
    for pair, r in results.items():
        at = next((p for p in r["points"] if p["qps"] == r["capacity_qps"]), None)
        out[pair] = {
            "capacity_qps": r["capacity_qps"],
            "capacity_qps_per_replica": r["capacity_qps"] / n,
            "stable_capacity_qps": r["stable_capacity_qps"],
            "tbt_p99_s": dict(at["tbt_p99_s"]) if at else {},
            "ttft_p50_s": at["ttft_p50_s"] if at else None,
            "ttft_p99_s": at["ttft_p99_s"] if at else None,
            "prefix_cache_hit_rate": at.get("prefix_cache_hit_rate") if at else None,
            "points": r["points"],
        }
    return out


def make_runner(setup: ClusterSetup, jobs: int | None, progress: bool) -> Runner:
    return Runner(setup, jobs=jobs, progress=progress, point_fn=run_cluster_point, key_field="pair")


def report(setup: ClusterSetup, pairs: dict[str, dict[str, Any]], scaling: dict[int, dict[str, float]],
           wall_s: float, out: Path, json_path: str | None) -> list[Path]:
    """Write results.json (+ `json_path`), summary.md and the plots into `out`."""
    from loadtest.plots import plot_capacity_vs_replicas, plot_tbt_at_capacity

    out.mkdir(parents=True, exist_ok=True)
    tiers = {t.name: t.tbt_slo_s for t in setup.tier_mix().tiers}
    doc = {"replicas": setup.num_replicas, "pairs": pairs,
           "scaling": {str(k): v for k, v in sorted(scaling.items())},
           "setup": asdict(setup), "sim_wall_s": round(wall_s, 1)}
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(doc, indent=1))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=1))
        paths.append(Path(json_path))
    md = out / "summary.md"
    md.write_text(markdown_summary(setup, pairs, scaling, tiers))
    paths.append(md)
    if len(scaling) > 1:
        paths.append(plot_capacity_vs_replicas(scaling, out / "capacity_vs_replicas.png",
                                               f"Cluster capacity ({setup.profiles})"))
    paths.append(plot_tbt_at_capacity(pairs, tiers, out / "tbt_p99_at_capacity.png",
                                      f"P99 TBT at capacity, {setup.num_replicas} replicas"))
    return paths


def markdown_summary(setup: ClusterSetup, pairs: dict[str, dict[str, Any]], scaling: dict[int, dict[str, float]],
                     tiers: dict[str, float]) -> str:
    n = setup.num_replicas
    names = list(tiers)
    lines = [f"{n} replicas ({setup.profiles}), {setup.num_routers} router(s), feedback every "
             f"{setup.feedback_period_s:g} s delivered {setup.feedback_delay_s:g} s late, ledger "
             f"{'on' if setup.use_ledger else 'off'}, {setup.requests} requests per run", "",
             "| router+scheduler | capacity (QPS) | per replica | stable capacity | median TTFT at capacity (s) | "
             "P99 TTFT (s) | prefix-cache hit rate | "
             + " | ".join(f"P99 TBT {t} (SLO {tiers[t]:g} s)" for t in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names)]

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for pair, r in pairs.items():
        tbt = " | ".join(f"{r['tbt_p99_s'].get(t, float('nan')):.3f}" for t in names)
        lines.append(f"| {pair} | {r['capacity_qps']:.3f} | {r['capacity_qps_per_replica']:.3f} | "
                     f"{r['stable_capacity_qps']:.3f} | {num(r['ttft_p50_s'], '.3f')} | "
                     f"{num(r.get('ttft_p99_s'), '.2f')} | {num(r.get('prefix_cache_hit_rate'), '.3f')} | {tbt} |")
    if len(scaling) > 1:
        ns = sorted(scaling)
        lines += ["", "| router+scheduler | " + " | ".join(f"N={k}" for k in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for pair in pairs:
            lines.append(f"| {pair} | " + " | ".join(f"{scaling[k].get(pair, float('nan')):.3f}" for k in ns) + " |")
    return "\n".join(lines) + "\n"
