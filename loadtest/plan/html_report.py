"""The planner's HTML report: one self-contained file (inline CSS, plots as base64 PNG, no
scripts, nothing fetched) with the table, the confirmations and the plots."""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.plan.report import TABLE_HEADER, _check_text, _fewer, _money, table_rows  # noqa: E402

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c0392b; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""

_COLORS = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _stacks(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    return [(k, r, _COLORS[i % len(_COLORS)]) for i, (k, r) in enumerate(result["stacks"].items())]


def plot_capacity(result: dict[str, Any]) -> str:
    """Every simulated (replicas, QPS) point per stack: met (filled) or missed (x), the peak QPS,
    and each stack's chosen N."""
    fig, ax = plt.subplots(figsize=(10, 4.8))
    stacks = _stacks(result)
    for i, (_, r, color) in enumerate(stacks):
        dx = (i - (len(stacks) - 1) / 2) * 0.12
        met = [p for p in r["points"] if p["met"]]
        missed = [p for p in r["points"] if not p["met"]]
        ax.scatter([p["replicas"] + dx for p in met], [p["qps"] for p in met], color=color, marker="o",
                   label=f"{r['label']}: meets")
        ax.scatter([p["replicas"] + dx for p in missed], [p["qps"] for p in missed], color=color, marker="x",
                   label=f"{r['label']}: misses")
        if r.get("replicas") is not None:
            ax.scatter([r["replicas"] + dx], [result["peak_qps"]], s=260, facecolors="none", edgecolors=color,
                       linewidths=2)
            h = r.get("headroom")
            if h:
                ax.plot([r["replicas"] + dx] * 2, [result["peak_qps"], h["max_qps_met"]], color=color, lw=3,
                        alpha=0.5)
    ax.axhline(result["peak_qps"], color="black", ls="--", lw=1, label=f"peak {result['peak_qps']:g} QPS")
    ax.set_xlabel("replicas (GPUs)")
    ax.set_ylabel("QPS")
    ax.set_title("Simulated points (circled: the chosen N at the peak; bar: headroom)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_slos(result: dict[str, Any]) -> str:
    """Per-tier P99 TBT and median TTFT at each stack's N, against the limits."""
    tiers = result["workload"]["tiers"]
    stacks = [(k, r, c) for k, r, c in _stacks(result) if r.get("at_n")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, metric, limit_key, title in ((axes[0], "tbt_p99_s", "tbt_slo_s", "P99 TBT at N"),
                                         (axes[1], "ttft_p50_s", "ttft_target_s", "median TTFT at N")):
        width = 0.8 / max(1, len(stacks))
        for j, (_, r, color) in enumerate(stacks):
            vals = [r["at_n"]["tiers"][t["name"]][metric] for t in tiers]
            ax.bar([i + j * width for i in range(len(tiers))], vals, width=width, color=color,
                   label=f"{r['label']} (N={r['replicas']})")
        for i, t in enumerate(tiers):
            ax.hlines(t[limit_key], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="--", lw=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tiers))], [t["name"] for t in tiers])
        ax.set_ylabel("seconds (dashed: the tier's limit)")
        ax.set_title(title)
        values = [r["at_n"]["tiers"][t["name"]][metric] for _, r, _ in stacks for t in tiers]
        top = max([t[limit_key] for t in tiers] + [v for v in values if v is not None and math.isfinite(v)])
        ax.set_ylim(0, top * 1.45)  # room for the legend
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def plot_savings(result: dict[str, Any]) -> str:
    """Replicas, GPU-hours per month and cost per month per stack."""
    stacks = [(k, r, c) for k, r, c in _stacks(result) if r.get("replicas") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    labels = [textwrap.fill(r["label"], 16) for _, r, _ in stacks]
    for ax, key, title in ((axes[0], "replicas", "replicas at the peak"),
                           (axes[1], "gpu_hours_per_month", "GPU-hours per month"),
                           (axes[2], "cost_per_month_usd", "cost per month (USD)")):
        vals = [r[key] for _, r, _ in stacks]
        bars = ax.bar(range(len(stacks)), vals, color=[c for _, _, c in stacks])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(stacks)), labels, fontsize=7)
        ax.set_title(title)
    return _png(fig)


