"""Capacity and cost planner: the fewest GPUs (replicas) a workload needs under its SLOs, per
serving stack, by binary search over the replica count with the virtual-time cluster simulator.

    python -m loadtest.plan WORKLOAD.yaml [--html PATH] [--json PATH] [--stacks ...]

The method, the criterion and the answer: `loadtest.plan.cli` (``python -m loadtest.plan --help``)
and docs/planner.md.  Modules, each importing only those listed before it:

- `stacks`: the serving stacks compared (router + scheduler);
- `workload`: the workload model, its YAML loading and errors, the request lengths, the field reference;
- `search`: the simulations, the replica-count search, `plan`;
- `report`: the printed summary and table, strict JSON;
- `html_report`: the self-contained HTML report (imports matplotlib, so it is not imported here);
- `cli`: ``python -m loadtest.plan`` (`__main__`).
"""

from loadtest.plan.cli import main
from loadtest.plan.report import TABLE_HEADER, binding_text, json_safe, markdown_table, summary_text, table_rows
from loadtest.plan.search import (
    CRITERION,
    DAYS_PER_MONTH,
    HOURS_PER_MONTH,
    PlanSetup,
    StackSearch,
    guess_replicas,
    plan,
    run_plan_point,
    run_searches,
    slo_checks,
)
from loadtest.plan.stacks import STACK_BY_KEY, STACKS, Stack, available_stacks
from loadtest.plan.workload import (
    Lengths,
    LognormalTokens,
    PlanError,
    SearchSettings,
    UniformTokens,
    Workload,
    field_help,
    hourly_qps,
    lengths_trace,
    load_workload,
)

__all__ = ["HOURS_PER_MONTH", "STACKS", "PlanError", "Stack", "Workload", "available_stacks",
           "hourly_qps", "json_safe", "load_workload", "main", "plan", "slo_checks"]
