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
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class ClusterRun(ReplicaRun):
    router: str = ""
    requests_per_replica: list[int] = field(default_factory=list)
    replica_ids: list[str] = field(default_factory=list)
    replica_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per request


def _routing_context(config: ClusterConfig, workload: Workload, k: int) -> RoutingContext:
    """What router k knows of the deployment: the tiers' SLOs and a seed of its own."""
    return RoutingContext(tier_tbt_slo_s={t.name: t.tbt_slo_s for t in workload.tiers.tiers},
                          seed=config.seed * 1000 + k)


class _Replica:
    def __init__(self, index: int, rid: str, engine: SimEngine, tracker: SLOTracker) -> None:
        self.index = index
        self.rid = rid
        self.engine = engine
        self.tracker = tracker
        self.busy = False  # an iteration is in flight (its finish event is queued)
        self.num_requests = 0


# event kinds, in the order they run when simultaneous: an iteration that ends at t frees its
# replica before the snapshot at t and before requests arriving at t are routed
_FINISH, _DELIVER, _TAKE, _ARRIVE, _PLAN = range(5)


def run_cluster(workload: Workload, config: ClusterConfig,
                profiles: dict[str, CostProfile] | None = None) -> ClusterRun:
    """Run every request of `workload` to completion through the cluster."""
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
    for i in range(config.num_replicas):
        pname = config.profile_of(i)
        if pname not in profiles:
            profiles[pname] = load_profile(pname)
        tracker = SLOTracker(slos, targets)

        def on_tokens(emitted: list[Request], t: float, tracker: SLOTracker = tracker) -> None:
            tracker.on_tokens(emitted, t)  # before the engine updates last_token_s
            log.on_tokens(emitted, t)

        policy = make_policy(config.scheduler_of(i), engine=EngineLimits(tile_tokens=profiles[pname].tile_tokens))
        engine = SimEngine(policy, profiles[pname], num_kv_blocks=config.kv_blocks, on_tokens=on_tokens,
                           on_finish=None, prefix_caching=prefix_caching)
        replicas.append(_Replica(i, f"replica-{i:03d}", engine, tracker))
    ids = [r.rid for r in replicas]
    by_id = {r.rid: r for r in replicas}

    routers = [make_router_policy(config.router, _routing_context(config, workload, k), **config.router_options)
               for k in range(config.num_routers)]
    ledgers = [InFlightLedger(clock=lambda: now) for _ in routers]
    feedback: dict[str, ReplicaFeedback | None] = dict.fromkeys(ids)  # as delivered (all routers)
    placed: dict[int, str] = {}  # request index -> replica id, while unfinished

    def on_finish(r: Request) -> None:
        k = int(r.req_id)
        rid = placed.pop(k, None)
        if rid is not None and config.use_ledger:
            ledgers[origin[k]].on_done(rid, r.req_id)

    for rep in replicas:
        rep.engine.on_finish = on_finish

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
        elif kind == _TAKE:
            rep = payload
            st = rep.engine.state
            st.now_s = now
            mean_b = rep.engine.policy.mean_batch_time_s
            snap = rep.tracker.snapshot(rep.rid, st, mean_b, now=now, timestamp_s=now)
            push(now + config.feedback_delay_s, _DELIVER, (rep.rid, snap))
            if arrived < n or any(x.busy for x in replicas):
                push(now + config.feedback_period_s, _TAKE, rep)
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
        replica_ids=ids,
        replica_of=replica_of,
        **prefix_counts(engines),
    )
