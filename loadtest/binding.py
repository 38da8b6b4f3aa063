"""What binds a scheduler at a load: one virtual-time run per (scheduler, QPS), every iteration
that runs while requests wait classified by what kept the queue from moving faster.

    python -m loadtest.binding --scheduler slai-next --qps 1.9,1.95 [--profile P] [--trace T]
        [--tiers X] [--requests N] [--seed S] [--kv-blocks B] [--json OUT]

The run is `loadtest.simulate`'s (same workload, cost profile and policy object as a sweep point);
the policy's `schedule` is wrapped to look at each plan beside the state it was made from.  An
iteration with requests still waiting after its plan is

* ``budget``: its token budget is used up (within one tile): compute at that budget binds;
* ``kv``: budget and request slots are left, but the first waiting request in the policy's order
  needs more KV blocks (watermark kept) than are free after the plan's admissions;
* ``slots``: every request slot (``max_active_requests``) is taken;
* ``other``: none of these (a rule of the policy held the request back, e.g. slai-next's started
  prefill that waits for the next chunk boundary).

Beside it: the share of queued iterations in which the policy was slot-bound (slai-plus and its
successors pin the budget at the base then and run every decode), the mean budget and tokens of
those iterations, the KV cache's median use and the median number of running requests, and the
run's median TTFT.  Reading: a queue that waits on ``budget`` while slot-bound waits on the KV
cache through the slot guard.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.metrics import summarize
from loadtest.simulate.replica import Workload, run_replica
from loadtest.simulate.sweep import SweepSetup, _profile, _trace
from replica.policy import BatchPlan, EngineState, SchedulingPolicy
from replica.policy.registry import EngineLimits, available_schedulers, make_policy

CLASSES = ("budget", "kv", "slots", "other")


class BindingProbe:
    """Classifies each plan made while requests wait (module docstring); `observe` is the
    engine's `on_plan` callback."""

    def __init__(self, policy: SchedulingPolicy, tile_tokens: int) -> None:
        self.policy = policy
        self.tile = tile_tokens
        self.counts: Counter[str] = Counter()
        self.slot_bound = 0
        self.budgets: list[int] = []
        self.tokens: list[int] = []
        self.kv_usage: list[float] = []
        self.running: list[int] = []
        self.iterations = 0

    def observe(self, state: EngineState, plan: BatchPlan) -> None:
        if plan.is_empty:
            return
        self.iterations += 1
        admitted = set(map(id, plan.admitted))
        left = [r for r in state.waiting if id(r) not in admitted]
        if not left:
            return
        p = self.policy
        cfg = p.config
        budget = int(getattr(p, "last_budget", cfg.token_budget))
        self.budgets.append(budget)
        self.tokens.append(plan.num_tokens)
        self.kv_usage.append(state.kv.usage)
        self.running.append(len(state.running))
        if hasattr(p, "slot_bound") and p.slot_bound(state):  # slai-plus's guard, on the state it planned from
            self.slot_bound += 1
        if plan.num_tokens > budget - self.tile:
            kind = "budget"
        elif len(state.running) - len(plan.preempted) + len(plan.admitted) >= cfg.max_active_requests:
            kind = "slots"
        else:
            order = p.waiting_order(state) if hasattr(p, "waiting_order") else left
            head = next((r for r in order if id(r) not in admitted), left[0])
            kv = state.kv
            free = kv.num_free_blocks - sum(kv.blocks_for(r.num_tokens) for r in plan.admitted)
            kind = "other" if kv.can_admit(free, head.num_tokens) else "kv"
        self.counts[kind] += 1

    def summary(self) -> dict[str, Any]:
        n = sum(self.counts.values())
        frac = {k: (self.counts[k] / n if n else 0.0) for k in CLASSES}
        return {
            "iterations": self.iterations,
            "queued_iterations": n,
            "queued_share": n / self.iterations if self.iterations else 0.0,
            "waits_on": frac,
            "slot_bound_share": self.slot_bound / n if n else 0.0,
            "mean_budget": float(np.mean(self.budgets)) if n else 0.0,
            "mean_tokens": float(np.mean(self.tokens)) if n else 0.0,
            "kv_usage_p50": float(np.median(self.kv_usage)) if n else 0.0,
            "running_p50": float(np.median(self.running)) if n else 0.0,
        }


def probe(setup: SweepSetup, scheduler: str, qps: float) -> dict[str, Any]:
    wl = Workload.build(_trace(setup.trace, setup.tokenizer, setup.max_model_len), setup.requests, qps,
                        setup.tier_mix(), seed=setup.seed, arrivals=setup.arrivals)
    profile = _profile(setup.profile)
    policy = make_policy(scheduler, engine=EngineLimits(tile_tokens=profile.tile_tokens))
    pr = BindingProbe(policy, profile.tile_tokens)
    run = run_replica(wl, policy, profile, num_kv_blocks=setup.kv_blocks,
                      prefix_caching=setup.prefix_caching and wl.prefix_hashes is not None, on_plan=pr.observe)
    s = summarize(run)
    return {"scheduler": scheduler, "qps": qps, "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
            **pr.summary()}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scheduler | QPS | median TTFT (s) | queued iterations | waits on budget / KV / slots / other "
            "| slot-bound | mean budget / tokens | KV use p50 | running p50 |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        w = r["waits_on"]
        out.append(f"| {r['scheduler']} | {r['qps']:g} | {r['ttft_p50_s']:.3f} | {r['queued_share']:.0%} of "
                   f"{r['iterations']} | {w['budget']:.0%} / {w['kv']:.0%} / {w['slots']:.0%} / {w['other']:.0%} "
                   f"| {r['slot_bound_share']:.0%} | {r['mean_budget']:.0f} / {r['mean_tokens']:.0f} "
                   f"| {r['kv_usage_p50']:.2f} | {r['running_p50']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    d = SweepSetup()
    ap = argparse.ArgumentParser(prog="python -m loadtest.binding", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheduler", action="append", required=True, choices=available_schedulers(), metavar="NAME")
    ap.add_argument("--qps", required=True, help="comma-separated QPS points")
    ap.add_argument("--profile", default=d.profile)
    ap.add_argument("--trace", default=d.trace)
    ap.add_argument("--tiers", default=d.tiers)
    ap.add_argument("--requests", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--kv-blocks", type=int, default=d.kv_blocks)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    try:
        qps = [float(x) for x in a.qps.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--qps: expected comma-separated numbers, got {a.qps!r}")
    setup = SweepSetup(profile=a.profile, trace=a.trace, tiers=a.tiers, requests=a.requests, seed=a.seed,
                       kv_blocks=a.kv_blocks)
    rows = [probe(setup, s, q) for s in a.scheduler for q in qps]
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
