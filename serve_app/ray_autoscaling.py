"""Ray Serve's side of the replica autoscaling (``replicas.autoscaling``): the engine replicas'
deployment runs `TierAwareServePolicy` as its custom autoscaling policy (Ray Serve 2.60's
``AutoscalingConfig.policy``), and the decision is `serve_app.autoscaling_policy`'s
`TierAwareAutoscaler` (pure; the cluster simulator runs the same object).

What the policy reads, all through Serve's own autoscaling metrics (no extra channel):

- every replica's feedback snapshot: `LLMReplica.record_autoscaling_stats` returns
  `replica.autoscaling_stats.autoscaling_stats` (the snapshot's fields the policy uses, flattened
  to floats as Serve's custom metrics must be); the policy takes each running replica's latest report
  (`feedback_from_stats`) from ``ctx.raw_metrics``;
- the arrival rate per tier: each replica counts the requests it was given and their prompt
  tokens (`replica.autoscaling_stats.ArrivalCounter`, cumulative); over Serve's window (``look_back_period_s`` =
  ``arrival_window_s``) the rate is each replica's counter's rise over its time span, summed
  over the replicas (`arrivals_from_series`).  Requests the ingress shed never reach a replica and
  are not counted: the ingress sheds only while the predicted queueing delay or a tier's TBT is
  over admission's bound, and that is over the policy's own trigger (rule 2 of
  `serve_app.autoscaling_policy`), which then adds a replica per cooldown;
- the replica counts: ``ctx.current_num_replicas`` running, and ``ctx.target_num_replicas`` minus
  those as starting.

Serve's own delays and gains are switched off (``upscale_delay_s`` = ``downscale_delay_s`` = 0):
the cooldowns are the policy's.  Serve still clamps to [min_replicas, max_replicas].  A replica
removed by a scale-down is drained by Serve: its routers stop sending to it, the requests it holds
run to the end for up to ``drain_timeout_s`` (``graceful_shutdown_timeout_s``), then it stops.
The policy logs each change of target with its rule and reason (the controller's log) and returns
them in Serve's ``policy_state``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from replica.autoscaling_stats import ARRIVED, FB, INT_FIELDS, SCALAR_FIELDS, TIER_FIELDS
from router.feedback import SUPPORTED_SNAPSHOT_VERSION, FeedbackError, ReplicaFeedback
from serve_app.autoscaling_policy import ArrivalStats, TierArrivals, TierAwareAutoscaler
from serve_app.config import AdmissionConfig, AppConfig, ReplicaAutoscalingConfig, ServingTier

__all__ = [
    "POLICY_FUNCTION",
    "TierAwareServePolicy",
    "arrivals_from_series",
    "feedback_from_stats",
    "policy_config",
    "replica_autoscaling_config",
]

logger = logging.getLogger("ray.serve")

POLICY_FUNCTION = "serve_app.ray_autoscaling:TierAwareServePolicy"


# ------------------------------------------------------------------------------- policy side

def feedback_from_stats(replica_id: str, values: Mapping[str, float]) -> ReplicaFeedback | None:
    """The feedback snapshot in one replica's reported stats (None when it reported none: a
    replica still starting, or a report that is not a valid snapshot)."""
    if FB + "timestamp_s" not in values:
        return None
    snap: dict[str, Any] = {"version": SUPPORTED_SNAPSHOT_VERSION, "replica_id": replica_id}
    decodes: dict[str, int] = {}
    tiers: dict[str, dict[str, float | int]] = {}
    hist: dict[int, int] = {}
    for key, v in values.items():
        if not key.startswith(FB):
            continue
        parts = key[len(FB):].split("/")
        if len(parts) == 1 and parts[0] in SCALAR_FIELDS:
            snap[parts[0]] = int(v) if parts[0] in INT_FIELDS else float(v)
        elif len(parts) == 2 and parts[0] == "decodes":
            decodes[parts[1]] = int(v)
        elif len(parts) == 3 and parts[0] == "tier" and parts[2] in TIER_FIELDS:
            tiers.setdefault(parts[1], {})[parts[2]] = int(v) if parts[2] in INT_FIELDS else float(v)
        elif len(parts) == 2 and parts[0] == "histogram" and parts[1].isdigit():
            hist[int(parts[1])] = int(v)
    snap["running_decodes_by_tier"] = decodes
    snap["tiers"] = tiers
    if hist:
        edges = sorted(hist)
        snap["waiting_prompt_histogram"] = {"edges": edges, "counts": [hist[e] for e in edges]}
    try:
        return ReplicaFeedback.from_snapshot(snap)
    except FeedbackError:
        logger.warning("autoscaling: replica %s reported stats that are not a feedback snapshot", replica_id,
                       exc_info=True)
        return None


def _point(p: Any) -> tuple[float, float]:
    """A Serve time series point (``TimeStampedValue``, or a (t, v) pair) as (t, v)."""
    return (float(p.timestamp), float(p.value)) if hasattr(p, "timestamp") else (float(p[0]), float(p[1]))


def arrivals_from_series(raw: Mapping[str, Mapping[Any, Sequence[Any]]]) -> ArrivalStats:
    """Per-tier arrival rates from the replicas' cumulative counters over Serve's window: each
    replica's rise over its series' span, summed over the replicas (a replica with a single
    report adds nothing yet); the mean prompt tokens, the tokens' rise over the requests'."""
    rate: dict[str, float] = {}
    tokens_rate: dict[str, float] = {}
    for key, by_replica in raw.items():
        if not key.startswith(ARRIVED):
            continue
        tier, _, what = key[len(ARRIVED):].rpartition("/")
        if what not in ("requests", "prompt_tokens") or not tier:
            continue
        total = 0.0
        for series in by_replica.values():  # Serve keeps each series in time order (bisect.insort)
            if len(series) < 2:
                continue
            (t0, v0), (t1, v1) = _point(series[0]), _point(series[-1])
            if t1 > t0:
                total += max(0.0, v1 - v0) / (t1 - t0)
        (rate if what == "requests" else tokens_rate)[tier] = total
    return ArrivalStats({t: TierArrivals(r, tokens_rate.get(t, 0.0) / r if r > 0 else 0.0) for t, r in rate.items()})


def latest_values(raw: Mapping[str, Mapping[Any, Sequence[Any]]], replica: Any) -> dict[str, float]:
    """The metrics of one replica's latest report (a report records all its metrics at one
    timestamp; a metric missing from it, e.g. the decodes of a tier that has none running now,
    keeps older points in Serve's window, which are not read)."""
    last = {key: _point(series[-1]) for key, by_replica in raw.items() if (series := by_replica.get(replica))}
    newest = max((t for t, _ in last.values()), default=None)
    out = {key: v for key, (t, v) in last.items() if t == newest}
    return out


