"""The app's Prometheus metrics: every definition, and the small recorders that feed them.

Metrics go through Ray Serve's custom-metrics API (`ray.serve.metrics`); Ray's per-node metrics
agent exports them in Prometheus text format on the node's metrics export port
(``ray.init(_metrics_export_port=PORT)`` or ``ray start --metrics-export-port=PORT``; path
``/metrics``), every name prefixed with ``ray_``.  Serve adds the labels ``deployment``,
``replica`` and ``application``; Ray adds ``WorkerId``, ``NodeAddress``, ``SessionName``, ...
so queries aggregate with ``sum by (tier, le) (...)``.  Nothing here imports Ray until a
recorder is built (`IngressMetrics.create`, `ReplicaMetrics.create`), so pure code and its
tests do not need it.  ``TIERED_METRICS=0`` in the replicas' environment turns recording off.

=====================================  =========  ==================  =======  ====================================
metric (exported: ray_ + name)         type       labels (+ Serve's)  unit     what; where measured
=====================================  =========  ==================  =======  ====================================
tiered_ttft_seconds                    histogram  tier                seconds  request arrival at the ingress to its
                                                                               first token chunk; ingress
tiered_tbt_seconds                     histogram  tier                seconds  gap between consecutive tokens of a
                                                                               request as chunks reach the ingress
                                                                               (a chunk of k tokens: its gap, then
                                                                               k-1 gaps of 0); ingress
tiered_slo_misses_total                counter    tier, kind          1        kind=ttft: TTFT over the tier's
                                                                               ttft_target_s; kind=tbt: TBT gaps
                                                                               over the tier's tbt_slo_s; ingress
tiered_requests_total                  counter    tier, outcome       1        generation requests by admission
                                                                               outcome: admitted (sent to a
                                                                               replica), rejected (4xx), shed
                                                                               (429/503 overload); ingress
tiered_request_rejections_total        counter    tier, reason        1        rejected or shed requests by reason:
                                                                               unauthorized, invalid, too_large,
                                                                               context, overload; ingress
tiered_requests_finished_total         counter    tier, status        1        admitted requests by how they ended:
                                                                               completed, cancelled (client gone),
                                                                               aborted (engine abort), error;
                                                                               ingress
tiered_goodput_requests_total          counter    tier                1        completed requests that met their
                                                                               tier's SLOs (TTFT within target, no
                                                                               TBT gap over the SLO); ingress
tiered_generated_tokens_total          counter    tier                tokens   completion tokens streamed; ingress
tiered_key_tokens_total                counter    key, kind           tokens   per API key id (a digest prefix,
                                                                               never the key): kind=prompt or
                                                                               completion; opt-in
                                                                               (metrics.per_key_max_keys keys,
                                                                               the rest as key="other"); ingress
tiered_replica_waiting_prefill_tokens  gauge      (Serve's)           tokens   prompt tokens not yet prefilled
                                                                               (waiting + partly prefilled);
                                                                               replica feedback snapshot
tiered_replica_waiting_requests        gauge      (Serve's)           1        requests waiting for admission;
                                                                               replica snapshot
tiered_replica_running_requests        gauge      (Serve's)           1        requests running (prefill or
                                                                               decode); replica snapshot
tiered_replica_running_decodes         gauge      tier                1        running decodes per tier; replica
                                                                               snapshot
tiered_replica_kv_usage_ratio          gauge      (Serve's)           ratio    KV-cache blocks in use, 0..1;
                                                                               replica snapshot
tiered_replica_mean_batch_time_seconds gauge      (Serve's)           seconds  the scheduler's mean iteration
                                                                               time; replica snapshot
tiered_engine_slo_misses_total         counter    tier, kind          1        SLO misses as the engine's
                                                                               SLOTracker counts them (token
                                                                               emission time, no network);
                                                                               replica snapshot
=====================================  =========  ==================  =======  ====================================

Overhead.  Per token the ingress does one ``time.perf_counter()`` and appends the gap to a
per-request ``array('d')``; every `FLUSH_EVERY` tokens and at the end of the request the gaps go
to the TBT histogram in one batch (Ray's histogram has no batch call: one native ``record`` per
gap, with the tag dict built once per tier, about 2 us each here), with the token and miss
counters incremented once per batch.  TTFT is recorded when the first token arrives.  The replica
gauges are set from the feedback snapshot the replica builds anyway for the routers
(`record_routing_stats`), and from a background task every `REPLICA_METRICS_PERIOD_S` when
Serve polls less often.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

__all__ = [
    "FINISH_STATUSES", "FLUSH_EVERY", "METRICS", "METRICS_BY_NAME", "OUTCOMES", "PREFIX", "REJECTION_REASONS",
    "REPLICA_METRICS_PERIOD_S", "TBT_BOUNDARIES_S", "TTFT_BOUNDARIES_S", "IngressMetrics", "MetricSpec",
    "ReplicaMetrics", "RequestTimer", "exported_series_names", "metrics_enabled", "ray_factory", "rejection_reason",
    "tier_slos",
]

from replica.metrics import (PREFIX, REPLICA_METRICS, REPLICA_METRICS_PERIOD_S, Factory, MetricSpec,
                             ReplicaMetrics, metric_spec, metrics_enabled, ray_factory)

logger = logging.getLogger("ray.serve")

FLUSH_EVERY = 32  # TBT gaps buffered per request before they go to the histogram


UNKNOWN_TIER = "unknown"  # the tier label of requests rejected before a key resolved a tier

# Bucket edges that resolve the SLOs: the paper's TBT SLOs (0.1 s premium, 0.5 s free) and the
# 0.5 s TTFT target are edges, so "over the SLO" is exactly the mass above an edge.
TTFT_BOUNDARIES_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                     10.0, 20.0, 30.0, 60.0)
TBT_BOUNDARIES_S = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                    0.6, 0.75, 1.0, 2.0, 5.0)

OUTCOMES = ("admitted", "rejected", "shed")
REJECTION_REASONS = ("unauthorized", "invalid", "too_large", "context", "overload")
FINISH_STATUSES = ("completed", "cancelled", "aborted", "error")


TTFT = metric_spec("tiered_ttft_seconds", "histogram",
             "Time to first token: request arrival at the ingress to its first token chunk.",
             ("tier",), "seconds", boundaries=TTFT_BOUNDARIES_S)
TBT = metric_spec("tiered_tbt_seconds", "histogram",
            "Time between consecutive tokens of a request, as the chunks reach the ingress.",
            ("tier",), "seconds", boundaries=TBT_BOUNDARIES_S)
SLO_MISSES = metric_spec("tiered_slo_misses_total", "counter",
                   "SLO misses seen at the ingress: kind=ttft (TTFT over the tier's target), "
                   "kind=tbt (token gaps over the tier's TBT SLO).", ("tier", "kind"))
REQUESTS = metric_spec("tiered_requests_total", "counter",
                 "Generation requests by admission outcome: admitted, rejected (4xx), shed (overload).",
                 ("tier", "outcome"))
REJECTIONS = metric_spec("tiered_request_rejections_total", "counter",
                   "Rejected or shed generation requests by reason: unauthorized, invalid, too_large, "
                   "context, overload.", ("tier", "reason"))
FINISHED = metric_spec("tiered_requests_finished_total", "counter",
                 "Admitted requests by how they ended: completed, cancelled (client gone), aborted "
                 "(engine abort), error.", ("tier", "status"))
GOODPUT = metric_spec("tiered_goodput_requests_total", "counter",
                "Completed requests that met their tier's SLOs (TTFT within target, no TBT gap over the SLO).",
                ("tier",))
TOKENS = metric_spec("tiered_generated_tokens_total", "counter", "Completion tokens streamed to clients.",
               ("tier",), "tokens")
KEY_TOKENS = metric_spec("tiered_key_tokens_total", "counter",
                         "Tokens per API key id (kind=prompt or completion); opt-in, at most metrics.per_key_max_keys "
                         "key ids, the others counted as key=\"other\".", ("key", "kind"), "tokens")
INGRESS_METRICS: tuple[MetricSpec, ...] = (TTFT, TBT, SLO_MISSES, REQUESTS, REJECTIONS, FINISHED, GOODPUT, TOKENS,
                                           KEY_TOKENS)
METRICS: tuple[MetricSpec, ...] = INGRESS_METRICS + REPLICA_METRICS  # every metric of the app
METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def exported_series_names() -> set[str]:
    """Every Prometheus series name the metrics produce (histograms: _bucket, _count, _sum)."""
    out = set()
    for m in METRICS:
        if m.kind == "histogram":
            out |= {m.exported + s for s in ("_bucket", "_count", "_sum")}
        else:
            out.add(m.exported)
    return out


def rejection_reason(status_code: int, code: str | None = None) -> str:
    """The ``reason`` label of a rejected request from its HTTP status and OpenAI error code."""
    if status_code in (401, 403):
        return "unauthorized"
    if status_code in (429, 503):
        return "overload"
    if status_code == 413:
        return "too_large"
    if code == "context_length_exceeded":
        return "context"
    return "invalid"


# ------------------------------------------------------------------------------- metric objects

def _observer(metric: Any, tags: dict[str, str]) -> Callable[[float], None]:
    """``observe(value)`` for a histogram with fixed tags.  For Ray's histograms this is the
    native recorder with the final tag dict built once (the public ``observe`` merges and
    validates the tags on every call, ~2.5x the cost); any other object gets ``observe``."""
    raw = getattr(metric, "_metric", None)
    info = getattr(metric, "info", None)
    if raw is not None and hasattr(raw, "record") and isinstance(info, dict) and "route" not in info["tag_keys"] \
            and not getattr(metric, "_discard_metric", False):
        final = {**info["default_tags"], **tags}
        if set(final) == set(info["tag_keys"]) and all(isinstance(v, str) for v in final.values()):
            return partial(raw.record, tags=final)
    return partial(_observe, metric, tags)


def _observe(metric: Any, tags: dict[str, str], value: float) -> None:
    metric.observe(value, tags=tags)


# ------------------------------------------------------------------------------------- ingress

class _TierRecorder:
    """Per-tier bound recorders: tags built once."""

    __slots__ = ("tier", "tbt_slo_s", "ttft_target_s", "ttft", "tbt", "m", "t_tier", "t_ttft_miss", "t_tbt_miss")

    def __init__(self, m: IngressMetrics, tier: str, tbt_slo_s: float | None, ttft_target_s: float | None) -> None:
        self.m, self.tier = m, tier
        self.tbt_slo_s = tbt_slo_s if tbt_slo_s is not None else float("inf")
        self.ttft_target_s = ttft_target_s if ttft_target_s is not None else float("inf")
        self.t_tier = {"tier": tier}
        self.t_ttft_miss = {"tier": tier, "kind": "ttft"}
        self.t_tbt_miss = {"tier": tier, "kind": "tbt"}
        self.ttft = _observer(m.ttft, self.t_tier)
        self.tbt = _observer(m.tbt, self.t_tier)


class RequestTimer:
    """Token timing of one admitted request.  ``tokens(n)`` when a chunk arrives (``n``: the
    completion tokens so far); ``finish(status)`` once at the end.  Cheap per token: a clock
    read and an array append; the histogram gets the gaps in batches (`FLUSH_EVERY`)."""

    __slots__ = ("_rec", "start", "last", "n", "flushed_n", "gaps", "missed", "ttft_s", "finished")

    def __init__(self, rec: _TierRecorder | None, start: float) -> None:
        self._rec = rec
        self.start = start
        self.last: float | None = None
        self.n = 0
        self.flushed_n = 0
        self.gaps = array("d")
        self.missed = False
        self.ttft_s: float | None = None
        self.finished = False

    def tokens(self, n: int, t: float | None = None) -> None:
        k = n - self.n
        if k <= 0:
            return
        if t is None:
            t = time.perf_counter()
        gaps = self.gaps
        if self.last is None:
            self.ttft_s = t - self.start
            self._first_token(self.ttft_s)
        else:
            gaps.append(t - self.last)
        if k > 1:  # the rest of a multi-token chunk reached the client with it
            gaps.extend([0.0] * (k - 1))
        self.last = t
        self.n = n
        if len(gaps) >= FLUSH_EVERY:
            self.flush()

    def _first_token(self, ttft: float) -> None:
        rec = self._rec
        if rec is None:
            return
        try:
            rec.ttft(ttft)
            if ttft > rec.ttft_target_s:
                self.missed = True
                rec.m.slo_misses.inc(1, tags=rec.t_ttft_miss)
        except Exception:  # noqa: BLE001 - metrics never fail a request
            rec.m.failed("ttft")

    def flush(self) -> None:
        gaps, rec = self.gaps, self._rec
        new_tokens = self.n - self.flushed_n
        self.flushed_n = self.n
        if rec is None:
            del gaps[:]
            return
        try:
            if gaps:
                observe, slo = rec.tbt, rec.tbt_slo_s
                misses = 0
                for g in gaps:
                    observe(g)
                    if g > slo:
                        misses += 1
                del gaps[:]
                if misses:
                    self.missed = True
                    rec.m.slo_misses.inc(misses, tags=rec.t_tbt_miss)
            if new_tokens > 0:
                rec.m.tokens.inc(new_tokens, tags=rec.t_tier)
        except Exception:  # noqa: BLE001
            del gaps[:]
            rec.m.failed("tbt")

    def finish(self, status: str) -> None:
        """Record how the request ended (once; later calls are ignored)."""
        if self.finished:
            return
        self.finished = True
        self.flush()
        rec = self._rec
        if rec is None:
            return
        try:
            rec.m.finished.inc(1, tags={"tier": rec.tier, "status": status})
            if status == "completed" and not self.missed and self.ttft_s is not None:
                rec.m.goodput.inc(1, tags=rec.t_tier)
        except Exception:  # noqa: BLE001
            rec.m.failed("finish")


class IngressMetrics:
    """The ingress's recorders.  ``tiers``: ``{name: (tbt_slo_s, ttft_target_s)}``.  Build with
    `create` (Ray Serve metrics, or a no-op recorder when disabled or unavailable); tests may
    pass their own ``factory``."""

    def __init__(self, tiers: Mapping[str, tuple[float | None, float | None]], factory: Factory = ray_factory,
                 per_key_max_keys: int = 0) -> None:
        self.key_tokens = factory(KEY_TOKENS) if per_key_max_keys > 0 else None
        self.per_key_max_keys = per_key_max_keys
        self._key_labels: set[str] = set()
        self.ttft = factory(TTFT)
        self.tbt = factory(TBT)
        self.slo_misses = factory(SLO_MISSES)
        self.requests = factory(REQUESTS)
        self.rejections = factory(REJECTIONS)
        self.finished = factory(FINISHED)
        self.goodput = factory(GOODPUT)
        self.tokens = factory(TOKENS)
        self._slos = dict(tiers)
        self._tiers: dict[str, _TierRecorder] = {}
        self._failures = 0

    @classmethod
    def create(cls, tiers: Mapping[str, tuple[float | None, float | None]],
               factory: Factory | None = None, per_key_max_keys: int = 0) -> IngressMetrics | None:
        """The recorder, or None (recording off) if ``TIERED_METRICS=0`` or the metrics cannot be
        built (logged once: serving goes on without them)."""
        if factory is None and not metrics_enabled():
            return None
        try:
            return cls(tiers, factory or ray_factory, per_key_max_keys)
        except Exception as e:  # noqa: BLE001
            logger.warning("ingress metrics are off: %r", e)
            return None

    def _tier(self, tier: str) -> _TierRecorder:
        rec = self._tiers.get(tier)
        if rec is None:
            tbt, ttft = self._slos.get(tier, (None, None))
            rec = self._tiers[tier] = _TierRecorder(self, tier, tbt, ttft)
        return rec

    def failed(self, what: str) -> None:
        self._failures += 1
        if self._failures in (1, 100, 10_000):
            logger.warning("recording a metric (%s) failed (%d failures so far)", what, self._failures, exc_info=True)

    def rejected(self, tier: str | None, status_code: int, code: str | None = None) -> None:
        """A generation request rejected before a replica: 4xx (``rejected``) or overload (``shed``)."""
        try:
            reason = rejection_reason(status_code, code)
            tier = tier or UNKNOWN_TIER
            self.requests.inc(1, tags={"tier": tier, "outcome": "shed" if reason == "overload" else "rejected"})
            self.rejections.inc(1, tags={"tier": tier, "reason": reason})
        except Exception:  # noqa: BLE001
            self.failed("rejected")

    def key_usage(self, key_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A finished request's tokens under its key id (opt-in; the first ``per_key_max_keys`` ids
        seen get a label of their own, later ones share ``other``: the series stay bounded)."""
        if self.key_tokens is None:
            return
        if key_id not in self._key_labels:
            if len(self._key_labels) >= self.per_key_max_keys:
                key_id = "other"
            else:
                self._key_labels.add(key_id)
        try:
            if prompt_tokens:
                self.key_tokens.inc(prompt_tokens, tags={"key": key_id, "kind": "prompt"})
            if completion_tokens:
                self.key_tokens.inc(completion_tokens, tags={"key": key_id, "kind": "completion"})
        except Exception:  # noqa: BLE001
            self.failed("key_usage")

    def admitted(self, tier: str, start: float) -> RequestTimer:
        """A request sent to a replica; ``start``: its arrival (``time.perf_counter()``)."""
        rec = self._tier(tier)
        try:
            self.requests.inc(1, tags={"tier": tier, "outcome": "admitted"})
        except Exception:  # noqa: BLE001
            self.failed("admitted")
        return RequestTimer(rec, start)


def tier_slos(tiers: Iterable[Any]) -> dict[str, tuple[float | None, float | None]]:
    """``{name: (tbt_slo_s, ttft_target_s)}`` from `serve_app.config.ServingTier` objects."""
    return {t.name: (t.tbt_slo_s, t.ttft_target_s) for t in tiers}
