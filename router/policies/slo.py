"""SLO-aware routing (ours): predicted TTFT under each replica's SLAI order, with TBT feasibility.

Rule: for each replica, predict this request's TTFT there and whether its tier's TBT SLO is at
risk; rank the feasible replicas by predicted TTFT (plus a small risk penalty for strict tiers),
then the infeasible ones by predicted TTFT (so with none feasible the least TTFT comes first).

The model, per replica with feedback (snapshot + this router's ledger entries sent since):

* tokens ahead = waiting prefill tokens of prompts no longer than this one (SLAI admits shortest
  prompt first; estimated from the snapshot's prompt-length histogram, see
  `PromptHistogram.tokens_at_most`) + every ledger prompt (recently sent: likely already a
  started prefill, which SLAI runs before new arrivals) + this prompt;
* prefill rate (tokens/s) = prefill tokens per batch / mean batch time b, where prefill tokens
  per batch = token_budget (default 512) - decode tokens per batch, floored at
  min_prefill_share * token_budget. Under SLAI a decode runs once it is critical, about once per
  (SLO - theta*b): a decode of a tier with known SLO costs min(1, b / (SLO - theta*b)) tokens per
  batch, a decode of a tier missing from `tier_tbt_slo_s` costs 1 (conservative);
* predicted TTFT = tokens ahead / prefill rate (queueing + prefill; not the network or sampling).

Feasibility for the request's tier (infeasible if any holds):
* the replica's measured p99 TBT of this tier exceeds the request's TBT SLO;
* its mean batch time is at least the SLO (no decode can keep that pace);
* strict tiers only (tier_rank <= strict_max_rank): KV use >= kv_limit (0.96, where SLAI's
  dynamic offset switches and preemptions start), or decodes of tiers at least as strict
  (snapshot + ledger) >= max_strict_decodes.
Strict-tier risk in [0, 1] = max(KV use / kv_limit, p99 TBT / SLO, mean batch time / SLO,
competing strict decodes / max_strict_decodes); cost = predicted TTFT + risk_weight_s * risk.

A replica without feedback yet (or with feedback older than max_feedback_age_s, if set) counts
as empty but for its ledger entries, at the median prefill rate of the replicas with a measured
batch time (token_budget / default_batch_time_s if none), and feasible: so such replicas rank by
ledger load.  A replica whose snapshot has no measured batch time yet (it has run no batch: just
started, or never picked) is judged by its snapshot (queue, feasibility, risk) at that same median
rate: pricing it at default_batch_time_s instead made a fast cluster's new replica look slower than
its measured peers forever, so it was never picked and never measured.
Ties: fewer ledger entries, then replica id.

A replica whose snapshot is older than ``stale_feedback_s`` (if set) has stopped answering the
controller's polls (it may hang without dying): it is infeasible (reason "stale"), ranked after
every replica that answers, so requests go elsewhere while it is silent.  The Serve app sets it to
5 feedback periods (`RoutingContext.stale_feedback_s`); the cluster simulator leaves it off.

Prefix affinity (``prefix_affinity``, on by default).  A replica's engine caches the KV blocks of
the prompts it served; the prompt tokens it already holds cost no prefill.  The policy learns where
prefixes are from its own decisions (`on_routed` records the request's block hashes in a bounded
`router.prefix_index.PrefixIndex`) and, per replica, credits cached = matched leading blocks *
prefix_block_tokens, capped at prompt_len - 1 (vLLM always computes the last prompt token):

    tokens ahead = queue ahead + ledger prompts + (prompt_len - cached).

Hot-prefix guard.  Greedy TTFT minimisation alone sends a prefix's requests to its holder while
the holder's queue is behind the least-loaded replica's by less than the prefill the hit saves.
Two things make that gap a bad bet at its limit: the index is a guess (the replica may have
evicted the blocks: other routers, other traffic), and a hot prefix stays on one replica, which
then runs behind the others, instead of being copied to a second replica (one recompute) that
would serve the rest without the gap.  Blocks every replica holds (a shared system prompt) favour
none and are credited to all; the guard acts on the advantage beyond them,
S_r = (cached_r - cached_common) / prefill rate_r (seconds), which r keeps only while

    queued_r - queued_min <= prefix_guard_share * S_r        (seconds)

where queued_x is the work queued ahead of this request on x (tokens ahead but this prompt, over
its prefill rate) and queued_min is the least over the feasible replicas (over all if none is).
Otherwise r gets the common credit only (`ReplicaEstimate.prefix_guarded`).  Why this form: if
the guess is wrong, routing for the prefix costs this request at most the gap (it recomputes the
prompt behind a longer queue), and if right it gains S - gap; with gap <= f * S the expected gain
p * S - gap is positive whenever the hit probability p exceeds f.  f = 0.5 (the default) asks
the index to be right more often than not, and caps a hot replica's lead over the least-loaded one
at half of one request's saving; past that the request goes to a less loaded replica, which then
holds the prefix too (the hot prefix is copied instead of herded).  f = 1 is plain TTFT
minimisation; f = 0 gives affinity only among equally loaded replicas.  The bound is relative to
each request's saving, so it means the same for a 2k-token chat turn and a 100k-token document,
at any load; it is not tuned to a workload.  (The ledger counts a routed prompt's full length
until the next snapshot, so a holder's backlog is, if anything, overstated: one more brake.)

Speed: per replica, what a snapshot implies (prefill rate, the waiting-prompt histogram as prefix
sums, per tier the snapshot's feasibility and risk) is computed once per snapshot and kept until
the replica's next snapshot, so a decision costs a few operations per replica plus one sort; the
prefix index answers with the common blocks and the few replicas holding more
(`PrefixIndex.match_common`), so only those few need the guard.  `loadtest.router_decision_time`
measures it.
"""

