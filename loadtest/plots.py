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
