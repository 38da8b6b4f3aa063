"""The planner's text report: the summary and the markdown table `python -m loadtest.plan` prints,
and the result as strict JSON (`json_safe`).  The HTML report is `loadtest.plan.html_report`."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TABLE_HEADER", "binding_text", "json_safe", "markdown_table", "summary_text", "table_rows"]


def _check_text(c: dict[str, Any]) -> str:
    if c["metric"] == "backlog":
        return f"stability ({c['value']} waiting at the last arrival, limit {c['limit']:g})"
    what = {"tbt_p99_s": "P99 TBT", "ttft_p50_s": "median TTFT"}[c["metric"]]
    return f"{c['tier']} {what} {c['value']:.3f}/{c['limit']:g} s"


def binding_text(res: dict[str, Any]) -> str:
    b = res.get("binding")
    if not b:
        return "-"
    c = b["closest_at_n"]
    text = f"{_check_text(c)} ({c['ratio']:.0%}) at N"
    if b["failed_at_n_minus_1"]:
        text += f"; N-1 misses {_check_text(b['failed_at_n_minus_1'][0])}"
    return text


def _fewer(replicas: int) -> str:
    if not replicas:
        return "as many replicas at the peak"
    return f"{replicas} fewer replica{'s' if replicas > 1 else ''} at the peak"


def _money(x: float) -> str:
    return f"${x:,.0f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result["stacks"].values():
        if r.get("replicas") is None:
            rows.append([r["label"], f"{r['router']} + {r['scheduler']}",
                         f"> {result['workload']['search']['max_replicas']}", "-", "-", "-", "-", "not feasible"])
            continue
        h = r.get("headroom")
        if h is None:
            head = "-"
        else:
            head = (f">= {h['headroom_fraction']:+.0%} (meets {h['max_qps_met']:.4g} QPS, the highest probed)"
                    if h["at_least"] else
                    f"{h['headroom_fraction']:+.0%} (meets {h['max_qps_met']:.4g}, misses {h['first_qps_missed']:.4g} QPS)")
        conf = "yes" if r["confirmed"] else "NO"
        rows.append([r["label"], f"{r['router']} + {r['scheduler']}", str(r["replicas"]), conf,
                     f"{r['gpu_hours_per_month']:,.0f}", _money(r["cost_per_month_usd"]), head, binding_text(r)])
    return rows


TABLE_HEADER = ["stack", "router + scheduler", "replicas N", "N meets, N-1 misses", "GPU-hours/month",
                "cost/month", "headroom at N", "binding SLO"]


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines)


def summary_text(result: dict[str, Any]) -> str:
    w = result["workload"]
    load = (f"peak {result['peak_qps']:g} QPS" if w["diurnal_qps"] is None
            else f"diurnal curve, peak {result['peak_qps']:g} QPS")
    tiers = ", ".join(f"{t['name']} {t['share']:.0%} (P99 TBT <= {t['tbt_slo_s']:g} s, median TTFT <= "
                      f"{t['ttft_target_s']:g} s)" for t in w["tiers"])
    lines = [f"{w['name']}: {load}; {result['lengths']}; {w['gpu_profile']} at "
             f"${w['price_per_gpu_hour_usd']:g}/GPU-hour; tiers {tiers}",
             f"{result['requests_per_run']} requests per run ({result['virtual_duration_at_peak_s']:.0f} s of "
             f"virtual time at the peak), {result['simulation_runs']} runs, {result['wall_s']:.1f} s", "",
             markdown_table(result)]
    s = result["savings_vs_default"]
    if s is not None and s["best"] == s["baseline"]:
        lines += ["", f"Fewest GPU-hours: {result['stacks'][s['best']]['label']} (the baseline; no stack needs fewer)."]
    elif s is not None:
        st = result["stacks"]
        lines += ["", f"Best: {st[s['best']]['label']}: {_fewer(s['replicas'])}, "
                      f"{s['gpu_hours_per_month']:,.0f} GPU-hours and {_money(s['cost_per_month_usd'])} less per "
                      f"month than {st[s['baseline']]['label']} ({s['fraction']:.0%})."]
    for r in result["stacks"].values():
        if r.get("hourly"):
            lines.append(f"{r['label']}: replicas by hour " + " ".join(str(h["replicas"]) for h in r["hourly"]))
    return "\n".join(lines) + "\n"


def json_safe(x: Any) -> Any:
    """`x` with NaN and infinities as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
