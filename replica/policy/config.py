"""Scheduler configuration: one pydantic model for every policy (defaults = the paper's runs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The scheduler a replica runs unless told otherwise: SLAI as the paper evaluates it best.
DEFAULT_SCHEDULER = "slai-spf-dynamic"
# The paper's chunked-prefill token budget per iteration (SLAI and Sarathi-Serve)
DEFAULT_TOKEN_BUDGET = 512


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = DEFAULT_SCHEDULER
    kind: Literal["slai", "slai-plus", "slai-next", "sarathi", "vllm", "rad"] = "slai"
    admission_order: Literal["fcfs", "spf", "spf-tier"] = "spf"

    token_budget: int = Field(DEFAULT_TOKEN_BUDGET, gt=0, description="tokens per iteration (chunked prefill budget)")
    max_active_requests: int = Field(128, gt=0, description="requests holding KV at once")
    max_decodes: int = Field(128, gt=0, description="decodes per iteration")

    # SLAI: LST offset Theta (in mean batch times): switched by KV-cache use (dynamic offset), or
    # constant (fixed offset: theta_fixed, 10 as in the authors' fixed-offset configuration)
    dynamic_theta: bool = True
    theta_low: float = Field(5.0, ge=0, description="dynamic offset: Theta while KV use < theta_kv_threshold")
    theta_high: float = Field(10.0, ge=0, description="dynamic offset: Theta at or above theta_kv_threshold")
    theta_kv_threshold: float = Field(0.96, gt=0, le=1)
    theta_fixed: float = Field(10.0, ge=0, description="fixed offset (dynamic_theta false): Theta at any KV use")

    # slai-plus (replica/policy/slai_plus.py): each mechanism switchable, for the ablation.
    aging: bool = Field(True, description="a prompt that waited max_wait_ttft_multiple x its tier's TTFT "
                                          "target is admitted before shorter ones (arrival order)")
    max_wait_ttft_multiple: float = Field(4.0, gt=0)
    adaptive_budget: bool = Field(True, description="grow the token budget, in tiles, up to max_token_budget "
                                                    "while the predicted iteration time keeps every running "
                                                    "tier within (1 - slo_margin) of its TBT SLO")
    max_token_budget: int = Field(2048, gt=0)
    slo_margin: float = Field(0.1, ge=0, lt=1, description="share of each TBT SLO kept as margin")
    adaptive_offset: bool = Field(True, description="LST offset = 2 x the longest recent iteration + the "
                                                    "margin, instead of Theta x the mean batch time")
    kv_guard: bool = Field(True, description="every decode runs once KV use reaches kv_guard_threshold")
    kv_guard_threshold: float = Field(0.8, gt=0, le=1)
    recent_batch_time: bool = Field(True, description="batch-time statistics over the last "
                                                      "batch_time_window batches, instead of all of them")
    batch_time_window: int = Field(64, gt=1, description="batches the recent statistics cover")

    # slai-next (replica/policy/slai_next.py): slai-plus's flags plus these, each switchable.
    srpf: bool = Field(True, description="prefill chunks go to the prompts with the fewest tokens left, started "
                                         "and waiting in one order (overdue ones first under aging)")
    eager_budget: bool = Field(True, description="the adaptive budget is bounded by the strictest running "
                                                 "decode's SLO only and is not pinned at the base while slot-bound")
    shrink_budget: bool = Field(True, description="with eager_budget: below the base budget, in tiles, when the "
                                                   "base's predicted iteration time exceeds (1 - slo_margin) of "
                                                   "the strictest running decode's TBT SLO")

    # vLLM-style: whole prompts, at most this many tokens in a prefill iteration.
    max_prefill_tokens: int = Field(8192, gt=0)

    # RAD: iteration sizes are multiples of the profile's tile; the prefill share grows with the
    # prefill backlog up to max_batch_tokens.
    tile_tokens: int = Field(128, gt=0)
    max_batch_tokens: int = Field(2048, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "SchedulerConfig":
        if self.theta_high < self.theta_low:
            raise ValueError(f"theta_high ({self.theta_high}) must be >= theta_low ({self.theta_low})")
        if self.kind in ("slai-plus", "slai-next") and self.max_token_budget < self.token_budget:
            raise ValueError(f"max_token_budget ({self.max_token_budget}) must be >= token_budget ({self.token_budget})")
        if self.kind == "rad" and self.max_batch_tokens < self.tile_tokens:
            raise ValueError("max_batch_tokens must be at least one tile")
        return self