from __future__ import annotations

import statistics
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from replica.policy.config import DEFAULT_TOKEN_BUDGET
from router.feedback import ReplicaFeedback, ReplicaView, usable_feedback
from router.policies.base import RoutingContext, RoutingPolicy, RoutingRequest
from router.prefix_index import PrefixIndex


class SLOPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token_budget: int = Field(DEFAULT_TOKEN_BUDGET, gt=0, description="replica tokens per batch (SLAI's chunked-prefill budget)")
    theta: float = Field(5.0, ge=0, description="SLAI's LST offset in mean batch times (decode share model)")
    tier_tbt_slo_s: dict[str, float] = Field(default_factory=dict, description="tier name -> TBT SLO (s)")
    min_prefill_share: float = Field(0.1, gt=0, le=1, description="floor of the prefill share of a batch")
    default_batch_time_s: float = Field(0.05, gt=0, description="batch time assumed without a measurement")
    kv_limit: float = Field(0.96, gt=0, le=1, description="KV use at which strict tiers avoid a replica")
    strict_max_rank: int = Field(0, ge=0, description="tiers with tier_rank <= this are strict")
    max_strict_decodes: int = Field(128, gt=0, description="decodes of tiers at least as strict, per replica")
    risk_weight_s: float = Field(0.1, ge=0, description="seconds of predicted TTFT a full strict-tier risk costs")
    max_feedback_age_s: float | None = Field(None, gt=0, description="older feedback is ignored (None: never)")
    stale_feedback_s: float | None = Field(None, gt=0, description="older feedback marks the replica unresponsive: "
                                                                   "ranked last (None: never)")
    prefix_affinity: bool = Field(True, description="credit the prompt tokens a replica holds in its prefix cache "
                                                    "(learnt from this router's decisions) as costing no prefill")
    prefix_index_max_entries: int = Field(
        131_072, gt=0,
        description="bound of the prefix index in (block hash, replica) pairs, least recently used out; size it "
                    "as replicas x KV-cache blocks per replica: 2^17 pairs of 512-token blocks are 1M cached "
                    "tokens per replica at 64 replicas (one 80 GB GPU holds ~0.5M tokens of a 7-8B model's KV), "
                    "in ~40 MB (~300 B a pair); remembering far more than the replicas hold only adds stale "
                    "credit and memory (1M pairs: ~300 MB)")
    prefix_guard_share: float = Field(
        0.5, ge=0, le=1,
        description="hot-prefix guard: a replica's prefix discount holds only while its queued work (s) exceeds "
                    "the least-loaded feasible replica's by at most this share of the prefill time (s) the "
                    "discount saves (1: plain TTFT minimisation, 0: affinity among equally loaded replicas only)")


