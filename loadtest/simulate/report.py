"""Writes the paper benchmark's JSON, markdown table and plots."""

from __future__ import annotations

import json
import platform
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest import plots
from loadtest.simulate.sweep import SweepSetup


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def paper_comparison(results: dict[str, dict], ref_name: str, at_ref: dict[str, dict]) -> dict[str, dict]:
    """Per scheduler: capacity ratio and median-TTFT change against the reference scheduler
    (Sarathi-FCFS) at the reference's capacity QPS, as the paper reports them."""
    ref_cap = results[ref_name]["capacity_qps"]
    ref_stable = results[ref_name]["stable_capacity_qps"]
    ref_ttft = at_ref[ref_name]["ttft_p50_s"]
    out = {}
    for name, r in results.items():
        p = at_ref[name]
        out[name] = {
            "capacity_ratio": _ratio(r["capacity_qps"], ref_cap),
            "stable_capacity_ratio": _ratio(r["stable_capacity_qps"], ref_stable),
            "ttft_p50_s_at_ref": p["ttft_p50_s"],
            "ttft_p50_change_at_ref": round(p["ttft_p50_s"] / ref_ttft - 1, 4) if ref_ttft else None,
            "ttft_p99_long_s_at_ref": p["ttft_p99_long_s"],
            "tbt_p99_s_at_ref": p["tbt_p99_s"],
            "slo_met_at_ref": p["slo_met"],
        }
        if "p99_ttft_capacity_qps" in r and "p99_ttft_capacity_qps" in results[ref_name]:
            out[name]["p99_ttft_capacity_ratio"] = _ratio(r["p99_ttft_capacity_qps"],
                                                          results[ref_name]["p99_ttft_capacity_qps"])
    return out


def markdown_table(
    setup: SweepSetup, results: dict, ref_name: str, ref_qps: float, comp: dict, wall_s: float, sat_qps: float | None
) -> str:
    tiers = setup.tier_mix().names
    bound = next((r["p99_ttft_bound_s"] for r in results.values() if "p99_ttft_bound_s" in r), None)
    lines = [
        f"profile `{setup.profile}`, trace `{setup.trace}`, {setup.requests} requests per run, "
        f"reference {ref_name} capacity = {ref_qps:g} QPS; {wall_s:.0f} s on {os.cpu_count()} cores",
        "",
        "| scheduler | capacity QPS | vs ref | stable capacity QPS | vs ref "
        + (f"| P99-TTFT capacity QPS (P99 TTFT <= {bound:g} s) | vs ref " if bound is not None else "")
        + "| median TTFT at ref QPS (s) | change "
        + "".join(f"| P99 TBT {t} at ref (s) " for t in tiers)
        + "| P99 TTFT prompts >4k at ref (s) "
        + (f"| throughput at {sat_qps:g} QPS (tokens/s) | vs ref |" if sat_qps else "|"),
        "|---|---|---|---|---|---|---" + ("|---|---" if bound is not None else "") + "|---" * len(tiers) + "|---|" + ("---|---|" if sat_qps else ""),
    ]
    for name, r in results.items():
        c = comp[name]
        change = c["ttft_p50_change_at_ref"]
        lines.append(
            f"| {name} | {r['capacity_qps']:.3f} | {c['capacity_ratio'] or 0:.2f}x | {r['stable_capacity_qps']:.3f} "
            f"| {c['stable_capacity_ratio'] or 0:.2f}x "
            + (f"| {r.get('p99_ttft_capacity_qps', 0):.3f} | {c.get('p99_ttft_capacity_ratio') or 0:.2f}x "
               if bound is not None else "")
            + f"| {c['ttft_p50_s_at_ref']:.3f} "
            f"| {'' if change is None else f'{change * 100:+.0f} %'} "
            + "".join(f"| {c['tbt_p99_s_at_ref'][t]:.3f} " for t in tiers)
            + f"| {c['ttft_p99_long_s_at_ref']:.2f} |"
            + (
                (
                    f" {c['saturation_throughput_tokens_per_s']:.0f} | {c['saturation_throughput_ratio'] or 0:.3f}x |"
                    if "saturation_throughput_tokens_per_s" in c
                    else " | |"
                )
                if sat_qps
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def write_paper_report(
    setup: SweepSetup,
    results: dict[str, dict[str, Any]],
    ref_name: str,
    ref_qps: float,
    at_ref: dict[str, dict[str, Any]],
    saturation: dict[str, dict[str, Any]],
    wall_s: float,
    out_dir: Path,
    json_path: str | None,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    comp = paper_comparison(results, ref_name, at_ref)
    if saturation:
        ref_tput = saturation.get(ref_name, {}).get("throughput_tokens_per_s", 0.0)
        for name, p in saturation.items():
            comp[name]["saturation_throughput_tokens_per_s"] = p["throughput_tokens_per_s"]
            comp[name]["saturation_throughput_ratio"] = _ratio(p["throughput_tokens_per_s"], ref_tput)
    doc = {
        "profile": setup.profile,
        "requests": setup.requests,
        "trace": setup.trace,
        "tiers": {t.name: {"tbt_slo_s": t.tbt_slo_s, "share": t.share} for t in setup.tier_mix().tiers},
        "setup": asdict(setup),
        "reference": {"scheduler": ref_name, "qps": ref_qps},
        "schedulers": results,
        "at_reference_qps": at_ref,
        "saturation": saturation,
        "comparison": comp,
        "wall_s": round(wall_s, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    paths = [out_dir / "results.json", out_dir / "summary.md"]
    text = json.dumps(doc, indent=1)
    paths[0].write_text(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
        paths.append(Path(json_path))
    sat_qps = next(iter(saturation.values()))["qps"] if saturation else None
    paths[1].write_text(markdown_table(setup, results, ref_name, ref_qps, comp, wall_s, sat_qps))
    title = f"{setup.profile}, {setup.requests} req"
    slos = {t.name: t.tbt_slo_s for t in setup.tier_mix().tiers}
    paths.append(plots.plot_ttft_vs_qps(results, out_dir / "ttft_p50_vs_qps.png", title))
    paths.append(plots.plot_tbt_vs_qps(results, slos, out_dir / "tbt_p99_vs_qps.png", title))
    paths.append(plots.plot_ttft_by_prompt(at_ref, out_dir / "ttft_by_prompt_len.png", f"{title}, at {ref_qps:g} QPS"))
    return paths
