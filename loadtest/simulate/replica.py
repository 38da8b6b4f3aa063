"""One replica in virtual time: replay a workload through a policy and a cost profile."""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, lt, sub

import numpy as np
from mypy_extensions import mypyc_attr

from loadtest.arrivals import poisson_arrival_times
from replica.tiers import TierMix
from replica.traces import Trace, engine_block_hashes, sample_requests
from replica.policy.base import SchedulingPolicy
from replica.policy.state import Request
from replica.cost.model import CostModel
from replica.sim.engine import PAPER_KV_BLOCKS, PlanCallback, SimEngine


ARRIVALS = ("poisson", "replay")
_tier = attrgetter("tier")
_tbt_slo = attrgetter("tbt_slo_s")


@dataclass(frozen=True)
class Workload:
    """Requests of one run: arrival times, token counts and tiers (index into `tiers`); for a
    prefix trace also each prompt's prefix block hashes (`Trace.prefix_hashes`, blocks of
    `hash_block_tokens` tokens)."""

    arrival_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    tier_idx: np.ndarray
    tiers: TierMix
    qps: float
    prefix_hashes: tuple[tuple[int, ...], ...] | None = None
    hash_block_tokens: int = 0

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def build(cls, trace: Trace, num_requests: int, qps: float, tiers: TierMix, seed: int = 42,
              arrivals: str = "poisson", arrival_s: np.ndarray | None = None) -> "Workload":
        """The paper's setup: requests drawn from the trace (shuffle seed), Poisson arrivals with
        capped gaps, tiers drawn at random with their shares.

        A prefix trace (`Trace.has_prefixes`) keeps its order instead (its first `num_requests`
        requests: a shuffle would put a conversation's later turns before its first); its arrivals
        are re-drawn at `qps` (``arrivals="poisson"``) or replayed from its timestamps, scaled so
        that the mean rate is `qps` (``"replay"``: the recorded burstiness, at another load).

        `arrival_s` gives the arrival times instead (`num_requests` of them, non-decreasing, from
        0: a diurnal curve's, or a recording's at its own pace); `qps` is then recorded as given."""
        if arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
        if arrival_s is not None:
            if arrivals != "poisson":
                raise ValueError(f"give arrival times or arrivals={arrivals!r}, not both")
            arrival_s = np.asarray(arrival_s, dtype=np.float64)
            if arrival_s.shape != (num_requests,) or (num_requests and (arrival_s[0] < 0 or np.any(np.diff(arrival_s) < 0))):
                raise ValueError(f"arrival_s must be {num_requests} non-decreasing times from 0")
        if trace.has_prefixes:
            if num_requests > len(trace):
                raise ValueError(f"{trace.source} has {len(trace)} requests, {num_requests} asked for "
                                 "(a prefix trace is replayed in order, once)")
            idx = np.arange(num_requests)
            prompt_lens, output_lens = trace.prompt_lens[idx], trace.output_lens[idx]
            prefix = trace.prefix_hashes[:num_requests]  # type: ignore[index]
        else:
            if arrivals == "replay":
                raise ValueError(f"{trace.source} has no timestamps to replay")
            prompt_lens, output_lens = sample_requests(trace, num_requests, seed=seed)
            prefix = None
        if arrivals == "replay":
            if trace.arrival_s is None:
                raise ValueError(f"{trace.source} has no timestamps to replay")
            recorded = trace.arrival_s[:num_requests]
            span = float(recorded[-1] - recorded[0]) if num_requests > 1 else 0.0
            scale = ((num_requests - 1) / qps) / span if span > 0 else 1.0
            arrival_s = (recorded - recorded[0]) * scale
        elif arrival_s is None:
            arrival_s = poisson_arrival_times(num_requests, qps, seed=seed)
        return cls(
            arrival_s=arrival_s,
            prompt_lens=np.asarray(prompt_lens, dtype=np.int64),
            output_lens=np.asarray(output_lens, dtype=np.int64),
            tier_idx=tiers.assign(num_requests, seed=seed),
            tiers=tiers,
            qps=qps,
            prefix_hashes=prefix,
            hash_block_tokens=trace.hash_block_tokens if prefix is not None else 0,
        )


