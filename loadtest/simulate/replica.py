"""One replica in virtual time: replay a workload through a policy and a cost profile."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import numpy as np

from loadtest.arrivals import poisson_arrival_times
from replica.tiers import TierMix
from replica.traces import Trace, sample_requests
from replica.policy.base import SchedulingPolicy
from replica.policy.state import Request
from replica.cost.model import CostModel
from replica.sim.engine import PAPER_KV_BLOCKS, SimEngine


@dataclass(frozen=True)
class Workload:
    """Requests of one run: arrival times, token counts and tiers (index into `tiers`)."""

    arrival_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    tier_idx: np.ndarray
    tiers: TierMix
    qps: float

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def build(cls, trace: Trace, num_requests: int, qps: float, tiers: TierMix, seed: int = 42) -> "Workload":
        """The paper's setup: requests drawn from the trace (shuffle seed), Poisson arrivals with
        capped gaps, tiers drawn at random with their shares."""
        prompt_lens, output_lens = sample_requests(trace, num_requests, seed=seed)
        return cls(
            arrival_s=poisson_arrival_times(num_requests, qps, seed=seed),
            prompt_lens=np.asarray(prompt_lens, dtype=np.int64),
            output_lens=np.asarray(output_lens, dtype=np.int64),
            tier_idx=tiers.assign(num_requests, seed=seed),
            tiers=tiers,
            qps=qps,
        )


@dataclass
class ReplicaRun:
    """Raw outcome of one run; `loadtest.metrics` turns it into the paper's statistics."""

    scheduler: str
    workload: Workload
    ttft_s: np.ndarray  # per request (arrival to first token)
    finish_s: np.ndarray  # per request (last token)
    tbt_miss_frac: np.ndarray  # per request: share of its gaps above its tier's TBT SLO
    tbt_s: dict[str, np.ndarray] = field(default_factory=dict)  # every gap, per tier (values)
    tbt_weight: dict[str, np.ndarray] = field(default_factory=dict)  # how many gaps each value is
    waiting_at_last_arrival: int = 0
    unfinished: int = 0
    num_iterations: int = 0
    num_preemptions: int = 0
    busy_s: float = 0.0
    makespan_s: float = 0.0
    wall_s: float = 0.0


class TokenLog:
    """Every request's TBT gaps and SLO misses, from the engine's token callbacks (request ids
    are indices into the workload).  Gaps shared by many requests in a fast-forwarded decode
    stretch are stored once with a weight."""

    def __init__(self, workload: Workload) -> None:
        names = [t.name for t in workload.tiers.tiers]
        self.workload = workload
        self.gaps: dict[str, array] = {k: array("d") for k in names}
        self.rep_gaps: dict[str, array] = {k: array("d") for k in names}
        self.rep_weights: dict[str, array] = {k: array("d") for k in names}
        self.misses = np.zeros(len(workload), dtype=np.int64)

    def on_tokens(self, emitted: list[Request], t: float) -> None:
        gaps, misses = self.gaps, self.misses
        for r in emitted:
            last = r.last_token_s
            if last is not None:
                gap = t - last
                gaps[r.tier].append(gap)
                if gap > r.tbt_slo_s:
                    misses[int(r.req_id)] += 1

    def on_repeated_tokens(self, reqs: list[Request], ends: list[float]) -> None:
        self.on_tokens(reqs, ends[0])
        if len(ends) < 2:
            return
        common = np.diff(ends)
        per_tier: dict[str, int] = {}
        for r in reqs:
            per_tier[r.tier] = per_tier.get(r.tier, 0) + 1
        for tier, count in per_tier.items():
            self.rep_gaps[tier].extend(common.tolist())
            self.rep_weights[tier].extend([float(count)] * len(common))
        slo_misses = {slo: int((common > slo).sum()) for slo in {r.tbt_slo_s for r in reqs}}
        if any(slo_misses.values()):
            for r in reqs:
                self.misses[int(r.req_id)] += slo_misses[r.tbt_slo_s]

    def tbt_s(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([np.frombuffer(self.gaps[k]), np.frombuffer(self.rep_gaps[k])]) for k in self.gaps}

    def tbt_weight(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([np.ones(len(self.gaps[k])), np.frombuffer(self.rep_weights[k])])
                for k in self.gaps}

    def tbt_miss_frac(self) -> np.ndarray:
        return self.misses / np.maximum(self.workload.output_lens - 1, 1)


def make_requests(workload: Workload) -> list[Request]:
    """The workload's requests as engine requests (ids: their index)."""
    tiers = workload.tiers.tiers
    return [
        Request(
            req_id=str(i),
            prompt_len=int(workload.prompt_lens[i]),
            arrival_s=float(workload.arrival_s[i]),
            tier=tiers[t].name,
            tbt_slo_s=tiers[t].tbt_slo_s,
            tier_rank=tiers[t].rank,
            ttft_target_s=tiers[t].ttft_target_s,
            max_output_tokens=int(workload.output_lens[i]),
        )
        for i, t in enumerate(workload.tier_idx)
    ]


def request_outcomes(reqs: list[Request], log: "TokenLog") -> dict:
    """The per-request fields of a run (`ReplicaRun`) from its finished requests and token log."""
    return {
        "ttft_s": np.array([(r.first_token_s - r.arrival_s) if r.first_token_s is not None else np.inf for r in reqs]),
        "finish_s": np.array([r.last_token_s if r.is_finished else np.inf for r in reqs]),
        "tbt_miss_frac": log.tbt_miss_frac(),
        "tbt_s": log.tbt_s(),
        "tbt_weight": log.tbt_weight(),
        "unfinished": sum(1 for r in reqs if not r.is_finished),
    }


def run_replica(
    workload: Workload,
    policy: SchedulingPolicy,
    cost: CostModel,
    num_kv_blocks: int = PAPER_KV_BLOCKS,
    fast_forward: bool = True,
) -> ReplicaRun:
    """Run every request to completion (no time limit: runs drain). `fast_forward=False` makes
    the engine step decode stretches one iteration at a time (same results, slower)."""
    t0 = time.perf_counter()
    n = len(workload)
    reqs = make_requests(workload)
    log = TokenLog(workload)
    engine = SimEngine(
        policy, cost, num_kv_blocks=num_kv_blocks, on_tokens=log.on_tokens,
        on_repeated_tokens=log.on_repeated_tokens if fast_forward else None,
    )
    arrival = workload.arrival_s.tolist()
    i = 0
    now = 0.0
    waiting_at_last_arrival = 0
    while i < n or engine.has_work:
        if i < n and arrival[i] <= now:
            while i < n and arrival[i] <= now:
                engine.add_request(reqs[i])
                i += 1
            if i == n:
                waiting_at_last_arrival = len(engine.state.waiting)
        stepped = engine.step(now, until_s=arrival[i] if i < n else np.inf)
        if stepped is not None:
            now = stepped[1]
        elif i < n:
            now = max(now, arrival[i])
        else:
            break

    return ReplicaRun(
        scheduler=policy.name,
        workload=workload,
        **request_outcomes(reqs, log),
        waiting_at_last_arrival=waiting_at_last_arrival,
        num_iterations=engine.num_iterations,
        num_preemptions=engine.num_preemptions,
        busy_s=engine.busy_s,
        makespan_s=now,
        wall_s=time.perf_counter() - t0,
    )