@dataclass(frozen=True, slots=True)
class ReplicaEstimate:
    replica_id: str
    predicted_ttft_s: float
    prefill_rate_tps: float
    tokens_ahead: float  # including this prompt (less its cached tokens)
    feasible: bool
    reasons: tuple[str, ...]  # why infeasible ("tbt_p99", "batch_time", "kv", "strict_decodes", "stale")
    risk: float
    cost: float
    num_in_flight: int
    cached_tokens: int = 0  # prompt tokens credited as held in the replica's prefix cache
    prefix_guarded: bool = False  # it holds some of the prefix, but the hot-prefix guard withheld the credit


class _Grid:
    """The bins of one set of histogram edges, located for the prompt length of the decision at
    hand (every replica reports the same edges, so this is done once per decision, not per replica)."""

    __slots__ = ("los", "his", "mids", "prompt", "i", "pf")

    def __init__(self, bins: list[tuple[float, float, int]]) -> None:
        self.los = [lo for lo, _, _ in bins]
        self.his = [hi for _, hi, _ in bins]
        self.mids = [(lo + hi) / 2 for lo, hi, _ in bins]  # a waiting prompt's tokens, per bin
        self.prompt = -1
        self.i = 0
        self.pf = 0.0

    def locate(self, prompt_len: int) -> None:
        """Bins [0, i) lie at or below prompt_len; bin i (if any) holds it, and a waiting prompt of
        that bin at or below it adds pf tokens per count (PromptHistogram.tokens_at_most)."""
        self.prompt = prompt_len
        i = self.i = bisect_right(self.his, prompt_len + 1)
        self.pf = 0.0
        if i < len(self.his):
            lo = self.los[i]
            if lo <= prompt_len:
                self.pf = (prompt_len + 1 - lo) / (self.his[i] - lo) * (lo + prompt_len) / 2


class _Snapshot:
    """What one feedback snapshot implies, computed once (snapshots are immutable): its prefill
    rate, the tokens of its waiting prompts at most a given length (`PromptHistogram.tokens_at_most`)
    as prefix sums over the histogram's `grid`, and per tier its feasibility (`SLOPolicy._tier_state`)."""

    __slots__ = ("fb", "rate", "waiting", "grid", "const", "ahead", "partial", "tiers", "hot")

    def __init__(self, fb: ReplicaFeedback, rate: float, grids: dict[tuple[int, ...], _Grid]) -> None:
        self.fb = fb
        self.rate = rate
        total = self.waiting = fb.waiting_prefill_tokens
        self.tiers: dict[int, tuple[tuple[str, ...], float, int]] = {}  # SLOPolicy._tier_key -> state
        self.grid: _Grid | None = None
        self.ahead: list[float] = []  # tokens of the prompts of bins [0, i), scaled to the total
        self.partial: list[float] = []  # per bin: its scaled count (times grid.pf: its part at or below)
        # tokens at most any length when the histogram says nothing of lengths (None: it does)
        self.const: float | None = float(total)
        h = fb.waiting_prompt_histogram
        if h is not None and total > 0:
            grid = grids.get(h.edges)
            if grid is None:
                if len(grids) > 16:
                    grids.clear()
                grid = grids[h.edges] = _Grid(h._bins())
            est = 0.0
            cum = [0.0]
            for count, mid in zip(h.counts, grid.mids):
                if count:
                    est += count * mid
                cum.append(est)
            if est > 0:  # (PromptHistogram.tokens_at_most, with total / est folded in)
                self.grid = grid
                scale = total / est
                self.ahead = [c * scale for c in cum]
                self.partial = [count * scale for count in h.counts]
                self.const = None
        elif h is not None:
            self.const = 0.0
        # the fields a decision reads, in one tuple (one unpack instead of seven attribute loads)
        self.hot = (rate, self.const, self.grid, self.ahead, self.partial, float(total), self.tiers)