@mypyc_attr(allow_interpreted_subclasses=True)  # loadtest.simulate.cluster.ClusterRun
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
    prefix_lookup_tokens: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_hit_tokens: int = 0  # of those, tokens found cached (not computed)


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
        self.misses = [0] * len(workload)  # per request (a list: cheaper to count into than an array)
        self._append_gap = {k: a.append for k, a in self.gaps.items()}

    def on_tokens(self, emitted: list[Request], t: float) -> None:
        append_gap = self._append_gap
        misses = self.misses
        for r in emitted:
            last = r.last_token_s
            if last is not None:
                gap = t - last
                append_gap[r.tier](gap)
                if gap > r.tbt_slo_s:
                    misses[int(r.req_id)] += 1

    def on_repeated_tokens(self, reqs: list[Request], ends: list[float]) -> None:
        self.on_tokens(reqs, ends[0])
        if len(ends) < 2:
            return
        common = list(map(sub, ends[1:], ends))  # np.diff's floats, without numpy's overhead
        for tier, count in Counter(map(_tier, reqs)).items():
            self.rep_gaps[tier].extend(common)
            self.rep_weights[tier].extend([float(count)] * len(common))
        # per TBT SLO, how many of the common gaps exceed it (slo < gap; none if the longest does not)
        longest = max(common)
        missed = {slo: n for slo in set(map(_tbt_slo, reqs))
                  if slo < longest and (n := sum(map(lt, repeat(slo), common)))}
        if missed:
            misses = self.misses
            for r in reqs:
                misses[int(r.req_id)] += missed.get(r.tbt_slo_s, 0)

    def tbt_s(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([np.frombuffer(self.gaps[k]), np.frombuffer(self.rep_gaps[k])]) for k in self.gaps}

    def tbt_weight(self) -> dict[str, np.ndarray]:
        out = {}
        for k, gaps in self.gaps.items():
            out[k] = w = np.empty(len(gaps) + len(self.rep_weights[k]))
            w[: len(gaps)] = 1.0
            w[len(gaps) :] = np.frombuffer(self.rep_weights[k])
        return out

    def tbt_miss_frac(self) -> np.ndarray:
        return np.array(self.misses, dtype=np.int64) / np.maximum(self.workload.output_lens - 1, 1)


def make_requests(workload: Workload, block_size: int = 16) -> list[Request]:
    """The workload's requests as engine requests (ids: their index), with their prompts' block
    hashes in the engine's `block_size` for a prefix trace (`replica.traces.engine_block_hashes`)."""
    tiers = workload.tiers.tiers
    ph = workload.prefix_hashes
    reqs = [
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
    if ph is not None:
        for r, hashes in zip(reqs, ph):
            r.block_hashes = engine_block_hashes(hashes, workload.hash_block_tokens, r.prompt_len, block_size)
    return reqs


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
    prefix_caching: bool | None = None,
    on_plan: PlanCallback | None = None,
) -> ReplicaRun:
    """Run every request to completion (no time limit: runs drain). `fast_forward=False` makes
    the engine step decode stretches one iteration at a time (same results, slower).
    `prefix_caching` (default: when the workload has prefix hashes) gives the engine vLLM's
    prefix cache; `on_plan` sees each plan before it runs (`SimEngine`)."""
    t0 = time.perf_counter()
    n = len(workload)
    reqs = make_requests(workload)
    log = TokenLog(workload)
    if prefix_caching is None:
        prefix_caching = workload.prefix_hashes is not None
    engine = SimEngine(
        policy, cost, num_kv_blocks=num_kv_blocks, on_tokens=log.on_tokens,
        on_repeated_tokens=log.on_repeated_tokens if fast_forward else None, prefix_caching=prefix_caching,
        on_plan=on_plan,
    )
    arrival = workload.arrival_s.tolist()
    i = 0
    now = 0.0
    next_arrival_s = arrival[0] if n else math.inf  # arrival[i], inf once all arrived
    waiting_at_last_arrival = 0
    step = engine.step
    while i < n or engine.has_work:
        if next_arrival_s <= now:
            while i < n and arrival[i] <= now:
                engine.add_request(reqs[i])
                i += 1
            next_arrival_s = arrival[i] if i < n else math.inf
            if i == n:
                waiting_at_last_arrival = len(engine.state.waiting)
        stepped = step(now, next_arrival_s)
        if stepped is not None:
            now = stepped[1]
        elif i < n:
            now = max(now, next_arrival_s)
        else:
            break

    counts = prefix_counts([engine])
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
        prefix_lookup_tokens=counts["prefix_lookup_tokens"],
        prefix_hit_tokens=counts["prefix_hit_tokens"],
    )


def prefix_counts(engines: list[SimEngine]) -> dict[str, int]:
    """`ReplicaRun.prefix_lookup_tokens` / `prefix_hit_tokens` summed over engines."""
    pools = [e.pool for e in engines if e.pool is not None]
    return {"prefix_lookup_tokens": sum(p.num_lookup_tokens for p in pools),
            "prefix_hit_tokens": sum(p.num_hit_tokens for p in pools)}
