"""Tier-aware autoscaling of the engine replicas: the decision logic (pure: no Ray, no vLLM).

`TierAwareAutoscaler.decide` says how many engine replicas the deployment should have, from what
admission control already reads (`serve_app.admission`): every running replica's latest feedback
snapshot (`router.feedback.ReplicaFeedback`), plus the arrival rate per tier (`ArrivalStats`:
offered load, ideally counted before admission, since a request the ingress sheds is demand that
more replicas would serve; the Ray Serve adapter, `serve_app.ray_autoscaling`, counts what reaches
the replicas, the cluster simulator every arrival) and the replica counts (running, and
starting: requested, engine still loading).  It keeps a little state of its own: the times of its last scale events, when a starting
replica last became ready, a short history of each tier's arrival rate (the trend) and the recent
predicted queueing delays and TBT counters (`DelayHistory`, `TBTHistory`, as the ingress keeps
them).  The Ray Serve adapter (`serve_app.ray_autoscaling`: Serve's custom autoscaling policy) and
the cluster simulator both call it; it only decides, they apply.

The cluster's state is admission's (`AdmissionPolicy.assess` -> `ClusterLoad`): stale snapshots
(older than ``admission.max_feedback_age_s``) are ignored, the cluster prefill rate R, and each
tier's health (at risk "tbt": its recent TBT miss fraction
over 1 - ``tbt_quantile``, or a replica's P99 TBT over the SLO; "kv": mean KV use at
``kv_limit``).  The predicted queueing delay D of a new request of the arrivals' mean prompt
length p: the waiting prefill tokens of prompts no longer than p (the snapshots' histograms) over
R, since the replicas run shortest-prompt-first (SLAI, as the SLO router assumes); admission's own
D counts every waiting token, which for a long prompt waiting alone is its own prefill time, not a
queue.  D_w: D's mean over ``admission.delay_window_s``.  T is the strictest (smallest) TTFT
target of the tiers, h = ``startup_s``.

Capacity (the SLO router's prefill-rate model, `router.policies.slo.SLOPolicy`, which admission
prices R with).  A replica prefills c = max(B - d, m B) / b tokens/s, B the token budget per batch,
m the prefill floor (``min_prefill_share``), d the decode tokens per batch of its running decodes
(`SLOPolicy.decode_tokens_per_batch`: a decode of a tier with TBT SLO s costs about
min(1, b / (s - theta b)) tokens per batch under SLAI) and b the batch time.  For n replicas:
b = the median measured batch time of the fresh snapshots (``default_batch_time_s`` when none has
one: the routers' fallback), and the cluster's running decodes of each tier (the fresh snapshots'
sum, scaled up by running / fresh replicas for those without fresh feedback) times the tier's
forecast growth (decodes in flight grow with the arrival rate, Little's law), spread evenly over
the n replicas: c(n).  At today's count and load c(n) is the mean replica's
`SLOPolicy.prefill_rate_tps`; with fewer replicas each carries more decodes and prefills less,
with more, less and more.  This is the planner's measure (docs/planner.md: the rate of a 512-token
batch less the decodes' share, over the mean request) with the batch time measured instead of
read from a cost profile; the planner's answer itself comes from simulation, which this loop
cannot run.

Demand.  Per tier, the arrival rate r (requests/s over the adapter's window) times the mean prompt
tokens to prefill; the forecast for now + h (the replica start-up time: a replica asked for now
serves then) is r + max(0, slope) h, with the slope a least-squares fit of the tier's recent rates
over ``trend_window_s`` (once the samples span half of it; at most one sample per 1/60 of it).  A
falling trend is not extrapolated: a replica given back costs a start-up to get back, so scale-down
acts on the measured rate.  Forecast prefill demand P = sum over the tiers of forecast rate x mean
prompt tokens (tokens/s); tier t's decodes grow by its forecast rate over r (1 without arrivals).

The rules, in order (running replicas N, starting S, total N + S):

1. forecast: the replicas needed n* = the fewest n with P <= n c(n) ``target_utilization`` (the
   share of the prefill capacity the forecast may use: the rest absorbs Poisson bursts and the
   forecast's error; the planner's first guess uses 0.75; beyond ``max_replicas`` n* is the upper
   bound ceil(P / (c(max) u)), for the clamp to report).  n* > N + S scales up: starting replicas
   count as capacity arriving and are not asked for again.
2. strict tier: a tier at risk, or D_w > ``delay_trigger_fraction`` x T (default: half of
   admission's ``sustained_delay_factor``, 0.25, so the cluster grows before admission starts
   shedding at 0.5 T), asks for N + 1 replicas, unless capacity is already arriving: a replica
   starting, a scale-up within ``upscale_cooldown_s``, or a replica that became ready within it
   (its effect on D and on the TBT window takes that long to show).  D_w, not D: a Poisson burst
   reaches the target for a moment, and a replica arrives minutes later.  So the strict rule adds
   one replica per cooldown while the risk lasts, and the forecast rule covers what the arrival
   rate explains.
   A scale-up adds at most ``max_step_up`` replicas; within ``upscale_cooldown_s`` of the last one
   another comes only if the replicas needed grew past what that one asked for (the deficit grew),
   so an unmet remainder of a capped step waits for the cooldown.
3. scale down, by one replica, only when N - 1 keeps every tier's headroom: no replica starting,
   no tier at risk, D and D_w at most ``scale_down_delay_fraction`` x T, every running replica
   with fresh feedback (no decision on replicas it cannot see), P <= (N - 1) c(N - 1)
   ``scale_down_utilization`` (below ``target_utilization``: hysteresis, so the next rule-1
   decision does not add it back), the mean KV use carried by N - 1 replicas (x N / (N - 1)) at
   most ``target_utilization`` x ``kv_limit`` at its highest over the last
   ``downscale_cooldown_s`` (KV use swings with the decodes in flight: a dip must not give back a
   replica the next swell takes again), and ``downscale_cooldown_s`` since the last scale
   event of either direction, a replica becoming ready, or the first decision (the policy watches
   that long before it gives anything back).
4. otherwise hold (the present total N + S); then clamp to [``min_replicas``, ``max_replicas``].

`ScalingDecision.reason` names the rule that decided: "forecast" or "at_risk" / "queue_delay"
(rule 2) for a scale-up, "scale_down", "upscale_cooldown" (more were needed but the cooldown
held), "hold", or "min_replicas" / "max_replicas" when the clamp changed the rules' target
(``details["rule"]`` keeps the rule's reason); ``details`` holds every quantity above.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.feedback import ReplicaFeedback
from serve_app.admission import AdmissionPolicy, ClusterLoad, DelayHistory, TBTHistory
from serve_app.config import AdmissionConfig, AppConfig, ReplicaAutoscalingConfig, ServingTier

__all__ = [
    "ArrivalStats",
    "ReplicaAutoscalingConfig",
    "ScalingDecision",
    "TierArrivals",
    "TierAwareAutoscaler",
]

# ------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class TierArrivals:
    """One tier's recent arrivals: requests/s, and the mean prompt tokens they bring to prefill."""

    rate_rps: float
    mean_prompt_tokens: float

    def __post_init__(self) -> None:
        for name in ("rate_rps", "mean_prompt_tokens"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")


@dataclass(frozen=True)
class ArrivalStats:
    """Recent arrivals per tier (offered load: counted before admission sheds any)."""

    tiers: Mapping[str, TierArrivals] = field(default_factory=dict)

    @classmethod
    def of(cls, rates_rps: Mapping[str, float], mean_prompt_tokens: Mapping[str, float] | float) -> ArrivalStats:
        """From per-tier rates and per-tier (or one overall) mean prompt tokens."""
        def tokens(t: str) -> float:
            return mean_prompt_tokens if isinstance(mean_prompt_tokens, (int, float)) else mean_prompt_tokens.get(t, 0.0)
        return cls({t: TierArrivals(float(r), float(tokens(t))) for t, r in rates_rps.items()})

    @property
    def rate_rps(self) -> float:
        return sum(a.rate_rps for a in self.tiers.values())

    @property
    def prefill_tps(self) -> float:
        """Prefill tokens/s the arrivals bring."""
        return sum(a.rate_rps * a.mean_prompt_tokens for a in self.tiers.values())


# ------------------------------------------------------------------------------------------ output

@dataclass(frozen=True)
class ScalingDecision:
    target_replicas: int  # replicas the deployment should have (running + starting)
    reason: str  # the rule that decided (module docstring)
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ policy

class TierAwareAutoscaler:
    """The rules of the module docstring over ``tiers`` (as `serve_app.config.AppConfig` resolves
    them), with ``config``'s bounds and cooldowns, admission's ``admission_config`` for the
    cluster's state (freshness, delay and TBT windows, ``kv_limit``), and the replicas'
    ``token_budget`` (the SLO router's default when None)."""

    def __init__(self, tiers: Sequence[ServingTier], config: ReplicaAutoscalingConfig | None = None,
                 admission_config: AdmissionConfig | None = None, *, token_budget: int | None = None) -> None:
        self.config = config or ReplicaAutoscalingConfig()
        self._admission = AdmissionPolicy(tiers, admission_config, max_in_flight=1, token_budget=token_budget)
        adm = self._admission.config
        self.tiers = dict(self._admission.tiers)
        self.ttft_target_s = min(t.ttft_target_s for t in tiers)
        self.delay_trigger_fraction = (self.config.delay_trigger_fraction
                                       if self.config.delay_trigger_fraction is not None
                                       else adm.sustained_delay_factor / 2)
        if self.config.scale_down_delay_fraction >= self.delay_trigger_fraction:
            raise ValueError(f"scale_down_delay_fraction ({self.config.scale_down_delay_fraction:g}) must be below "
                             f"the delay trigger ({self.delay_trigger_fraction:g}, half of "
                             "admission.sustained_delay_factor unless delay_trigger_fraction is set)")
        self._delays = DelayHistory(adm.delay_window_s)
        self._tbt = TBTHistory(adm.tbt_window_s)
        self._rates: dict[str, deque[tuple[float, float]]] = {}
        self._first_s: float | None = None
        self._last_up_s = -math.inf
        self._last_up_need = 0
        self._last_down_s = -math.inf
        self._last_ready_s = -math.inf
        self._prev_starting: int | None = None
        self._kv: deque[tuple[float, float]] = deque()  # (time, mean KV use) over downscale_cooldown_s

    @classmethod
    def from_app_config(cls, app: AppConfig, config: ReplicaAutoscalingConfig) -> TierAwareAutoscaler:
        return cls(app.tiers, config, app.admission, token_budget=app.token_budget)

    # --- the model ------------------------------------------------------------------------------
    def replica_capacity_tps(self, n: int, batch_time_s: float, decodes_by_tier: Mapping[str, float]) -> float:
        """c(n): one of ``n`` replicas' prefill rate (tokens/s) when the cluster's running decodes
        ``decodes_by_tier`` are spread evenly over them (`SLOPolicy.prefill_rate_tps` of that
        replica)."""
        per_replica = {t: d / max(1, n) for t, d in decodes_by_tier.items()}
        return self._admission.rate_model.prefill_rate_at(per_replica, batch_time_s)

    def _record_rates(self, now_s: float, arrivals: ArrivalStats) -> None:
        window = self.config.trend_window_s
        for name in set(self._rates) | set(arrivals.tiers):
            a = arrivals.tiers.get(name)
            series = self._rates.setdefault(name, deque())
            if series and now_s - series[-1][0] < window / 60:
                continue
            series.append((now_s, a.rate_rps if a is not None else 0.0))
            while series and series[0][0] < now_s - window:
                series.popleft()

    def trend_rps_per_s(self, tier: str) -> float:
        """The least-squares slope of ``tier``'s recorded arrival rates (0 until they span half
        of ``trend_window_s``)."""
        series = self._rates.get(tier)
        if not series or len(series) < 3 or series[-1][0] - series[0][0] < self.config.trend_window_s / 2:
            return 0.0
        ts = [t for t, _ in series]
        rs = [r for _, r in series]
        tm, rm = statistics.fmean(ts), statistics.fmean(rs)
        var = sum((t - tm) ** 2 for t in ts)
        return sum((t - tm) * (r - rm) for t, r in zip(ts, rs)) / var if var > 0 else 0.0

    # --- the decision ---------------------------------------------------------------------------
    def decide(self, now_s: float, feedback: Iterable[ReplicaFeedback], arrivals: ArrivalStats,
               current_replicas: int, starting_replicas: int = 0) -> ScalingDecision:
        """The target replica count now.  ``feedback``: the latest snapshot of each running
        replica (stale ones are ignored); ``arrivals``: the recent arrivals per tier;
        ``current_replicas``: replicas running; ``starting_replicas``: requested and not serving
        yet.  Call it periodically (the trend and the windows are over the calls' times); the
        caller applies the result (this policy assumes it does)."""
        cfg = self.config
        if current_replicas < 0 or starting_replicas < 0:
            raise ValueError(f"replica counts must be >= 0, got {current_replicas} running, {starting_replicas} starting")
        n_run, n_start = int(current_replicas), int(starting_replicas)
        total = n_run + n_start
        if self._first_s is None:
            self._first_s = now_s
        if self._prev_starting is not None and n_start < self._prev_starting:
            self._last_ready_s = now_s  # a starting replica became ready (or failed: then it is retried)
        self._prev_starting = n_start

        # the cluster's state, as admission sees it
        fbs = list(feedback)
        self._tbt.add(fbs)
        self._tbt.forget(fb.replica_id for fb in fbs)
        load = self._admission.assess(fbs, None, now_s=now_s, history=self._tbt, num_replicas=n_run)
        fresh = self._admission.fresh(fbs, now_s)
        kv_peak = self._record_kv(now_s, load.kv_usage) if fresh else load.kv_usage
        # the queueing delay of a new request of the arrivals' mean prompt length, under the
        # replicas' shortest-prompt-first order: the waiting prompts no longer than it, at the
        # cluster's prefill rate (all of them when nothing has arrived or a snapshot has no
        # histogram); a long prompt waiting behind no one is its own service time, not a queue
        typical = arrivals.prefill_tps / arrivals.rate_rps if arrivals.rate_rps > 0 else None
        if typical is None:
            delay = load.queue_delay_s
        else:
            delay = sum(fb.waiting_tokens_at_most(int(typical)) for fb in fresh) / load.prefill_rate_tps
        self._delays.add(now_s, delay)
        delay_mean = self._delays.mean(now_s) or 0.0

        # demand: each tier's rate forecast over the start-up time
        self._record_rates(now_s, arrivals)
        h = cfg.startup_s
        demand = forecast = 0.0
        growth: dict[str, float] = {}
        trends: dict[str, float] = {}
        for name, a in arrivals.tiers.items():
            trends[name] = slope = self.trend_rps_per_s(name)
            rate_f = a.rate_rps + max(0.0, slope) * h
            growth[name] = rate_f / a.rate_rps if a.rate_rps > 0 else 1.0
            demand += a.rate_rps * a.mean_prompt_tokens
            forecast += rate_f * a.mean_prompt_tokens

        # capacity: the measured batch time and the cluster's decodes (grown with the forecast)
        model_cfg = self._admission.rate_model.config
        batch_times = [fb.mean_batch_time_s for fb in fresh if fb.mean_batch_time_s]
        b = statistics.median(batch_times) if batch_times else model_cfg.default_batch_time_s
        decodes: dict[str, float] = {}
        for fb in fresh:
            for t, d in fb.running_decodes_by_tier.items():
                decodes[t] = decodes.get(t, 0.0) + d
        unseen = n_run / len(fresh) if fresh and n_run > len(fresh) else 1.0
        decodes_f = {t: d * unseen * growth.get(t, 1.0) for t, d in decodes.items()}

        def capacity(n: int) -> float:
            return self.replica_capacity_tps(n, b, decodes_f)

        # rule 1: the replicas the forecast needs
        u = cfg.target_utilization
        need_forecast = next((n for n in range(1, cfg.max_replicas + 1) if forecast <= n * capacity(n) * u), None)
        if need_forecast is None:  # beyond max_replicas: an upper bound (c(n) grows with n), for the clamp
            need_forecast = max(cfg.max_replicas + 1, math.ceil(forecast / (capacity(cfg.max_replicas) * u)))

        # rule 2: a strict tier would miss
        trigger_s = self.delay_trigger_fraction * self.ttft_target_s
        urgent = None
        if load.at_risk:
            urgent = "at_risk"
        elif delay_mean > trigger_s:
            urgent = "queue_delay"
        cooldown = cfg.upscale_cooldown_s
        arriving = (n_start > 0 or now_s - self._last_up_s < cooldown or now_s - self._last_ready_s < cooldown)
        need_urgent = n_run + 1 if urgent and not arriving else 0

        details: dict[str, Any] = {
            "running": n_run, "starting": n_start, "fresh_feedback": len(fresh),
            "demand_tps": demand, "forecast_tps": forecast, "horizon_s": h, "trend_rps_per_s": trends,
            "batch_time_s": b, "replica_capacity_tps": capacity(max(1, n_run)),
            "cluster_prefill_rate_tps": load.prefill_rate_tps,
            "utilization": forecast / (max(1, n_run) * capacity(max(1, n_run))),
            "need_forecast": need_forecast, "need_urgent": need_urgent, "urgent": urgent,
            "capacity_arriving": arriving, "queue_delay_s": delay, "queue_delay_mean_s": delay_mean,
            "delay_trigger_s": trigger_s, "at_risk": dict(load.at_risk), "kv_usage": load.kv_usage,
            "kv_usage_peak": kv_peak,
        }

        need = max(need_forecast, need_urgent)
        target, reason = total, "hold"
        if need > total:
            if now_s - self._last_up_s < cooldown and need <= self._last_up_need:
                reason = "upscale_cooldown"
                msg = (f"{need} replicas needed, as at the last scale-up {now_s - self._last_up_s:.0f} s ago: the "
                       f"rest waits for the {cooldown:g} s cooldown")
            else:
                target = total + min(need - total, cfg.max_step_up)
                reason = urgent if need_urgent >= need_forecast else "forecast"
                msg = self._up_message(reason, need, forecast, capacity(need), load, delay_mean, trigger_s)
        else:
            blocked = self._down_blocked(now_s, n_run, n_start, len(fresh), load, delay, delay_mean, forecast,
                                         capacity, kv_peak)
            details["scale_down_blocked"] = blocked
            if not blocked:
                target, reason = n_run - 1, "scale_down"
                msg = (f"{n_run - 1} replicas hold the forecast {forecast:.0f} prefill tokens/s at "
                       f"{forecast / ((n_run - 1) * capacity(n_run - 1)):.0%} of their capacity "
                       f"(<= {cfg.scale_down_utilization:.0%}) with every tier healthy")
            else:
                msg = f"holding {total} replicas ({', '.join(blocked)} keeps the count)"

        details["rule"] = reason
        clamped = min(max(target, cfg.min_replicas), cfg.max_replicas)
        if clamped != target:
            bound = "min_replicas" if clamped > target else "max_replicas"
            msg = f"{msg}; clamped to {bound} = {clamped}"
            target, reason = clamped, bound
        if target > total:
            self._last_up_s, self._last_up_need = now_s, max(need, target)
        elif target < total:
            self._last_down_s = now_s
        return ScalingDecision(target, reason, msg, details)

    def _record_kv(self, now_s: float, kv_usage: float) -> float:
        """Record the mean KV use now; its highest over the last ``downscale_cooldown_s``."""
        window = self.config.downscale_cooldown_s
        kv = self._kv
        while kv and kv[-1][1] <= kv_usage:  # a monotone queue: the maximum is at the front
            kv.pop()
        kv.append((now_s, kv_usage))
        while kv[0][0] < now_s - window:
            kv.popleft()
        return kv[0][1]

    def _down_blocked(self, now_s: float, n_run: int, n_start: int, n_fresh: int, load: ClusterLoad, delay: float,
                      delay_mean: float, forecast: float, capacity: Callable[[int], float],
                      kv_peak: float) -> list[str]:
        """Why rule 3 may not remove a replica now (empty: it may)."""
        cfg = self.config
        adm = self._admission.config
        blocked = []
        if n_run <= cfg.min_replicas:
            blocked.append("min_replicas")
        if n_start:
            blocked.append("starting")
        if load.at_risk:
            blocked.append("at_risk")
        if max(delay, delay_mean) > cfg.scale_down_delay_fraction * self.ttft_target_s:
            blocked.append("queue_delay")
        if n_fresh < n_run:
            blocked.append("stale_feedback")
        last_event = max(self._first_s if self._first_s is not None else now_s, self._last_up_s, self._last_down_s,
                         self._last_ready_s)
        if now_s - last_event < cfg.downscale_cooldown_s:
            blocked.append("downscale_cooldown")
        if n_run >= 2:
            if forecast > (n_run - 1) * capacity(n_run - 1) * cfg.scale_down_utilization:
                blocked.append("headroom")
            if kv_peak * n_run / (n_run - 1) > cfg.target_utilization * adm.kv_limit:
                blocked.append("kv_headroom")
        return blocked

    def _up_message(self, reason: str, need: int, forecast: float, cap: float, load: ClusterLoad, delay_mean: float,
                    trigger_s: float) -> str:
        if reason == "forecast":
            return (f"the forecast {forecast:.0f} prefill tokens/s in {self.config.startup_s:g} s needs {need} replicas "
                    f"({cap:.0f} tokens/s each at {self.config.target_utilization:.0%})")
        if reason == "at_risk":
            what = ", ".join(f"{t} ({why})" for t, why in load.at_risk.items())
            return f"tier at risk: {what}: one replica more"
        return (f"mean predicted queueing delay {delay_mean:.2f} s over {trigger_s:.2f} s "
                f"({self.delay_trigger_fraction:g} of the {self.ttft_target_s:g} s TTFT target): one replica more")