class SLOPolicy(RoutingPolicy):
    name = "slo"

    def __init__(self, config: SLOPolicyConfig | None = None, **overrides) -> None:
        if config is None:
            config = SLOPolicyConfig(**overrides)
        elif overrides:
            config = SLOPolicyConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self.prefix_index = PrefixIndex(config.prefix_index_max_entries) if config.prefix_affinity else None
        self._snapshots: dict[str, _Snapshot] = {}
        self._grids: dict[tuple[int, ...], _Grid] = {}
        self._tier_keys: dict[tuple[str, float, bool], int] = {}
        self._competing: dict[tuple[str, float], frozenset[str]] = {}

    @classmethod
    def context_options(cls, context: RoutingContext) -> dict[str, Any]:
        """Each tier's TBT SLO (for its decode-share model) and the replicas' token budget."""
        out: dict[str, Any] = {}
        if context.stale_feedback_s is not None:
            out["stale_feedback_s"] = context.stale_feedback_s
        if context.tier_tbt_slo_s:
            out["tier_tbt_slo_s"] = dict(context.tier_tbt_slo_s)
        if context.token_budget is not None:
            out["token_budget"] = context.token_budget
        return out

    # --- what the router tells the policy ---
    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        """The replica now holds the request's prefix blocks (as far as this router knows)."""
        if self.prefix_index is not None and request.prefix_hashes:
            self.prefix_index.record(replica_id, request.prefix_hashes)

    def forget_replicas_except(self, live: set[str]) -> None:
        if self.prefix_index is not None:
            self.prefix_index.retain(live)
        self._snapshots = {rid: s for rid, s in self._snapshots.items() if rid in live}

    # --- the model ---
    def batch_time_s(self, fb: ReplicaFeedback) -> float:
        b = fb.mean_batch_time_s
        return b if b is not None and b > 0 else self.config.default_batch_time_s

    def decode_tokens_per_batch(self, decodes_by_tier: Mapping[str, float], batch_time_s: float) -> float:
        cfg = self.config
        total = 0.0
        for tier, n in decodes_by_tier.items():
            slo = cfg.tier_tbt_slo_s.get(tier)
            if slo is None:
                total += n
                continue
            slack = slo - cfg.theta * batch_time_s
            total += n * (1.0 if slack <= batch_time_s else batch_time_s / slack)
        return total

    def prefill_rate_tps(self, fb: ReplicaFeedback) -> float:
        return self.prefill_rate_at(fb.running_decodes_by_tier, self.batch_time_s(fb))

    def prefill_rate_at(self, decodes_by_tier: Mapping[str, float], batch_time_s: float) -> float:
        """A replica's prefill rate (tokens/s) with these running decodes and this batch time: the
        budget less the decodes' share of a batch, at least ``min_prefill_share`` of it, per batch."""
        cfg = self.config
        per_batch = cfg.token_budget - self.decode_tokens_per_batch(decodes_by_tier, batch_time_s)
        per_batch = max(per_batch, cfg.min_prefill_share * cfg.token_budget)
        return per_batch / batch_time_s

    def _competing_tiers(self, request: RoutingRequest) -> frozenset[str]:
        """Tiers at least as strict as the request's (its own tier when SLOs are unknown)."""
        key = (request.tier, request.tbt_slo_s)
        comp = self._competing.get(key)
        if comp is None:
            slos = self.config.tier_tbt_slo_s
            comp = frozenset([request.tier, *(t for t, s in slos.items() if s <= request.tbt_slo_s)])
            if len(self._competing) > 256:
                self._competing.clear()
            self._competing[key] = comp
        return comp

    def _usable(self, view: ReplicaView) -> ReplicaFeedback | None:
        return usable_feedback(view, self.config.max_feedback_age_s)

    def _snapshot(self, rid: str, fb: ReplicaFeedback) -> _Snapshot:
        snap = self._snapshots.get(rid)
        if snap is None or snap.fb is not fb:
            # no batch measured yet (a replica just started): no rate of its own (0), so it runs at
            # its peers' median rate in `_evaluate`, not at default_batch_time_s, which could be
            # far slower than the hardware and starve the new replica of traffic
            rate = self.prefill_rate_tps(fb) if fb.mean_batch_time_s else 0.0
            snap = self._snapshots[rid] = _Snapshot(fb, rate, self._grids)
        return snap

    def _tier_key(self, request: RoutingRequest, strict: bool) -> int:
        """A small int for (tier, TBT SLO, strict): `_Snapshot.tiers` is keyed by it (an int hashes
        faster than a tuple, and the snapshot is looked up once per replica per decision)."""
        key = (request.tier, request.tbt_slo_s, strict)
        got = self._tier_keys.get(key)
        if got is None:
            if len(self._tier_keys) > 256:
                self._tier_keys.clear()
                for snap in self._snapshots.values():
                    snap.tiers.clear()
            got = self._tier_keys[key] = len(self._tier_keys)
        return got

    def _tier_state(self, snap: _Snapshot, request: RoutingRequest, strict: bool,
                    comp: frozenset[str] | None) -> tuple[tuple[str, ...], float, int]:
        """The snapshot's infeasibility reasons, largest risk and competing decodes for the request's tier."""
        key = self._tier_key(request, strict)
        got = snap.tiers.get(key)
        if got is not None:
            return got
        cfg = self.config
        fb = snap.fb
        slo = request.tbt_slo_s
        reasons: list[str] = []
        risk = 0.0
        tier_fb = fb.tier(request.tier)
        p99 = tier_fb.tbt_p99_s if tier_fb is not None else None
        if p99 is not None:
            risk = max(risk, p99 / slo)
            if p99 > slo:
                reasons.append("tbt_p99")
        if fb.mean_batch_time_s:
            risk = max(risk, fb.mean_batch_time_s / slo)
            if fb.mean_batch_time_s >= slo:
                reasons.append("batch_time")
        competing = 0
        if strict:
            risk = max(risk, fb.kv_usage / cfg.kv_limit)
            if fb.kv_usage >= cfg.kv_limit:
                reasons.append("kv")
            competing = sum(n for t, n in fb.running_decodes_by_tier.items() if t in comp)
        got = snap.tiers[key] = (tuple(reasons), risk, competing)
        return got

    def _evaluate(self, request: RoutingRequest, replicas: list[ReplicaView], detail: list[tuple] | None = None,
                  full_match: bool = False) -> tuple[dict[str, float], dict[str, float]]:
        """The cost of each feasible replica and the predicted TTFT of each infeasible one (what
        `rank` sorts by).  With `detail`, also appends per replica (id, prefill rate, queued tokens
        ahead but this prompt, reasons, risk, predicted TTFT, cost, cached tokens, guarded).

        The hot path of every decision: what a snapshot implies is looked up (`_Snapshot`), the
        rest is inlined; only replicas without a usable snapshot or holding more of the prompt's
        prefix than every replica does are finished after the loop."""
        cfg = self.config
        strict = request.tier_rank <= cfg.strict_max_rank
        prompt = request.prompt_len
        comp = self._competing_tiers(request) if strict else None
        tkey = self._tier_key(request, strict)
        max_age = cfg.max_feedback_age_s
        stale_s = cfg.stale_feedback_s
        max_strict = cfg.max_strict_decodes
        risk_w = cfg.risk_weight_s
        snaps = self._snapshots
        if len(snaps) > 2 * len(replicas) + 64:  # replicas that left without a forget
            live = {v.replica_id for v in replicas}
            snaps = self._snapshots = {rid: s for rid, s in snaps.items() if rid in live}
        # the prefix: blocks every replica holds (credited to all, favouring none) and the
        # replicas holding more (credited after the loop, where the hot-prefix guard allows)
        more = None
        common_cached = 0
        known = None
        index = self.prefix_index
        if index is not None and request.prefix_hashes and prompt > 1:
            if full_match:
                more = index.match(request.prefix_hashes) or None
            else:
                common, more = index.match_common(request.prefix_hashes)
                if common:
                    common_cached = min(common * request.prefix_block_tokens, prompt - 1)
                    known = index.known
                more = more or None
        missing = False  # a replica the index does not know, so the common blocks are not everyone's
        inf = float("inf")
        q_feasible = q_any = inf  # least queued work (s) ahead of this request, prefix mode only
        fcost: dict[str, float] = {}  # feasible replica -> cost
        ittft: dict[str, float] = {}  # infeasible replica -> predicted TTFT
        later: list[tuple] = []  # (id, rate, queued, reasons, risk, matched blocks)
        unknown: list[tuple] = []  # replicas without a usable snapshot: their rate comes last
        last_grid = None  # the histogram grid located for this prompt, and where it falls
        gi, gpf = 0, 0.0
        for v in replicas:
            rid = v.replica_id
            fb = v.feedback
            age = v.feedback_age_s
            if max_age is not None and fb is not None and age is not None and age > max_age:
                fb = None
            entries = v.in_flight
            pend = pend_comp = 0
            if entries:
                if comp is None:
                    for e in entries:
                        pend += e.prompt_len
                else:
                    for e in entries:
                        pend += e.prompt_len
                        if e.tier in comp:
                            pend_comp += 1
            if fb is None:
                rate = 0.0
                queued = float(pend)
                reasons: tuple[str, ...] = ()
                risk = 0.0
                competing = pend_comp
            else:
                snap = snaps.get(rid)
                if snap is None or snap.fb is not fb:
                    snap = self._snapshot(rid, fb)
                rate, queued, grid, ahead, partial, total, tiers = snap.hot
                if queued is None:  # fb.waiting_tokens_at_most(prompt), from the prefix sums
                    if grid is not last_grid:
                        if grid.prompt != prompt:
                            grid.locate(prompt)
                        last_grid, gi, gpf = grid, grid.i, grid.pf
                    queued = ahead[gi] + partial[gi] * gpf if gpf else ahead[gi]
                    if queued > total:
                        queued = total
                queued += pend
                state = tiers.get(tkey)
                if state is None:
                    state = self._tier_state(snap, request, strict, comp)
                reasons, risk, competing = state
                competing += pend_comp
            if stale_s is not None and age is not None and age > stale_s:
                reasons = (*reasons, "stale")
            if strict:
                r = competing / max_strict
                if r > risk:
                    risk = r
                if competing >= max_strict:
                    reasons = (*reasons, "strict_decodes")
                if risk > 1.0:
                    risk = 1.0
            else:
                risk = 0.0
            if known is not None and rid not in known:
                index.add(rid)  # from now on the common blocks are those it holds too: none
                missing = True
            if not rate:
                unknown.append((rid, queued, reasons, risk))
                continue
            if more is not None:
                q = queued / rate
                if reasons:
                    if q < q_any:
                        q_any = q
                elif q < q_feasible:
                    q_feasible = q
                m = more.get(rid)
                if m:
                    later.append((rid, rate, queued, reasons, risk, m))
                    continue
            ttft = (queued + prompt - common_cached) / rate
            if reasons:
                ittft[rid] = cost = ttft
            else:
                fcost[rid] = cost = ttft + risk_w * risk if risk else ttft
            if detail is not None:
                detail.append((rid, rate, queued, reasons, risk, ttft, cost, common_cached, False))
        if missing:  # once per new replica: credit each replica what it holds instead
            if detail is not None:
                detail.clear()
            return self._evaluate(request, replicas, detail, full_match=True)
        if unknown:
            # a replica without feedback yet runs at the median rate of those with feedback
            rates = [s.rate for v in replicas if (s := snaps.get(v.replica_id)) is not None and s.fb is v.feedback
                     and s.rate and (max_age is None or v.feedback_age_s is None or v.feedback_age_s <= max_age)]
            rate = statistics.median(rates) if rates else cfg.token_budget / cfg.default_batch_time_s
            for rid, queued, reasons, risk in unknown:
                if more is not None:
                    q = queued / rate
                    if reasons:
                        q_any = min(q_any, q)
                    else:
                        q_feasible = min(q_feasible, q)
                    m = more.get(rid)
                    if m:
                        later.append((rid, rate, queued, reasons, risk, m))
                        continue
                ttft = (queued + prompt - common_cached) / rate
                if reasons:
                    ittft[rid] = cost = ttft
                else:
                    fcost[rid] = cost = ttft + risk_w * risk
                if detail is not None:
                    detail.append((rid, rate, queued, reasons, risk, ttft, cost, common_cached, False))
        if later:
            # the prefix credit beyond the common blocks, where the hot-prefix guard allows it
            q_min = q_feasible if q_feasible < inf else q_any
            block = request.prefix_block_tokens
            cap = prompt - 1
            share = cfg.prefix_guard_share
            for rid, rate, queued, reasons, risk, m in later:
                held = m * block
                if held > cap:
                    held = cap
                guarded = queued / rate - q_min > share * (held - common_cached) / rate
                cached = common_cached if guarded else held
                ttft = (queued + prompt - cached) / rate
                if reasons:
                    ittft[rid] = cost = ttft
                else:
                    fcost[rid] = cost = ttft + risk_w * risk
                if detail is not None:
                    detail.append((rid, rate, queued, reasons, risk, ttft, cost, cached, guarded))
        return fcost, ittft

    def estimate(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[ReplicaEstimate]:
        """Each replica's prediction (in `replicas` order): what `rank` sorts by, and why."""
        detail: list[tuple] = []
        self._evaluate(request, replicas, detail)
        prompt = request.prompt_len
        by_id = {row[0]: row for row in detail}
        out = []
        for v in replicas:
            rid, rate, queued, reasons, risk, ttft, cost, cached, guarded = by_id[v.replica_id]
            out.append(ReplicaEstimate(rid, ttft, rate, queued + prompt - cached, not reasons, reasons, risk, cost,
                                       len(v.in_flight), cached, guarded))
        return out

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        fcost, ittft = self._evaluate(request, replicas)
        order = _order(fcost, replicas)
        if ittft:
            order += _order(ittft, replicas)
        return order


def _order(key: dict[str, float], replicas: list[ReplicaView]) -> list[str]:
    """The ids of `key` by key, ties by fewer ledger entries then id."""
    order = sorted(key, key=key.__getitem__)
    if len(set(key.values())) < len(key):  # a tie (identical replicas): break it by the rule
        entries = {v.replica_id: len(v.in_flight) for v in replicas}
        order.sort(key=lambda rid: (key[rid], entries[rid], rid))
    return order


class SLONoPrefixPolicy(SLOPolicy):
    """The `slo` policy blind to prompt prefixes (the baseline that shows what prefix affinity buys)."""

    name = "slo-no-prefix"

    def __init__(self, config: SLOPolicyConfig | None = None, **overrides) -> None:
        super().__init__(config, **{**overrides, "prefix_affinity": False})
