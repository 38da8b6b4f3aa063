"""Scheduler configuration: one pydantic model for every policy (defaults = the paper's runs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "slai-spf-dynamic"
    kind: Literal["slai", "sarathi", "vllm", "rad"] = "slai"
    admission_order: Literal["fcfs", "spf", "spf-tier"] = "spf"

    token_budget: int = Field(512, gt=0, description="tokens per iteration (chunked prefill budget)")
    max_active_requests: int = Field(128, gt=0, description="requests holding KV at once")
    max_decodes: int = Field(128, gt=0, description="decodes per iteration")

    # SLAI: LST offset Theta (in mean batch times), switched by KV-cache use.
    dynamic_theta: bool = True
    theta_low: float = Field(5.0, ge=0)
    theta_high: float = Field(10.0, ge=0)
    theta_kv_threshold: float = Field(0.96, gt=0, le=1)

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
        if self.kind == "rad" and self.max_batch_tokens < self.tile_tokens:
            raise ValueError("max_batch_tokens must be at least one tile")
        return self
