"""What an engine replica reports to Ray Serve's autoscaler (`LLMReplica.record_autoscaling_stats`):
its feedback snapshot's fields, flattened to floats (Serve's custom metrics are floats), and its
arrival counters.  `serve_app.ray_autoscaling` reads them back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ARRIVED", "FB", "INT_FIELDS", "SCALAR_FIELDS", "TIER_FIELDS", "ArrivalCounter", "autoscaling_stats"]

# a snapshot field: feedback/<field>, feedback/decodes/<tier>, feedback/tier/<tier>/<field>, and the
# waiting prompts' histogram as feedback/histogram/<bin's lower edge> = count
FB = "feedback/"
ARRIVED = "arrived/"  # arrived/<tier>/requests, arrived/<tier>/prompt_tokens (cumulative counters)
SCALAR_FIELDS = ("timestamp_s", "num_waiting", "num_running", "waiting_prefill_tokens", "kv_usage",
                 "mean_batch_time_s")
TIER_FIELDS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "tbt_miss_frac", "ttft_misses_total",
               "tbt_misses_total", "tokens_total")
INT_FIELDS = frozenset({"num_waiting", "num_running", "waiting_prefill_tokens", "ttft_misses_total",
                        "tbt_misses_total", "tokens_total"})


class ArrivalCounter:
    """A replica's arrivals per tier since it started: requests and their prompt tokens."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}

    def record(self, tier: str, prompt_tokens: int) -> None:
        self.requests[tier] = self.requests.get(tier, 0) + 1
        self.prompt_tokens[tier] = self.prompt_tokens.get(tier, 0) + int(prompt_tokens)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tier, n in self.requests.items():
            out[f"{ARRIVED}{tier}/requests"] = float(n)
            out[f"{ARRIVED}{tier}/prompt_tokens"] = float(self.prompt_tokens[tier])
        return out


def autoscaling_stats(snapshot: Mapping[str, Any], arrivals: ArrivalCounter) -> dict[str, float]:
    """What a replica reports to Serve's autoscaler (`LLMReplica.record_autoscaling_stats`): the
    feedback snapshot's fields the policy reads, as floats, and the arrival counters."""
    out: dict[str, float] = {}
    for name in SCALAR_FIELDS:
        v = snapshot.get(name)
        if v is not None:
            out[FB + name] = float(v)
    for tier, n in (snapshot.get("running_decodes_by_tier") or {}).items():
        out[f"{FB}decodes/{tier}"] = float(n)
    hist = snapshot.get("waiting_prompt_histogram")
    if hist:
        for edge, count in zip(hist["edges"], hist["counts"]):
            out[f"{FB}histogram/{int(edge)}"] = float(count)
    for tier, fields in (snapshot.get("tiers") or {}).items():
        for name in TIER_FIELDS:
            v = fields.get(name)
            if v is not None:
                out[f"{FB}tier/{tier}/{name}"] = float(v)
    out.update(arrivals.stats())
    return out