class TierAwareServePolicy:
    """Serve's custom autoscaling policy for the engine replicas, instantiated once by Serve's
    controller with ``policy_kwargs`` (`policy_config`: JSON).  A call takes Serve's
    ``AutoscalingContext`` and returns (target replicas, policy state)."""

    def __init__(self, tiers: list[Mapping[str, Any]], autoscaling: Mapping[str, Any],
                 admission: Mapping[str, Any] | None = None, token_budget: int | None = None) -> None:
        self.scaler = TierAwareAutoscaler([ServingTier.model_validate(dict(t)) for t in tiers],
                                          ReplicaAutoscalingConfig.model_validate(dict(autoscaling)),
                                          AdmissionConfig.model_validate(dict(admission or {})),
                                          token_budget=token_budget)
        self.period_s = self.scaler.config.metrics_period_s
        self._last_target: int | None = None
        self._last_decision_s = -float("inf")
        self._last_counts: tuple[int, int] | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Serve calls it every control loop (0.1 s); a new decision is made once per
        ``metrics_period_s`` (the replicas report no faster) or when the replica counts changed,
        else the last target stands."""
        running = int(ctx.current_num_replicas)
        starting = max(0, int(ctx.target_num_replicas) - running)
        now_s = ctx.current_time
        if (self._last_target is not None and now_s - self._last_decision_s < self.period_s
                and self._last_counts == (running, starting)):
            return self._last_target, dict(ctx.policy_state or {})
        self._last_decision_s, self._last_counts = now_s, (running, starting)
        raw = ctx.raw_metrics or {}
        feedback = []
        for replica in ctx.running_replicas:
            fb = feedback_from_stats(_replica_name(replica), latest_values(raw, replica))
            if fb is not None:
                feedback.append(fb)
        decision = self.scaler.decide(now_s, feedback, arrivals_from_series(raw), running, starting)
        if decision.target_replicas != (self._last_target if self._last_target is not None else running + starting):
            logger.info("autoscaling %s: %d -> %d replicas (%s): %s", ctx.deployment_name, running + starting,
                        decision.target_replicas, decision.reason, decision.message)
        self._last_target = decision.target_replicas
        state = dict(ctx.policy_state or {})
        state.update({"tiered_reason": decision.reason, "tiered_message": decision.message,
                      "tiered_target": decision.target_replicas})
        return decision.target_replicas, state


def _replica_name(replica: Any) -> str:
    unique = getattr(replica, "unique_id", None)
    return str(unique) if unique is not None else str(replica)


# ------------------------------------------------------------------------------- deployment

def policy_config(config: AppConfig) -> dict[str, Any]:
    """The policy's ``policy_kwargs`` (JSON): what it needs of the app config, the tiers,
    admission, the autoscaling section and the replicas' token budget; no keys, no engine."""
    assert config.replicas.autoscaling is not None
    return {"tiers": [t.model_dump(mode="json") for t in config.tiers],
            "admission": config.admission.model_dump(mode="json", exclude_unset=True),
            "autoscaling": config.replicas.autoscaling.model_dump(mode="json", exclude_unset=True),
            "token_budget": config.token_budget}


def replica_autoscaling_config(config: AppConfig) -> dict[str, Any] | None:
    """Serve's ``autoscaling_config`` for the engine replicas (None: a fixed ``num_replicas``)."""
    a: ReplicaAutoscalingConfig | None = config.replicas.autoscaling
    if a is None:
        return None
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": config.replicas.initial_count,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "metrics_interval_s": a.metrics_period_s,
        "look_back_period_s": a.arrival_window_s,
        "policy": {"policy_function": POLICY_FUNCTION, "policy_kwargs": policy_config(config)},
    }