def plot_hourly(result: dict[str, Any]) -> str:
    """Replicas per hour of the day per stack, with the hourly QPS."""
    fig, ax = plt.subplots(figsize=(9, 4))
    hours = list(range(24))
    planned = [(r, color) for _, r, color in _stacks(result) if r.get("hourly")]
    for i, (r, color) in enumerate(planned):
        dy = (i - (len(planned) - 1) / 2) * 0.06  # apart, so equal counts stay visible
        ax.step(hours + [24], [h["replicas"] + dy for h in r["hourly"]] + [r["hourly"][-1]["replicas"] + dy],
                where="post", color=color, lw=2, label=r["label"])
    ax.set_xlabel("hour of the day")
    ax.set_ylabel("replicas")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax2 = ax.twinx()
    ax2.step(hours + [24], result["hourly_qps"] + [result["hourly_qps"][-1]], where="post", color="black",
             ls=":", label="QPS planned for")
    ax2.set_ylabel("QPS")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    ax.set_title("Replicas per hour")
    return _png(fig)


def _num(x: float | None, digits: int) -> str:
    """A number for a table cell; '-' for a missing one (None, or NaN: no samples)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _e(x: Any) -> str:
    return html.escape(str(x))


def _code(text: str) -> str:
    """Escaped text with `backticked` parts as <code>."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _img(b64: str, alt: str, ident: str) -> str:
    return f'<img id="{ident}" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _confirmations(result: dict[str, Any]) -> str:
    tiers = [t["name"] for t in result["workload"]["tiers"]]
    head = ("<tr><th>stack</th><th>replicas</th><th>result</th>"
            + "".join(f"<th>{_e(t)} P99 TBT (s)</th><th>{_e(t)} median TTFT (s)</th>" for t in tiers)
            + "<th>waiting at last arrival</th><th>failed checks</th></tr>")
    rows = []
    for r in result["stacks"].values():
        for label, p in (("N", r.get("at_n")), ("N-1", r.get("at_n_minus_1"))):
            if not p:
                continue
            verdict = '<span class="ok">meets</span>' if p["met"] else '<span class="bad">misses</span>'
            cells = "".join(f'<td class="num">{_num(p["tiers"][t]["tbt_p99_s"], 3)}</td>'
                            f'<td class="num">{_num(p["tiers"][t]["ttft_p50_s"], 3)}</td>' for t in tiers)
            failed = "; ".join(_e(_check_text(c)) for c in p["checks"] if not c["ok"]) or "-"
            rows.append(f"<tr><td>{_e(r['label'])}</td><td>{label} = {p['replicas']}</td><td>{verdict}</td>{cells}"
                        f'<td class="num">{p["waiting_at_last_arrival"]}</td><td>{failed}</td></tr>')
    return f'<table id="confirmations">{head}{"".join(rows)}</table>'


def _points_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["stacks"].values():
        for p in r["points"]:
            verdict = '<span class="ok">meets</span>' if p["met"] else '<span class="bad">misses</span>'
            rows.append(f"<tr><td>{_e(r['label'])}</td><td class=\"num\">{p['replicas']}</td>"
                        f"<td class=\"num\">{p['qps']:g}</td><td>{verdict}</td>"
                        f"<td class=\"num\">{_num(p['ttft_p50_s'], 3)}</td><td class=\"num\">{_num(p['ttft_p99_s'], 2)}</td>"
                        f"<td class=\"num\">{_num(p['sim_wall_s'], 1)}</td></tr>")
    return ('<table id="points"><tr><th>stack</th><th>replicas</th><th>QPS</th><th>SLOs</th>'
            "<th>median TTFT (s)</th><th>P99 TTFT (s)</th><th>wall (s)</th></tr>" + "".join(rows) + "</table>")


