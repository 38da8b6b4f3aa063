"""Tier-aware admission control at the ingress (pure: no Ray, no vLLM).

When the cluster cannot hold the strict tier's SLOs, the ingress sheds the tier that is first in
``shed_order`` with a 429 and a Retry-After, then the next ones at harder bounds; the last tier in
shed order (the strictest, by default) is refused only at the ingress's hard in-flight bound.
Every queue stays bounded, and nothing is dropped silently.

Inputs.  The latest feedback snapshot of every replica (`router.feedback.ReplicaFeedback`, the
dict each replica's ``record_routing_stats()`` returns; the ingress polls all of them, see
`serve_app.ingress`), what this ingress has in flight (`InFlight`: per-tier counts, and the prompt
tokens of admitted requests that have no first token yet), optionally the recent history of the
snapshots' TBT-miss counters (`TBTHistory`), and the request's tier.

The cluster's state (`AdmissionPolicy.assess` -> `ClusterLoad`):

* prefill rate R = sum over the replicas with fresh feedback of the rate the SLO router predicts
  for each (`router.policies.slo.SLOPolicy.prefill_rate_tps`: the token budget less the decodes'
  share of a batch, over the mean batch time); a replica without fresh feedback counts at the
  median rate of the others (the router's default rate when none has feedback);
* waiting work W = the snapshots' waiting prefill tokens + the prompt tokens of this ingress's
  requests that were admitted after the oldest fresh snapshot was taken and have no first token
  yet (work the snapshots cannot show; both times are wall clocks, so clock skew between hosts
  only shifts which requests count here);
* predicted queueing delay for a new prefill D = W / R (the time to drain the prefill queue),
  and its recent mean D_w: the mean of D over the admission decisions of the last
  ``delay_window_s`` (`DelayHistory`; arrival-weighted, so it is the delay arrivals met);
* strict-tier health, per tier: at risk ("tbt") when its TBT misses over the last
  ``tbt_window_s`` (snapshot counter deltas, once at least 1 / (1 - tbt_quantile) tokens were
  seen) exceed a fraction 1 - ``tbt_quantile``, or, without such a history, when a replica's
  measured P99 TBT of the tier exceeds its SLO; and "kv" when the replicas' mean KV use is at
  least ``kv_limit``.

The rule, for a request of the tier at position k in the shed sequence (0 = shed first) of n:

1. in flight: refused when this ingress has ``floor(B * (k+1) / n)`` requests (all tiers) in
   flight, B being this ingress's share of ``max_in_flight`` (below; B = ``max_in_flight`` with
   one ingress replica) (trunk reservation: later tiers keep the rest; the last tier alone may
   reach B, the hard bound);
   Fair share inside the tier: from ``fair_share_reserve`` short of that bound on, a key is
   admitted only while it holds fewer of the tier's requests than the bound over the other keys
   in flight plus two (itself and the next key to come): a heavy key is stopped first, even alone,
   and its neighbours keep the reserve;
2. for k < n-1 only, queue: refused when D > h_k(f) * T_k (a typical new request of a protected
   tier would miss its target now) or D_w > h_k(g) * T_k (queueing has held that share of the
   target for a window: sustained overload), with T_k the tightest TTFT target of the tiers shed
   after it, h_k(x) = x * (1 + k / (n-1)) (3 tiers: x, 1.5x), f = ``instant_delay_factor`` (default 2: D is the
   first-come-first-served wait, and under shortest-prompt-first a median-length request waits
   behind about half of it at most) and g = ``sustained_delay_factor`` (default 0.5).  The
   instant bound alone would let sustained overload hold the queue at the target (premium's long
   prompts then wait behind every shorter arrival); the sustained bound alone would miss the
   start of an overload; Poisson bursts at moderate load pass both (see
   `serve_app.config.AdmissionConfig` and docs/BENCHMARKS.md section 8);
3. for k = 0 only, health: refused when a tier shed after it is at risk ("tbt" or "kv").  The
   health signals say that the strict tier is hurting, not by how much, so they shed the first
   tier only; the graded delay bounds and the in-flight bounds escalate to the next ones.

A refused request gets Retry-After = ceil(D) seconds (the predicted drain time), clamped to
[``min_retry_after_s``, ``max_retry_after_s``].  With ``enabled: false`` every request is admitted
(Serve's queue bounds still apply).

Several ingress replicas (``ingress.num_replicas`` > 1, or autoscaling).  Each ingress replica
decides alone, on what it has in flight and on the replicas' snapshots (which every ingress
polls), so a cluster-wide bound is shared, not counted: with k ingress replicas running each
enforces its share `ingress_share` = ceil(bound / k) of ``max_in_flight`` (and `serve_app.ratelimit`
the same share of every per-key limit).  k is the configured count (``ingress.num_replicas``) until
a busy ingress has counted the running ingress replicas (`AdmissionPolicy.set_ingress_replicas`,
every ``ingress.count_period_s``).  What that leaves, for k ingresses:

* the ingresses admit at most k * ceil(bound / k) < bound + k requests together: the bound holds
  up to rounding;
* the proxy spreads requests by the ingresses' queue lengths, not by tier or key, so the shares
  are full together only under even load: a tier is refused at its bound on one ingress while
  another has room, i.e. it may be refused with as few as ceil(bound / k) * (position + 1) / n
  requests in flight in the cluster when all of them reached the same ingress (under balanced
  load, within a few requests of the single-ingress bound); the fair share between a tier's keys
  is among the keys at the same ingress;
* the queue estimate D counts the snapshots' waiting work and this ingress's own unreported
  prompts: the prompts the other k - 1 ingresses admitted since the last snapshot are missing
  for up to one feedback period (they show in the next snapshot), so D is low by about k - 1
  times one ingress's admissions of one period; the recent mean D_w is over this ingress's own
  decisions (the same arrivals, 1/k of them); the health signals are the same on every ingress;
* while the count is stale (up to ``ingress.count_period_s`` after Serve starts or stops an
  ingress replica; a new replica starts from the configured count) the shares are those of the
  old count: after a scale-up the ingresses admit up to k_new / k_old of the bound, after a
  scale-down only k_new / k_old of it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from router.feedback import ReplicaFeedback
from router.policies import RoutingContext
from router.policies.slo import SLOPolicy
from serve_app.config import AdmissionConfig, AppConfig, ServingTier

__all__ = [
    "AdmissionPolicy",
    "ClusterLoad",
    "Decision",
    "DelayHistory",
    "InFlight",
    "TBTHistory",
    "TierRule",
    "default_feedback_period_s",
    "default_max_in_flight",
    "ingress_share",
]



# ---------------------------------------------------------------------------------- derived defaults

def default_max_in_flight(app: AppConfig) -> int:
    """The bound on requests in flight at all the ingress replicas together: the replicas' total
    ``max_ongoing_requests`` at the most replicas (autoscaling's ``max_replicas``; more would wait
    at the handles), at most what the ingresses take at once (``http.max_ongoing_requests`` each,
    times the most ingress replicas)."""
    if app.admission.max_in_flight is not None:
        return app.admission.max_in_flight
    return max(1, min(app.replicas.max_count * app.replicas.max_ongoing_requests,
                      app.http.max_ongoing_requests * app.ingress.max_count))


def ingress_share(bound: int, ingress_replicas: int) -> int:
    """One ingress replica's share of a cluster-wide ``bound`` when ``ingress_replicas`` share it:
    ceil(bound / ingress_replicas), at least 1 (rounded up, so that a small bound never locks
    anyone out; together the ingresses may then exceed it by less than ``ingress_replicas``)."""
    if ingress_replicas < 1:
        raise ValueError(f"ingress_replicas must be >= 1, got {ingress_replicas}")
    return max(1, -(-int(bound) // int(ingress_replicas)))


def default_feedback_period_s(app: AppConfig) -> float:
    """Half the tightest TTFT target: the queue estimate is refreshed twice within the delay it
    controls (between polls the ingress adds what it admitted itself).  Shorter periods cost the
    replicas a snapshot each (quantiles over their SLO window: a few ms on a busy replica)."""
    if app.admission.feedback_period_s is not None:
        return app.admission.feedback_period_s
    return min(t.ttft_target_s for t in app.tiers) / 2


def default_feedback_timeout_s(app: AppConfig) -> float:
    if app.admission.feedback_timeout_s is not None:
        return app.admission.feedback_timeout_s
    return max(1.0, 4 * default_feedback_period_s(app))


def replica_max_queued_requests(app: AppConfig) -> int:
    v = app.admission.replica_max_queued_requests
    return app.replicas.max_ongoing_requests if v is None else v


def ingress_max_queued_requests(app: AppConfig) -> int:
    v = app.admission.ingress_max_queued_requests
    return app.http.max_ongoing_requests if v is None else v


# ------------------------------------------------------------------------------------------- inputs

@dataclass
class _Entry:
    tier: str
    prompt_len: int
    admitted_s: float
    key_id: str | None = None
    prefilled: bool = False


class InFlight:
    """What this ingress has in flight: admitted requests not finished yet, per tier and per key,
    and the prompt tokens of those without a first token (admission time on the wall clock,
    comparable with the snapshots' ``timestamp_s``).  A request counts from the moment it is
    admitted, before its body is read (``prompt_len`` 0 until `set_prompt_len`)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._counts: dict[str, int] = {}
        self._key_counts: dict[tuple[str, str], int] = {}  # (tier, key id) -> in flight
        self._tier_keys: dict[str, int] = {}  # tier -> keys with a request in flight

    def add(self, request_id: str, tier: str, prompt_len: int = 0, now_s: float | None = None,
            key_id: str | None = None) -> None:
        if request_id in self._entries:
            return
        self._entries[request_id] = _Entry(tier, int(prompt_len), time.time() if now_s is None else now_s, key_id)
        self._counts[tier] = self._counts.get(tier, 0) + 1
        if key_id is not None:
            n = self._key_counts.get((tier, key_id), 0)
            self._key_counts[(tier, key_id)] = n + 1
            if n == 0:
                self._tier_keys[tier] = self._tier_keys.get(tier, 0) + 1

    def set_prompt_len(self, request_id: str, prompt_len: int) -> None:
        """The prompt of an admitted request is tokenized: its length now counts as unreported work."""
        e = self._entries.get(request_id)
        if e is not None:
            e.prompt_len = int(prompt_len)

    def key_count(self, tier: str, key_id: str) -> int:
        """Requests of key ``key_id`` (in ``tier``) in flight."""
        return self._key_counts.get((tier, key_id), 0)

    def num_keys(self, tier: str) -> int:
        """Keys with a request of ``tier`` in flight."""
        return self._tier_keys.get(tier, 0)

    def first_token(self, request_id: str) -> None:
        e = self._entries.get(request_id)
        if e is not None:
            e.prefilled = True

    def done(self, request_id: str) -> None:
        """The request finished (any way); idempotent."""
        e = self._entries.pop(request_id, None)
        if e is not None:
            self._counts[e.tier] -= 1
            if e.key_id is not None:
                k = (e.tier, e.key_id)
                self._key_counts[k] -= 1
                if not self._key_counts[k]:
                    del self._key_counts[k]
                    self._tier_keys[e.tier] -= 1

    def count(self, tier: str | None = None) -> int:
        """In flight in ``tier`` (all tiers when None)."""
        return len(self._entries) if tier is None else self._counts.get(tier, 0)

    @property
    def counts(self) -> dict[str, int]:
        return {t: n for t, n in self._counts.items() if n}

    def unreported_prefill_tokens(self, since_s: float | None) -> int:
        """Prompt tokens of requests admitted after ``since_s`` with no first token yet (all
        requests without a first token when ``since_s`` is None)."""
        return sum(e.prompt_len for e in self._entries.values()
                   if not e.prefilled and (since_s is None or e.admitted_s > since_s))

    def __len__(self) -> int:
        return len(self._entries)


class TBTHistory:
    """The snapshots' cumulative per-tier counters (``tbt_misses_total``, ``tokens_total``) over
    the last ``window_s``, per replica: the recent TBT miss fraction is their delta over the
    window, summed over the replicas (a replica whose counters went down restarted: its history
    starts again)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = float(window_s)
        self._series: dict[str, deque[tuple[float, dict[str, tuple[int, int]]]]] = {}

    def add(self, feedback: Iterable[ReplicaFeedback]) -> None:
        for fb in feedback:
            counters = {name: (t.tbt_misses_total, t.tokens_total) for name, t in fb.tiers.items()}
            series = self._series.setdefault(fb.replica_id, deque())
            if series:
                last_ts, last = series[-1]
                if fb.timestamp_s <= last_ts:
                    continue
                if any(c[1] < last.get(n, (0, 0))[1] or c[0] < last.get(n, (0, 0))[0] for n, c in counters.items()):
                    series.clear()  # counters went back: a new replica process
            series.append((fb.timestamp_s, counters))
            # keep one sample at or before the window's start, so the delta spans the window
            horizon = fb.timestamp_s - self.window_s
            while len(series) >= 2 and series[1][0] <= horizon:
                series.popleft()

    def forget(self, keep: Iterable[str]) -> None:
        """Drop replicas not in ``keep``."""
        keep = set(keep)
        for rid in [r for r in self._series if r not in keep]:
            del self._series[rid]

    def misses(self, tier: str, replica_ids: Iterable[str] | None = None) -> tuple[int, int]:
        """(TBT misses, tokens) of ``tier`` over the window, summed over the replicas."""
        ids = self._series.keys() if replica_ids is None else [r for r in replica_ids if r in self._series]
        misses = tokens = 0
        for rid in ids:
            series = self._series[rid]
            if len(series) < 2:
                continue
            first, last = series[0][1].get(tier, (0, 0)), series[-1][1].get(tier, (0, 0))
            misses += max(0, last[0] - first[0])
            tokens += max(0, last[1] - first[1])
        return misses, tokens


class DelayHistory:
    """The predicted queueing delays of the admission decisions of the last ``window_s``: their
    mean is the delay recent arrivals met (arrival-weighted)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def add(self, now_s: float, delay_s: float) -> None:
        self._samples.append((now_s, delay_s))
        self._sum += delay_s
        self._expire(now_s)

    def _expire(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._sum -= self._samples.popleft()[1]

    def mean(self, now_s: float) -> float | None:
        """Mean delay over the window (None when empty)."""
        self._expire(now_s)
        if not self._samples:
            return None
        return max(0.0, self._sum / len(self._samples))

    def mean_with(self, now_s: float, delay_s: float) -> float:
        """The mean as it would be with ``delay_s`` added now (nothing is stored)."""
        self._expire(now_s)
        return max(0.0, (self._sum + delay_s) / (len(self._samples) + 1))

    def __len__(self) -> int:
        return len(self._samples)


# ------------------------------------------------------------------------------------------ outputs

@dataclass(frozen=True)
class TierRule:
    """A tier's admission bounds."""

    name: str
    position: int  # in the shed sequence (0 = shed first)
    protects: tuple[str, ...]  # tiers shed after it
    delay_bound_s: float | None  # refuse when the predicted queueing delay exceeds it (None: never)
    sustained_delay_bound_s: float | None  # refuse when its recent mean exceeds it (None: never)
    in_flight_bound: int  # refuse at this many requests in flight at this ingress (all tiers; its share)
    sheds_on_health: bool  # refuse when a protected tier is at risk
    fair_share_from: int = 0  # from this many in flight, only keys below their fair share are admitted


@dataclass(frozen=True)
class ClusterLoad:
    """The cluster as admission sees it (see the module docstring)."""

    replicas: int  # with fresh feedback
    waiting_tokens: float  # from the snapshots
    unreported_tokens: float  # admitted here since the oldest fresh snapshot, no first token yet
    prefill_rate_tps: float
    queue_delay_s: float  # (waiting + unreported) / prefill rate
    queue_delay_mean_s: float | None = None  # its mean over the recent decisions (with this one)
    kv_usage: float = 0.0  # mean over the replicas with fresh feedback (0 without any)
    at_risk: Mapping[str, str] = field(default_factory=dict)  # tier -> "tbt" | "kv"
    in_flight: int = 0  # this ingress, all tiers


@dataclass(frozen=True)
class Decision:
    admit: bool
    tier: str
    reason: str | None = None  # "in_flight" | "fair_share" | "queue" | "tbt" | "kv" when refused
    retry_after_s: int | None = None
    message: str = ""
    queue_delay_s: float = 0.0


# ------------------------------------------------------------------------------------------- policy

class AdmissionPolicy:
    """The rule of the module docstring over ``tiers`` (each with ``shed_order`` and
    ``ttft_target_s``, as `serve_app.config.AppConfig` resolves them).  ``max_in_flight``: the
    bound of all the ingress replicas together; ``ingress_replicas``: how many share it (this
    ingress enforces `ingress_share` of it; `set_ingress_replicas` when the count changes)."""

    def __init__(self, tiers: Sequence[ServingTier], config: AdmissionConfig | None = None, *,
                 max_in_flight: int, token_budget: int | None = None,
                 feedback_period_s: float = 0.25, feedback_timeout_s: float = 1.0, ingress_replicas: int = 1) -> None:
        if not tiers:
            raise ValueError("admission needs at least one tier")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.config = config or AdmissionConfig()
        self.max_in_flight = int(max_in_flight)
        self.feedback_period_s = float(feedback_period_s)
        self.feedback_timeout_s = float(feedback_timeout_s)
        ordered = sorted(tiers, key=lambda t: (t.shed_order if t.shed_order is not None else -(t.rank or 0)))
        self._ordered = ordered
        self.tiers = {t.name: t for t in ordered}
        self.shed_sequence = [t.name for t in ordered]
        self.set_ingress_replicas(ingress_replicas)
        # the prefill-rate model of the slo router, built as a router builds it
        context = RoutingContext(tier_tbt_slo_s={t.name: t.tbt_slo_s for t in ordered}, token_budget=token_budget)
        self._rates = SLOPolicy(**SLOPolicy.context_options(context))

    @classmethod
    def from_app_config(cls, app: AppConfig) -> AdmissionPolicy:
        """The policy of ``app``'s config, for one of ``ingress.num_replicas`` ingress replicas."""
        return cls(app.tiers, app.admission, max_in_flight=default_max_in_flight(app), token_budget=app.token_budget,
                   feedback_period_s=default_feedback_period_s(app),
                   feedback_timeout_s=default_feedback_timeout_s(app), ingress_replicas=app.ingress.num_replicas)

    def set_ingress_replicas(self, ingress_replicas: int) -> None:
        """``ingress_replicas`` share ``max_in_flight`` now: this ingress's bounds become its share
        (`ingress_share`)."""
        self.ingress_replicas = int(ingress_replicas)
        self.ingress_max_in_flight = ingress_share(self.max_in_flight, self.ingress_replicas)
        self.rules = self._rules(self._ordered)

    def _rules(self, ordered: Sequence[ServingTier]) -> dict[str, TierRule]:
        n = len(ordered)
        f, g = self.config.instant_delay_factor, self.config.sustained_delay_factor
        rules = {}
        for k, t in enumerate(ordered):
            later = ordered[k + 1:]
            delay = sustained = None
            if later:
                target = min(p.ttft_target_s for p in later)
                grade = 1 + k / (n - 1)  # later tiers at larger bounds: 3 tiers x1, x1.5
                delay = f * grade * target
                sustained = g * grade * target
            rules[t.name] = TierRule(
                name=t.name, position=k, protects=tuple(p.name for p in later), delay_bound_s=delay,
                sustained_delay_bound_s=sustained,
                in_flight_bound=(bound := max(1, math.floor(self.ingress_max_in_flight * (k + 1) / n))),
                sheds_on_health=k == 0 and bool(later),
                fair_share_from=bound - math.ceil(self.config.fair_share_reserve * bound))
        return rules

    @property
    def window_s(self) -> float:
        return self.config.tbt_window_s

    @property
    def rate_model(self) -> SLOPolicy:
        """The SLO router's prefill-rate model this policy prices the replicas with
        (`SLOPolicy.prefill_rate_tps`, `SLOPolicy.decode_tokens_per_batch`; its ``config`` holds the
        token budget, the prefill floor and the default batch time): read it, never route with it
        (`serve_app.autoscaling_policy` sizes the cluster with the same model)."""
        return self._rates

    # --- the cluster's state -------------------------------------------------------------------
    def fresh(self, feedback: Iterable[ReplicaFeedback], now_s: float) -> list[ReplicaFeedback]:
        """The snapshots no older than ``max_feedback_age_s``."""
        max_age = self.config.max_feedback_age_s
        return [fb for fb in feedback if now_s - fb.timestamp_s <= max_age]

    def assess(self, feedback: Iterable[ReplicaFeedback], in_flight: InFlight | None = None, *,
               now_s: float | None = None, history: TBTHistory | None = None,
               delays: DelayHistory | None = None, num_replicas: int | None = None,
               record_delay: bool = True) -> ClusterLoad:
        """The cluster's load from the latest snapshots (stale ones ignored), what this ingress
        has in flight, and (optionally) the TBT counters' history and the recent predicted delays
        (their mean with this one; ``record_delay``: this one is added to them, else the caller
        adds it once the request is known to be dispatched, so that requests refused later, e.g.
        as invalid, do not count).  ``num_replicas``: how many replicas there are, if known
        (those without fresh feedback count at the median rate)."""
        now_s = time.time() if now_s is None else now_s
        fbs = self.fresh(feedback, now_s)
        rates = [self._rates.prefill_rate_tps(fb) for fb in fbs]
        n_missing = max(0, (num_replicas or 0) - len(fbs))
        if rates:
            default = statistics.median(rates)
        else:
            default = self._rates.config.token_budget / self._rates.config.default_batch_time_s
            n_missing = max(n_missing, 1)
        rate = sum(rates) + n_missing * default
        waiting = float(sum(fb.waiting_prefill_tokens for fb in fbs))
        since = min((fb.timestamp_s for fb in fbs), default=None)
        unreported = float(in_flight.unreported_prefill_tokens(since)) if in_flight is not None else 0.0
        delay = (waiting + unreported) / rate
        delay_mean = None
        if delays is not None:
            if record_delay:
                delays.add(now_s, delay)
                delay_mean = delays.mean(now_s)
            else:
                delay_mean = delays.mean_with(now_s, delay)
        kv = statistics.fmean(fb.kv_usage for fb in fbs) if fbs else 0.0
        at_risk: dict[str, str] = {}
        for name, tier in self.tiers.items():
            if self._tbt_at_risk(name, tier.tbt_slo_s, fbs, history):
                at_risk[name] = "tbt"
            elif fbs and kv >= self.config.kv_limit:
                at_risk[name] = "kv"
        return ClusterLoad(replicas=len(fbs), waiting_tokens=waiting, unreported_tokens=unreported,
                           prefill_rate_tps=rate, queue_delay_s=delay, queue_delay_mean_s=delay_mean,
                           kv_usage=kv, at_risk=at_risk,
                           in_flight=len(in_flight) if in_flight is not None else 0)

    def _tbt_at_risk(self, tier: str, slo: float, fbs: Sequence[ReplicaFeedback],
                     history: TBTHistory | None) -> bool:
        allowed = 1.0 - self.config.tbt_quantile
        if history is not None:
            misses, tokens = history.misses(tier, [fb.replica_id for fb in fbs])
            if tokens >= 1.0 / allowed:
                return misses > allowed * tokens
        # no (or too short a) history: the snapshots' own window quantile
        for fb in fbs:
            t = fb.tier(tier)
            if t is not None and t.tbt_p99_s is not None and t.tbt_p99_s > slo:
                return True
        return False

    # --- the decision --------------------------------------------------------------------------
    def retry_after_s(self, load: ClusterLoad, jitter: float = 0.0) -> int:
        """When a refused client may come back: the predicted drain time D, at least
        ``min_retry_after_s``, spread by ``jitter`` in [0, 1) over [D, 1.5 D] so that the clients
        shed together do not all come back in the same second; at most ``max_retry_after_s``."""
        cfg = self.config
        base = max(float(cfg.min_retry_after_s), load.queue_delay_s) * (1.0 + 0.5 * jitter)
        return int(min(cfg.max_retry_after_s, max(cfg.min_retry_after_s, math.ceil(base))))

    @staticmethod
    def fair_share(rule: TierRule, key_in_flight: int, keys_in_flight: int) -> float:
        """A key's fair share of its tier's bound once the tier is within its reserve: the bound
        over the other keys in flight plus two (this key, and the next key to arrive: the reserve
        is kept for it, so a key alone in its tier cannot fill it either)."""
        others = keys_in_flight - (1 if key_in_flight else 0)
        return rule.in_flight_bound / (others + 2)

    def decide(self, tier: str, load: ClusterLoad, in_flight: int | None = None, *,
               key_share: tuple[int, int] | None = None, jitter: float = 0.0) -> Decision:
        """Admit a request of ``tier`` or shed it.  ``in_flight``: requests in flight at this
        ingress, all tiers (default: ``load.in_flight``); ``key_share``: (the requesting key's
        requests of this tier in flight, the keys with a request of this tier in flight), for the
        fair share (`fair_share`); ``jitter``: spreads Retry-After (`retry_after_s`)."""
        rule = self.rules.get(tier)
        if rule is None:
            raise KeyError(f"unknown tier {tier!r}; tiers are {', '.join(self.shed_sequence)}")
        if not self.config.enabled:
            return Decision(True, tier, queue_delay_s=load.queue_delay_s)
        n = load.in_flight if in_flight is None else in_flight
        reason, why = None, ""
        if n >= rule.in_flight_bound:
            reason = "in_flight"
            why = f"{n} requests in flight at the ingress (bound for this tier: {rule.in_flight_bound})"
            if self.ingress_replicas > 1:
                why += (f", this ingress's share of {self.max_in_flight} over {self.ingress_replicas} "
                        "ingress replicas")
        elif key_share is not None and n >= rule.fair_share_from \
                and key_share[0] >= (fair := self.fair_share(rule, *key_share)):
            reason = "fair_share"
            why = (f"the {tier} tier is nearly full ({n} of {rule.in_flight_bound} in flight) and this API key "
                   f"holds {key_share[0]} of its requests, at or over its fair share ({fair:.1f})")
        elif rule.delay_bound_s is not None and load.queue_delay_s > rule.delay_bound_s:
            reason = "queue"
            why = (f"predicted queueing delay {load.queue_delay_s:.2f} s over this tier's bound "
                   f"{rule.delay_bound_s:.2f} s")
        elif (rule.sustained_delay_bound_s is not None and load.queue_delay_mean_s is not None
              and load.queue_delay_mean_s > rule.sustained_delay_bound_s):
            reason = "queue"
            why = (f"predicted queueing delay {load.queue_delay_mean_s:.2f} s on average over the last "
                   f"{self.config.delay_window_s:g} s, over this tier's sustained bound "
                   f"{rule.sustained_delay_bound_s:.2f} s")
        elif rule.sheds_on_health:
            hurt = [(p, load.at_risk[p]) for p in rule.protects if p in load.at_risk]
            if hurt:
                reason = hurt[0][1]
                what = "time between tokens over its SLO" if reason == "tbt" else f"KV cache use {load.kv_usage:.0%}"
                why = f"tier {hurt[0][0]} at risk ({what})"
        if reason is None:
            return Decision(True, tier, queue_delay_s=load.queue_delay_s)
        retry = self.retry_after_s(load, jitter)
        msg = (f"The server is overloaded and sheds the {tier} tier: {why}. Retry after {retry} s.")
        return Decision(False, tier, reason=reason, retry_after_s=retry, message=msg,
                        queue_delay_s=load.queue_delay_s)

    def admit(self, tier: str, feedback: Iterable[ReplicaFeedback], in_flight: InFlight | None = None, *,
              now_s: float | None = None, history: TBTHistory | None = None,
              delays: DelayHistory | None = None, num_replicas: int | None = None, key_id: str | None = None,
              record_delay: bool = True, jitter: float = 0.0) -> Decision:
        """`assess` then `decide` (with ``key_id``'s fair share from ``in_flight``)."""
        load = self.assess(feedback, in_flight, now_s=now_s, history=history, delays=delays,
                           num_replicas=num_replicas, record_delay=record_delay)
        share = None
        if key_id is not None and in_flight is not None:
            share = (in_flight.key_count(tier, key_id), in_flight.num_keys(tier))
        return self.decide(tier, load, key_share=share, jitter=jitter)
