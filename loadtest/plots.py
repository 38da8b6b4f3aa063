"""Plots of sweep results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_vs_qps(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        pts = r["points"]
        ax.plot([p["qps"] for p in pts], [p["ttft_p50_s"] for p in pts], marker="o", ms=3, label=name)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="0.5 s limit")
    ax.set_yscale("log")
    ax.set_xlabel("QPS")
    ax.set_ylabel("median TTFT (s)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tbt_vs_qps(results: dict[str, dict[str, Any]], tiers: dict[str, float], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, len(tiers), figsize=(5 * len(tiers), 4.2), squeeze=False)
    for ax, (tier, slo_s) in zip(axes[0], tiers.items()):
        for name, r in results.items():
            pts = r["points"]
            ax.plot([p["qps"] for p in pts], [p["tbt_p99_s"][tier] for p in pts], marker="o", ms=3, label=name)
        ax.axhline(slo_s, color="grey", ls="--", lw=1, label=f"SLO {slo_s:g} s")
        ax.set_xlabel("QPS")
        ax.set_ylabel("P99 TBT (s)")
        ax.set_title(f"{title}: tier {tier}")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_ttft_by_prompt(at_reference: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(at_reference)
    buckets = list(next(iter(at_reference.values()))["ttft_p50_by_prompt_s"]) if names else []
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = [at_reference[name]["ttft_p50_by_prompt_s"][b] for b in buckets]
        ax.bar([i + k * width for i in range(len(buckets))], vals, width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))], buckets)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("median TTFT (s)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_capacity_vs_replicas(scaling: dict[int, dict[str, float]], path: Path, title: str) -> Path:
    """Cluster capacity (QPS) against the number of replicas, one line per router+scheduler."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = sorted(scaling)
    pairs = list(dict.fromkeys(p for n in ns for p in scaling[n]))
    for pair in pairs:
        xs = [n for n in ns if pair in scaling[n]]
        ax.plot(xs, [scaling[n][pair] for n in xs], marker="o", ms=4, label=pair)
    ax.set_xlabel("replicas")
    ax.set_ylabel("capacity (QPS)")
    ax.set_xticks(ns)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tbt_at_capacity(pairs: dict[str, dict[str, Any]], tiers: dict[str, float], path: Path, title: str) -> Path:
    """Per-tier P99 TBT at each pair's capacity, with the tiers' SLOs."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(pairs)
    width = 0.8 / max(1, len(tiers))
    for k, (tier, slo_s) in enumerate(tiers.items()):
        vals = [pairs[p]["tbt_p99_s"].get(tier, float("nan")) for p in names]
        bars = ax.bar([i + k * width for i in range(len(names))], vals, width=width, label=f"{tier} (SLO {slo_s:g} s)")
        ax.hlines(slo_s, -0.4, len(names) - 0.2, colors=bars.patches[0].get_facecolor() if bars.patches else "grey",
                  linestyles="--", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("P99 TBT at capacity (s)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)