def render_html(result: dict[str, Any]) -> str:
    w = result["workload"]
    num = ' class="num"'
    rows = "".join("<tr>" + "".join(f"<td{num if i in (2, 4, 5) else ''}>{_e(c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in table_rows(result))
    table = ('<table id="plan-table"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in TABLE_HEADER) + "</tr>"
             + rows + "</table>")
    tiers = "".join(f"<tr><td>{_e(t['name'])}</td><td{num}>{t['share']:.1%}</td><td{num}>"
                    f"{t['tbt_slo_s']:g}</td><td{num}>{t['ttft_target_s']:g}</td></tr>" for t in w["tiers"])
    load = (f"peak {result['peak_qps']:g} QPS" if w["diurnal_qps"] is None else
            f"diurnal curve {_e(w['diurnal_qps'])}, peak {result['peak_qps']:g} QPS")
    stacks = "".join(f"<li><b>{_e(r['label'])}</b>: router <code>{_e(r['router'])}</code> + scheduler "
                     f"<code>{_e(r['scheduler'])}</code>. {_code(r['note'])}.</li>" for r in result["stacks"].values())
    s = result["savings_vs_default"]
    if s is None:
        savings = "<p>No savings to compare (the baseline stack is not feasible or not planned).</p>"
    elif s["best"] == s["baseline"]:
        savings = f"<p>The baseline, {_e(result['stacks'][s['baseline']]['label'])}, needs the fewest GPUs.</p>"
    else:
        st = result["stacks"]
        savings = (f"<p id=\"savings\"><b>{_e(st[s['best']]['label'])}</b>: {_fewer(s['replicas'])} "
                   f"than {_e(st[s['baseline']]['label'])}, {s['gpu_hours_per_month']:,.0f} GPU-hours and "
                   f"{_money(s['cost_per_month_usd'])} less per month ({s['fraction']:.0%}).</p>")
    images = [_img(plot_capacity(result), "capacity vs replicas per stack", "plot-capacity"),
              _img(plot_slos(result), "per-tier P99 TBT and median TTFT at N", "plot-slos"),
              _img(plot_savings(result), "replicas, GPU-hours and cost per stack", "plot-savings")]
    if result.get("hourly_qps") and any(r.get("hourly") for r in result["stacks"].values()):
        images.append(_img(plot_hourly(result), "replicas per hour", "plot-hourly"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Capacity plan: {_e(w['name'])}</title>
<style>{_CSS}</style></head><body>
<h1>Capacity plan: {_e(w['name'])}</h1>
<p>{load}; {_e(result['lengths'])}; GPU profile <code>{_e(w['gpu_profile'])}</code> at
${w['price_per_gpu_hour_usd']:g} per GPU-hour. {result['requests_per_run']} requests per simulation run
({result['virtual_duration_at_peak_s']:.0f} s of virtual time at the peak); {result['simulation_runs']} runs in
{result['wall_s']:.1f} s.</p>
<table id="tiers"><tr><th>tier</th><th>share</th><th>TBT SLO (P99, s)</th><th>TTFT target (median, s)</th></tr>
{tiers}</table>
<h2>Plan</h2>
{table}
{savings}
<p class="note">Criterion: {_e(result['criterion'])} Headroom: (largest QPS that N replicas were seen to meet,
probing between the peak and peak x N/(N-1)) / peak - 1. GPU-hours per month: N x {result['hours_per_month']:g} h,
or with a diurnal curve 365/12 x the sum of each hour's replicas. Binding SLO: the check closest to its limit at N
(value / limit) and the worst check N-1 replicas fail.</p>
<h2>Stacks</h2><ul>{stacks}</ul>
<h2>Confirmation at N and N-1 (peak QPS)</h2>
{_confirmations(result)}
<h2>Plots</h2>
{''.join(images)}
<h2>Every simulated point</h2>
<details><summary>{result['simulation_runs']} runs</summary>{_points_table(result)}</details>
</body></html>
"""


def write_html(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result), encoding="utf-8")
    return path
