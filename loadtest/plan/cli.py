"""Capacity and cost planner: the fewest GPUs (replicas) a workload needs under its SLOs, per
serving stack, by binary search over the replica count with the virtual-time cluster simulator.

  python -m loadtest.plan WORKLOAD.yaml [--html PATH] [--json PATH] [--stacks default,slai]
                          [--requests N] [--jobs N] [--quiet]

The workload (a YAML file, `Workload` below; `--help` lists every field) gives the load (a peak
QPS, or a diurnal curve of (hour, QPS) points), the prompt/output lengths (a trace or parametric
distributions), the tiers with their SLOs and shares, the GPU cost profile, the price per
GPU-hour and the search bounds.

Criterion.  N replicas meet the SLOs at a QPS when a cluster run (Poisson arrivals at that QPS,
`requests_per_run` requests, the workload's lengths and tiers) has, for every tier, P99 TBT <=
the tier's ``tbt_slo_s`` and median TTFT <= the tier's ``ttft_target_s``, and is stable
(`loadtest.metrics.summarize`'s ``stable``: at most 1 % of the requests still waiting to start
when the last one arrived, and every request finished).  The paper's criterion uses the overall
median TTFT <= 0.5 s; with per-tier TTFT targets this planner checks each tier's median.

Answer.  For each stack the planner reports the fewest N that meets the criterion at the peak
QPS with N - 1 missing it, both simulated (same workload and seed); if a larger N was seen to
miss, N is the smallest passing count above the largest missing one.  Headroom = (largest
probed QPS that N replicas meet) / peak QPS - 1, probing between the peak and
peak x N / (N - 1).  GPU-hours per month = N x 730 h (a month of 365 x 24 / 12 hours), or, for a
diurnal curve, 365 / 12 x the sum over the day's 24 hours of the replicas each hour needs (each
hour planned for the curve's maximum within it).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from loadtest.cli_args import int_at_least
from loadtest.plan.report import json_safe, summary_text
from loadtest.plan.search import CRITERION, plan
from loadtest.plan.stacks import STACKS, Stack, available_stacks
from loadtest.plan.workload import PlanError, field_help, load_workload

__all__ = ["main"]


def _epilog() -> str:
    def fill(text: str, indent: int) -> str:
        return textwrap.fill(text, width=100, initial_indent=" " * indent, subsequent_indent=" " * indent)

    stacks = "\n".join(f"  {s.key}: {s.label} = router {s.router} + scheduler {s.scheduler}\n{fill(s.note, 6)}"
                       for s in STACKS)
    return ("workload fields (YAML; examples in loadtest/workloads/):\n" + "\n".join(field_help())
            + "\n\nstacks (--stacks):\n" + stacks + "\n\ncriterion:\n" + fill(CRITERION, 2)
            + "\n\nGPU-hours per month: N x 730 h; with diurnal_qps, 365/12 x the sum of each hour's replicas.")


def _stacks_arg(text: str) -> list[Stack]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    avail = {s.key: s for s in available_stacks()}
    bad = [k for k in keys if k not in avail]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown or unavailable stack(s) {bad or text!r}; available: "
                                         f"{', '.join(avail)}")
    return [avail[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.plan", description=__doc__, epilog=_epilog(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", help="workload YAML file")
    ap.add_argument("--html", default=None, help="write the HTML report (one self-contained file) here")
    ap.add_argument("--json", default=None, help="write the full result (every simulated point) here")
    ap.add_argument("--stacks", type=_stacks_arg, default=None,
                    help="comma-separated stack keys (default: every available one: "
                         f"{', '.join(s.key for s in available_stacks())})")
    ap.add_argument("--requests", type=int_at_least(20), default=None,
                    help="requests per simulation run (default: search.requests_per_run, else "
                         "search.virtual_duration_s x peak QPS within 600..20000)")
    ap.add_argument("--jobs", type=int_at_least(1), default=None, help="worker processes (default: all cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        workload = load_workload(a.workload)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = plan(workload, a.stacks, jobs=a.jobs, progress=not a.quiet, requests_per_run=a.requests)
    print(summary_text(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(json_safe(result), indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    if a.html:
        from loadtest.plan.html_report import write_html  # matplotlib: only for --html

        write_html(result, Path(a.html))
        print(f"wrote {a.html}", file=sys.stderr)
    return 0
