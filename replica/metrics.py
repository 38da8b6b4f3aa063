"""The replica's Prometheus metrics (gauges from its feedback snapshot), and the metric-spec
machinery the app's metrics share (`serve_app.metrics` holds the ingress's and lists them all).

Metrics go through Ray Serve's custom-metrics API (`ray.serve.metrics`), built only when a
recorder is created (`ReplicaMetrics.create`), so pure code and its tests never import Ray.
``TIERED_METRICS=0`` in the replicas' environment turns recording off; ``TIERED_METRICS_PERIOD_S``
(default 5 s) is how often the replica refreshes its gauges when Serve polls its snapshot less
often.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PREFIX", "REPLICA_METRICS", "REPLICA_METRICS_PERIOD_S", "SLO_KINDS", "MetricSpec", "ReplicaMetrics",
           "metrics_enabled", "ray_factory"]

logger = logging.getLogger("ray.serve")

PREFIX = "ray_"  # Ray's Prometheus exporter prefixes every custom metric
SLO_KINDS = ("ttft", "tbt")


def _period_from_env(default: float = 5.0) -> float:
    try:
        value = float(os.environ.get("TIERED_METRICS_PERIOD_S", default))
    except ValueError:
        return default
    return value if value > 0 else default


REPLICA_METRICS_PERIOD_S = _period_from_env()  # the replica's gauge refresh period when Serve polls less often
REPLICA_METRICS_PERIOD_S = _period_from_env()  # the replica's gauge refresh period when Serve polls less often


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as defined; Prometheus sees PREFIX + name
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()
    unit: str = "1"
    where: str = "ingress"  # "ingress" | "replica"
    boundaries: tuple[float, ...] | None = None

    @property
    def exported(self) -> str:
        return PREFIX + self.name


def metric_spec(name: str, kind: str, description: str, tag_keys: tuple[str, ...] = (), unit: str = "1",
          where: str = "ingress", boundaries: tuple[float, ...] | None = None) -> MetricSpec:
    return MetricSpec(name, kind, description, tag_keys, unit, where, boundaries)


R_PREFILL = metric_spec("tiered_replica_waiting_prefill_tokens", "gauge",
                  "Prompt tokens queued for prefill on the replica (waiting and partly prefilled requests).",
                  unit="tokens", where="replica")
R_WAITING = metric_spec("tiered_replica_waiting_requests", "gauge", "Requests waiting on the replica.", where="replica")
R_RUNNING = metric_spec("tiered_replica_running_requests", "gauge", "Requests running on the replica.", where="replica")
R_DECODES = metric_spec("tiered_replica_running_decodes", "gauge", "Running decodes on the replica per tier.",
                  ("tier",), where="replica")
R_KV = metric_spec("tiered_replica_kv_usage_ratio", "gauge", "Fraction of the replica's KV-cache blocks in use.",
             unit="ratio", where="replica")
R_BATCH = metric_spec("tiered_replica_mean_batch_time_seconds", "gauge", "The replica scheduler's mean iteration time.",
                unit="seconds", where="replica")
R_MISSES = metric_spec("tiered_engine_slo_misses_total", "counter",
                 "SLO misses counted by the replica's engine at token emission (kind=ttft or tbt).",
                 ("tier", "kind"), where="replica")

REPLICA_METRICS: tuple[MetricSpec, ...] = (R_PREFILL, R_WAITING, R_RUNNING, R_DECODES, R_KV, R_BATCH, R_MISSES)


def metrics_enabled() -> bool:
    return os.environ.get("TIERED_METRICS", "1").strip().lower() not in ("0", "false", "no", "off")



Factory = Callable[[MetricSpec], Any]


def ray_factory(spec: MetricSpec) -> Any:
    """A `ray.serve.metrics` object for `spec` (Serve adds its deployment/replica/app tags)."""
    from ray.serve import metrics as sm

    if spec.kind == "counter":
        return sm.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys or None)
    if spec.kind == "gauge":
        return sm.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys or None)
    if spec.kind == "histogram":
        return sm.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries or ()),
                            tag_keys=spec.tag_keys or None)
    raise ValueError(f"unknown metric kind {spec.kind!r}")



class ReplicaMetrics:
    """Replica gauges (and the engine's miss counters) set from a feedback snapshot
    (`replica.slo.SLOTracker.snapshot`)."""

    def __init__(self, factory: Factory = ray_factory) -> None:
        self.prefill = factory(R_PREFILL)
        self.waiting = factory(R_WAITING)
        self.running = factory(R_RUNNING)
        self.decodes = factory(R_DECODES)
        self.kv = factory(R_KV)
        self.batch = factory(R_BATCH)
        self.misses = factory(R_MISSES)
        self._decode_tiers: set[str] = set()
        self._miss_totals: dict[tuple[str, str], int] = {}
        self.last_update_s = 0.0  # time.monotonic() of the last update

    @classmethod
    def create(cls, factory: Factory | None = None) -> ReplicaMetrics | None:
        if factory is None and not metrics_enabled():
            return None
        try:
            return cls(factory or ray_factory)
        except Exception as e:  # noqa: BLE001
            logger.warning("replica metrics are off: %r", e)
            return None

    def update(self, snap: Mapping[str, Any]) -> None:
        self.last_update_s = time.monotonic()
        self.prefill.set(float(snap.get("waiting_prefill_tokens", 0)))
        self.waiting.set(float(snap.get("num_waiting", 0)))
        self.running.set(float(snap.get("num_running", 0)))
        self.kv.set(float(snap.get("kv_usage", 0.0)))
        self.batch.set(float(snap.get("mean_batch_time_s") or 0.0))
        decodes = snap.get("running_decodes_by_tier") or {}
        tiers = snap.get("tiers") or {}
        self._decode_tiers |= set(decodes) | set(tiers)
        for tier in self._decode_tiers:  # tiers gone idle go back to 0
            self.decodes.set(float(decodes.get(tier, 0)), tags={"tier": tier})
        for tier, st in tiers.items():
            for kind in SLO_KINDS:
                total = int(st.get(f"{kind}_misses_total") or 0)
                prev = self._miss_totals.get((tier, kind), 0)
                if total > prev:
                    self.misses.inc(total - prev, tags={"tier": tier, "kind": kind})
                self._miss_totals[(tier, kind)] = total

    def due(self, period_s: float = REPLICA_METRICS_PERIOD_S) -> bool:
        return time.monotonic() - self.last_update_s >= period_s
