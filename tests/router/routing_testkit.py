"""Hand-built feedback snapshots, views and requests for the routing tests."""

from __future__ import annotations

from replica.slo import PROMPT_HISTOGRAM_EDGES, SNAPSHOT_VERSION
from router.feedback import ReplicaFeedback, ReplicaView
from router.ledger import LedgerEntry
from router.policies.base import RoutingRequest

TIERS = {"premium": (0.1, 0), "free": (0.5, 1)}  # name -> (TBT SLO s, rank)


def histogram(prompts: list[int]) -> list[int]:
    edges = PROMPT_HISTOGRAM_EDGES
    counts = [0] * len(edges)
    for p in prompts:
        i = max(k for k, e in enumerate(edges) if p >= e)
        counts[i] += 1
    return counts


def snap(rid: str, t: float = 0.0, waiting: list[int] = (), decodes: dict[str, int] | None = None,
         kv: float = 0.1, batch: float = 0.04, p99: dict[str, float] | None = None, running: int | None = None) -> dict:
    """A version-1 snapshot dict like `SLOTracker.snapshot()` builds."""
    decodes = dict(decodes or {})
    tiers = {}
    for name in TIERS:
        tiers[name] = {"ttft_p50_s": None, "ttft_p99_s": None, "tbt_p50_s": None,
                       "tbt_p99_s": (p99 or {}).get(name), "tbt_miss_frac": 0.0,
                       "ttft_misses_total": 0, "tbt_misses_total": 0, "tokens_total": 0}
    return {
        "version": SNAPSHOT_VERSION, "replica_id": rid, "timestamp_s": t,
        "num_waiting": len(waiting), "num_running": sum(decodes.values()) if running is None else running,
        "waiting_prefill_tokens": int(sum(waiting)),
        "waiting_prompt_histogram": {"edges": list(PROMPT_HISTOGRAM_EDGES), "counts": histogram(list(waiting))},
        "running_decodes_by_tier": decodes, "kv_usage": kv, "mean_batch_time_s": batch, "tiers": tiers,
    }


def view(rid: str, now: float = 1.0, ledger: list[tuple[str, int]] = (), **snap_kw) -> ReplicaView:
    """A view of replica `rid` with a snapshot taken at t=0 (`no_feedback=True`: none yet) and
    ledger entries (tier, prompt_len) sent after it."""
    entries = tuple(LedgerEntry(f"{rid}-l{i}", tier, n, 0.5) for i, (tier, n) in enumerate(ledger))
    if snap_kw.pop("no_feedback", False):
        return ReplicaView(rid, None, None, entries)
    fb = ReplicaFeedback.from_snapshot(snap(rid, **snap_kw))
    return ReplicaView(rid, fb, now - fb.timestamp_s, entries)


def req(tier: str = "free", prompt: int = 100, rid: str = "q") -> RoutingRequest:
    slo, rank = TIERS[tier]
    return RoutingRequest(request_id=rid, tier=tier, tbt_slo_s=slo, tier_rank=rank, prompt_len=prompt)
