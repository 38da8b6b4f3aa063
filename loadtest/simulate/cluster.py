"""A cluster in virtual time: N replicas, M routers, feedback snapshots every P seconds delivered
D seconds late, each router's in-flight ledger, the same trace / arrival / tier machinery as the
one-replica benchmark.

Mechanisms, as in the Serve app:

* replica i is a `SimEngine` running its own policy object (any scheduler) with its own cost
  profile (mixed profiles allowed) and an `SLOTracker`; an iteration is planned when the replica
  becomes free (`plan` + `begin`: admissions and KV at the start) and finishes `cost` seconds
  later (`finish`: progress and tokens at the end), so a snapshot taken mid-iteration sees the
  batch running, as vLLM's scheduler would;
* every replica's snapshot (`SLOTracker.snapshot`, the dict `record_routing_stats()` returns) is
  taken every `feedback_period_s`, at a per-replica phase drawn from the seed (Serve polls
  replicas independently), and reaches every router `feedback_delay_s` later;
* request k goes to router k mod M (a load balancer in front of M ingresses); the router's
  policy (`router.policies`, the objects the Ray adapter uses) ranks the replicas from its
  views (`router.feedback.build_views`: latest delivered snapshot + its ledger) and the request
  joins the first one's queue at once (no network time).  The router records it in its ledger
  (unless `use_ledger` is off), drops ledger entries older than a delivered snapshot, and drops
  a request's entry when it finishes (Serve's `on_request_completed`).

Differences from the live system, kept on purpose: no network or ingress time; no
`max_ongoing_requests` back-pressure; decode stretches are not fast-forwarded (replicas interact
through routing, so every iteration is simulated).

`run_cluster(workload, config)` returns a `ClusterRun` with the fields `loadtest.metrics.summarize`
reads (the whole cluster as one run) plus per-replica request counts.

Autoscaling (``run_cluster(..., scaler=S)``; without one the replica count is fixed and nothing
below runs).  ``config.num_replicas`` replicas serve from time 0; every ``S.period_s`` the
scaler gets a `ScalingView` (the latest delivered snapshot of each routable replica, the
arrivals per tier over ``S.arrival_window_s``: offered load, counted as requests arrive; the
ongoing requests of each routable replica; the counts) and returns a `ScaleStep` with the target
count (running + starting).  The cluster applies it:

* more: new replicas are requested now and serve (are routable, take snapshots) from now +
  ``S.startup_s``; they count as GPU time from the request;
* fewer: starting replicas are cancelled first (newest first), then running replicas are
  drained, the least loaded first (fewest ongoing requests; ties: the newest): a draining
  replica leaves the routers' view at once (no new request reaches it), finishes every request
  it holds (nothing is cut or moved), and is gone when it holds none.  At least one replica
  stays routable.

`ClusterRun.replica_spans` holds each replica's requested / ready / drained / gone times
(GPU-hours: `gpu_hours`), `scale_events` every applied change with the scaler's reason.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from loadtest.simulate.replica import ReplicaRun, TokenLog, Workload, make_requests, prefix_counts, request_outcomes
from replica.cost.profile import DEFAULT_COST_PROFILE, CostProfile, load_profile
from replica.policy.registry import DEFAULT_SCHEDULER, EngineLimits, make_policy
from replica.policy.state import Request
from replica.sim.engine import PAPER_KV_BLOCKS, SimEngine
from replica.slo import SLOTracker
from router.feedback import ReplicaFeedback, build_views
from router.ledger import InFlightLedger
from router.policies.base import RoutingContext, RoutingRequest
from router.policies.registry import make_router_policy


class ClusterConfig(BaseModel):
    """One cluster: replicas (scheduler and cost profile each: a name, or a list cycled over the
    replicas), routers (policy, count, options) and the feedback channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(gt=0)
    schedulers: tuple[str, ...] = (DEFAULT_SCHEDULER,)
    profiles: tuple[str, ...] = (DEFAULT_COST_PROFILE,)
    kv_blocks: int = Field(PAPER_KV_BLOCKS, gt=0)
    router: str = "slo"
    router_options: dict[str, Any] = Field(default_factory=dict)
    num_routers: int = Field(1, gt=0)
    feedback_period_s: float = Field(1.0, gt=0)
    feedback_delay_s: float = Field(0.0, ge=0)
    use_ledger: bool = True
    seed: int = 0
    prefix_caching: bool | None = None  # the engines' prefix cache (None: when the workload has prefix hashes)

    @field_validator("schedulers", "profiles", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("schedulers", "profiles")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one")
        return v

    def scheduler_of(self, i: int) -> str:
        return self.schedulers[i % len(self.schedulers)]

    def profile_of(self, i: int) -> str:
        return self.profiles[i % len(self.profiles)]


@dataclass(frozen=True)
class ReplicaSpan:
    """One replica's life in virtual seconds: requested (GPU time starts), ready (routable),
    drained (left the routers' view; None: never), gone (GPU time ends; None: at the run's end;
    a cancelled starting replica is gone with no ready time)."""

    replica_id: str
    requested_s: float
    ready_s: float | None
    drained_s: float | None
    gone_s: float | None


@dataclass(frozen=True)
class ScaleEvent:
    """One applied change of the target count (running + starting)."""

    time_s: float
    from_replicas: int
    to_replicas: int
    reason: str
    message: str = ""


@dataclass(frozen=True)
class ScaleStep:
    """A scaler's answer: the replicas the cluster should have (running + starting)."""

    target: int
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class ScalingView:
    """What a scaler sees at ``now_s``.  ``feedback``: the latest delivered snapshot of each
    routable replica that has one; ``ongoing``: requests held (running + queued) by each routable
    replica; ``arrival_rates_rps`` / ``mean_prompt_tokens``: per tier, over the last
    ``arrival_window_s`` (or since the start, if shorter); ``running`` / ``starting``: replica
    counts (routable; requested and not yet ready)."""

    now_s: float
    running: int
    starting: int
    feedback: tuple[ReplicaFeedback, ...]
    ongoing: dict[str, int]
    arrival_rates_rps: dict[str, float]
    mean_prompt_tokens: dict[str, float]


class Scaler(Protocol):
    period_s: float  # decisions this often (virtual s)
    startup_s: float  # a requested replica serves this long after the request
    arrival_window_s: float  # the arrival rates of the view are over this long

    def decide(self, view: ScalingView) -> ScaleStep: ...


def gpu_hours(spans: Sequence[ReplicaSpan], end_s: float) -> float:
    """Replica-hours from each replica's request until it is gone (or ``end_s``)."""
    return sum(max(0.0, min(end_s, s.gone_s if s.gone_s is not None else end_s) - s.requested_s)
               for s in spans) / 3600.0


@dataclass
class ClusterRun(ReplicaRun):
    router: str = ""
    requests_per_replica: list[int] = field(default_factory=list)
    replica_ids: list[str] = field(default_factory=list)
    replica_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per request
    replica_spans: list[ReplicaSpan] = field(default_factory=list)
    scale_events: list[ScaleEvent] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return gpu_hours(self.replica_spans, self.makespan_s)


def _routing_context(config: ClusterConfig, workload: Workload, k: int) -> RoutingContext:
    """What router k knows of the deployment: the tiers' SLOs and a seed of its own."""
    return RoutingContext(tier_tbt_slo_s={t.name: t.tbt_slo_s for t in workload.tiers.tiers},
                          seed=config.seed * 1000 + k)


_STARTING, _RUNNING, _DRAINING, _GONE = range(4)


class _Replica:
    def __init__(self, index: int, rid: str, engine: SimEngine, tracker: SLOTracker, requested_s: float = 0.0,
                 state: int = _RUNNING) -> None:
        self.index = index
        self.rid = rid
        self.engine = engine
        self.tracker = tracker
        self.busy = False  # an iteration is in flight (its finish event is queued)
        self.num_requests = 0
        self.state = state
        self.requested_s = requested_s
        self.ready_s: float | None = requested_s if state == _RUNNING else None
        self.drained_s: float | None = None
        self.gone_s: float | None = None

    @property
    def in_flight(self) -> int:
        """Requests placed here and not finished (queued or running in its engine)."""
        st = self.engine.state
        return len(st.waiting) + len(st.running)

    def span(self) -> ReplicaSpan:
        return ReplicaSpan(self.rid, self.requested_s, self.ready_s, self.drained_s, self.gone_s)


# event kinds, in the order they run when simultaneous: an iteration that ends at t frees its
# replica before the snapshot at t and before requests arriving at t are routed; a replica that
# becomes ready at t is routable for them; a scaling decision at t sees them all
_FINISH, _DELIVER, _TAKE, _READY, _ARRIVE, _PLAN, _SCALE = range(7)


def run_cluster(workload: Workload, config: ClusterConfig,
                profiles: dict[str, CostProfile] | None = None, scaler: Scaler | None = None) -> ClusterRun:
    """Run every request of `workload` to completion through the cluster (``scaler``: autoscale
    it, the module docstring; None: ``config.num_replicas`` replicas throughout)."""
    t0 = time.perf_counter()
    profiles = dict(profiles or {})
    tiers = workload.tiers.tiers
    slos = {t.name: t.tbt_slo_s for t in tiers}
    targets = {t.name: t.ttft_target_s for t in tiers}
    log = TokenLog(workload)
    reqs = make_requests(workload)
    n = len(reqs)
    origin: list[int] = [0] * n  # router of each request
    replica_of = np.full(n, -1, dtype=np.int64)
    prefix_caching = config.prefix_caching
    if prefix_caching is None:
        prefix_caching = workload.prefix_hashes is not None
    prefix_hashes = workload.prefix_hashes
    hash_block_tokens = workload.hash_block_tokens

    replicas: list[_Replica] = []
    by_id: dict[str, _Replica] = {}
    routers = [make_router_policy(config.router, _routing_context(config, workload, k), **config.router_options)
               for k in range(config.num_routers)]
    ledgers = [InFlightLedger(clock=lambda: now) for _ in routers]
    placed: dict[int, str] = {}  # request index -> replica id, while unfinished

    def on_finish(r: Request) -> None:
        k = int(r.req_id)
        rid = placed.pop(k, None)
        if rid is not None and config.use_ledger:
            ledgers[origin[k]].on_done(rid, r.req_id)

    def new_replica(i: int, requested_s: float = 0.0, state: int = _RUNNING) -> _Replica:
        pname = config.profile_of(i)
        if pname not in profiles:
            profiles[pname] = load_profile(pname)
        tracker = SLOTracker(slos, targets)

        def on_tokens(emitted: list[Request], t: float, tracker: SLOTracker = tracker) -> None:
            tracker.on_tokens(emitted, t)  # before the engine updates last_token_s
            log.on_tokens(emitted, t)

        policy = make_policy(config.scheduler_of(i), engine=EngineLimits(tile_tokens=profiles[pname].tile_tokens))
        engine = SimEngine(policy, profiles[pname], num_kv_blocks=config.kv_blocks, on_tokens=on_tokens,
                           on_finish=on_finish, prefix_caching=prefix_caching)
        rep = _Replica(i, f"replica-{i:03d}", engine, tracker, requested_s, state)
        replicas.append(rep)
        by_id[rep.rid] = rep
        return rep

    for i in range(config.num_replicas):
        new_replica(i)
    ids = [r.rid for r in replicas]  # the routable replicas
    feedback: dict[str, ReplicaFeedback | None] = dict.fromkeys(ids)  # as delivered (all routers)

    events: list[tuple[float, int, int, Any]] = []
    seq = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, kind, seq, payload))

    rng = random.Random(config.seed)
    for rep in replicas:
        push(rng.uniform(0.0, config.feedback_period_s), _TAKE, rep)
    arrival = workload.arrival_s.tolist()
    for k in range(n):
        push(arrival[k], _ARRIVE, k)

    now = 0.0
    arrived = 0
    waiting_at_last_arrival = 0
    scale_events: list[ScaleEvent] = []
    recent: deque[tuple[float, str, int]] = deque()  # (time, tier, prompt tokens) of recent arrivals
    recent_count: dict[str, int] = {t.name: 0 for t in tiers}  # their sums per tier
    recent_tokens: dict[str, int] = {t.name: 0 for t in tiers}
    starting: list[_Replica] = []  # requested and not ready yet, oldest first
    if scaler is not None:
        if not (scaler.period_s > 0 and scaler.startup_s >= 0 and scaler.arrival_window_s > 0):
            raise ValueError("a scaler needs period_s > 0, startup_s >= 0 and arrival_window_s > 0")
        push(scaler.period_s, _SCALE, None)

    def retire_if_idle(rep: _Replica) -> None:
        if rep.state == _DRAINING and not rep.busy and not rep.engine.has_work:
            rep.state = _GONE
            rep.gone_s = now

    def view() -> ScalingView:
        window = scaler.arrival_window_s
        while recent and recent[0][0] < now - window:
            _, tier, plen = recent.popleft()
            recent_count[tier] -= 1
            recent_tokens[tier] -= plen
        span_s = max(min(window, now), scaler.period_s)
        return ScalingView(
            now_s=now, running=len(ids), starting=len(starting),
            feedback=tuple(fb for rid in ids if (fb := feedback.get(rid)) is not None),
            ongoing={rid: by_id[rid].in_flight for rid in ids},
            arrival_rates_rps={t: c / span_s for t, c in recent_count.items()},
            mean_prompt_tokens={t: (recent_tokens[t] / c if c else 0.0) for t, c in recent_count.items()})

    def apply(step: ScaleStep) -> None:
        total = len(ids) + len(starting)
        target = max(1, int(step.target))
        if target == total:
            return
        if target > total:
            for _ in range(target - total):
                rep = new_replica(len(replicas), now, _STARTING)
                starting.append(rep)
                feedback[rep.rid] = None
                push(now + scaler.startup_s, _READY, rep)
        else:
            excess = total - target
            while excess and starting:  # cancel the newest starting replicas first
                rep = starting.pop()
                rep.state, rep.gone_s = _GONE, now
                excess -= 1
            live = sorted((by_id[rid] for rid in ids), key=lambda x: (x.in_flight, -x.index))
            for rep in live[:min(excess, len(live) - 1)]:
                rep.state, rep.drained_s = _DRAINING, now
                ids.remove(rep.rid)
                retire_if_idle(rep)
        after = len(ids) + len(starting)
        if after != total:
            scale_events.append(ScaleEvent(now, total, after, step.reason, step.message))

    while events:
        now, kind, _, payload = heapq.heappop(events)
        if kind == _ARRIVE:
            k = payload
            r = reqs[k]
            router_k = k % config.num_routers
            origin[k] = router_k
            ledger = ledgers[router_k]
            rreq = RoutingRequest(request_id=r.req_id, tier=r.tier, tbt_slo_s=r.tbt_slo_s,
                                  tier_rank=r.tier_rank, prompt_len=r.prompt_len,
                                  prefix_hashes=prefix_hashes[k] if prefix_hashes is not None else (),
                                  prefix_block_tokens=hash_block_tokens if prefix_hashes is not None else 0)
            views = build_views(ids, feedback, ledger if config.use_ledger else None, now)
            router = routers[router_k]
            rid = router.rank(rreq, views)[0]
            router.on_routed(rreq, rid)
            rep = by_id[rid]
            rep.engine.add_request(r)
            rep.num_requests += 1
            replica_of[k] = rep.index
            placed[k] = rid
            if config.use_ledger:
                ledger.record(rid, rreq)
            if scaler is not None:
                recent.append((now, r.tier, r.prompt_len))
                recent_count[r.tier] += 1
                recent_tokens[r.tier] += r.prompt_len
            arrived += 1
            if arrived == n:
                waiting_at_last_arrival = sum(len(x.engine.state.waiting) for x in replicas)
            if not rep.busy:
                rep.busy = True
                push(now, _PLAN, rep)
        elif kind == _FINISH:
            rep, plan, start = payload
            rep.engine.finish(plan, start, now)
            push(now, _PLAN, rep)  # after the requests arriving at this very time
        elif kind == _PLAN:
            rep = payload
            if rep.engine.has_work:
                plan = rep.engine.plan(now)
                if plan.is_empty:  # nothing schedulable now: wait for an arrival or a finish
                    rep.busy = False
                    continue
                push(now + rep.engine.begin(plan), _FINISH, (rep, plan, now))
            else:
                rep.busy = False
                if rep.state == _DRAINING:
                    retire_if_idle(rep)
        elif kind == _TAKE:
            rep = payload
            if rep.state == _GONE:
                continue
            st = rep.engine.state
            st.now_s = now
            mean_b = rep.engine.policy.mean_batch_time_s
            snap = rep.tracker.snapshot(rep.rid, st, mean_b, now=now, timestamp_s=now)
            push(now + config.feedback_delay_s, _DELIVER, (rep.rid, snap))
            if arrived < n or any(x.busy for x in replicas):
                push(now + config.feedback_period_s, _TAKE, rep)
        elif kind == _READY:
            rep = payload
            if rep.state == _STARTING:  # not cancelled meanwhile
                starting.remove(rep)
                rep.state, rep.ready_s = _RUNNING, now
                ids.append(rep.rid)
                push(now + rng.uniform(0.0, config.feedback_period_s), _TAKE, rep)
        elif kind == _SCALE:
            apply(scaler.decide(view()))
            push(now + scaler.period_s, _SCALE, None)
        else:  # _DELIVER
            rid, snap = payload
            fb = ReplicaFeedback.from_snapshot(snap)
            feedback[rid] = fb
            if config.use_ledger:
                for ledger in ledgers:
                    ledger.on_snapshot(rid, fb.timestamp_s)
        if arrived == n and not placed:
            break  # every request finished (snapshots may still be queued)
    makespan = now

    engines = [x.engine for x in replicas]
    return ClusterRun(
        scheduler="+".join(dict.fromkeys(config.schedulers)),
        workload=workload,
        **request_outcomes(reqs, log),
        waiting_at_last_arrival=waiting_at_last_arrival,
        num_iterations=sum(e.num_iterations for e in engines),
        num_preemptions=sum(e.num_preemptions for e in engines),
        busy_s=sum(e.busy_s for e in engines),
        makespan_s=makespan,
        wall_s=time.perf_counter() - t0,
        router=config.router,
        requests_per_replica=[x.num_requests for x in replicas],
        replica_ids=[x.rid for x in replicas],
        replica_of=replica_of,
        replica_spans=[x.span() for x in replicas],
        scale_events=scale_events,
        **prefix_counts(engines),
    )
