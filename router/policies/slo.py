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
as empty but for its ledger entries, at the median prefill rate of the replicas with feedback
(token_budget / default_batch_time_s if none), and feasible: so such replicas rank by ledger load.
Ties: fewer ledger entries, then replica id.

A replica whose snapshot is older than ``stale_feedback_s`` (if set) has stopped answering the
controller's polls (it may hang without dying): it is infeasible (reason "stale"), ranked after
every replica that answers, so requests go elsewhere while it is silent.  The Serve app sets it to
5 feedback periods (`RoutingContext.stale_feedback_s`); the cluster simulator leaves it off.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from replica.policy.config import DEFAULT_TOKEN_BUDGET
from router.feedback import ReplicaFeedback, ReplicaView, usable_feedback
from router.policies.base import RoutingContext, RoutingPolicy, RoutingRequest


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


@dataclass(frozen=True, slots=True)
class ReplicaEstimate:
    replica_id: str
    predicted_ttft_s: float
    prefill_rate_tps: float
    tokens_ahead: float  # including this prompt
    feasible: bool
    reasons: tuple[str, ...]  # why infeasible ("tbt_p99", "batch_time", "kv", "strict_decodes", "stale")
    risk: float
    cost: float
    num_in_flight: int


class SLOPolicy(RoutingPolicy):
    name = "slo"

    def __init__(self, config: SLOPolicyConfig | None = None, **overrides) -> None:
        if config is None:
            config = SLOPolicyConfig(**overrides)
        elif overrides:
            config = SLOPolicyConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config

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

    # --- the model ---
    def batch_time_s(self, fb: ReplicaFeedback) -> float:
        b = fb.mean_batch_time_s
        return b if b is not None and b > 0 else self.config.default_batch_time_s

    def decode_tokens_per_batch(self, decodes_by_tier: dict[str, int], batch_time_s: float) -> float:
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
        cfg = self.config
        b = self.batch_time_s(fb)
        per_batch = cfg.token_budget - self.decode_tokens_per_batch(fb.running_decodes_by_tier, b)
        per_batch = max(per_batch, cfg.min_prefill_share * cfg.token_budget)
        return per_batch / b

    def _competing_decodes(self, request: RoutingRequest, decodes_by_tier: dict[str, int]) -> int:
        """Decodes of tiers at least as strict as the request's (its own tier when SLOs are unknown)."""
        slos = self.config.tier_tbt_slo_s
        return sum(
            n for tier, n in decodes_by_tier.items()
            if tier == request.tier or (tier in slos and slos[tier] <= request.tbt_slo_s)
        )

    def _usable(self, view: ReplicaView) -> ReplicaFeedback | None:
        return usable_feedback(view, self.config.max_feedback_age_s)

    def estimate(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[ReplicaEstimate]:
        cfg = self.config
        strict = request.tier_rank <= cfg.strict_max_rank
        slo = request.tbt_slo_s
        feedback = {v.replica_id: self._usable(v) for v in replicas}
        rates = {rid: self.prefill_rate_tps(fb) for rid, fb in feedback.items() if fb is not None}
        default_rate = (statistics.median(rates.values()) if rates
                        else cfg.token_budget / cfg.default_batch_time_s)
        out = []
        for v in replicas:
            fb = feedback[v.replica_id]
            pend = v.pending
            decodes = dict(pend.decodes_by_tier)
            reasons: list[str] = []
            risks: list[float] = []
            if fb is None:
                rate = default_rate
                ahead = float(pend.prefill_tokens + request.prompt_len)
            else:
                rate = rates[v.replica_id]
                ahead = fb.waiting_tokens_at_most(request.prompt_len) + pend.prefill_tokens + request.prompt_len
                for tier, n in fb.running_decodes_by_tier.items():
                    decodes[tier] = decodes.get(tier, 0) + n
                tier_fb = fb.tier(request.tier)
                p99 = tier_fb.tbt_p99_s if tier_fb is not None else None
                if p99 is not None:
                    risks.append(p99 / slo)
                    if p99 > slo:
                        reasons.append("tbt_p99")
                if fb.mean_batch_time_s:
                    risks.append(fb.mean_batch_time_s / slo)
                    if fb.mean_batch_time_s >= slo:
                        reasons.append("batch_time")
                if strict:
                    risks.append(fb.kv_usage / cfg.kv_limit)
                    if fb.kv_usage >= cfg.kv_limit:
                        reasons.append("kv")
            if cfg.stale_feedback_s is not None and v.feedback_age_s is not None \
                    and v.feedback_age_s > cfg.stale_feedback_s:
                reasons.append("stale")
            if strict:
                competing = self._competing_decodes(request, decodes)
                risks.append(competing / cfg.max_strict_decodes)
                if competing >= cfg.max_strict_decodes:
                    reasons.append("strict_decodes")
            ttft = ahead / rate
            risk = min(1.0, max(risks, default=0.0)) if strict else 0.0
            out.append(ReplicaEstimate(
                replica_id=v.replica_id, predicted_ttft_s=ttft, prefill_rate_tps=rate, tokens_ahead=ahead,
                feasible=not reasons, reasons=tuple(reasons), risk=risk,
                cost=ttft + cfg.risk_weight_s * risk, num_in_flight=len(v.in_flight),
            ))
        return out

    def rank(self, request: RoutingRequest, replicas: list[ReplicaView]) -> list[str]:
        ests = self.estimate(request, replicas)
        feasible = sorted((e for e in ests if e.feasible), key=lambda e: (e.cost, e.num_in_flight, e.replica_id))
        infeasible = sorted((e for e in ests if not e.feasible),
                            key=lambda e: (e.predicted_ttft_s, e.num_in_flight, e.replica_id))
        return [e.replica_id for e in feasible + infeasible]
