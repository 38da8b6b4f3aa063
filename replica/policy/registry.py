"""One registry of scheduling policies, and the one builder every engine uses.

A preset is a name for a `SchedulerConfig`; `make_policy(name, engine=EngineLimits(...))` builds a
fresh policy object for one engine.  Every mechanism builds its policy here: the virtual-time
simulators (`loadtest.simulate`), the serving sim backend (`replica.sim.backend`) and the vLLM
adapter (`replica.vllm_scheduler`).  What an engine imposes on a policy (the GPU's GEMM tile, the
most tokens one iteration may hold, its request slots) is applied by `EngineLimits.apply`, the
same way for every engine.

A new scheduler: one module with a `SchedulingPolicy` subclass for a new ``kind`` (and its
config fields in `SchedulerConfig`), one line in ``_CLASSES``, presets in ``PRESETS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from replica.policy.base import SchedulingPolicy
from replica.policy.config import DEFAULT_SCHEDULER, SchedulerConfig
from replica.policy.rad import RADPolicy
from replica.policy.sarathi import SarathiPolicy
from replica.policy.slai import SLAIPolicy
from replica.policy.slai_next import SLAINextPolicy
from replica.policy.slai_plus import SLAIPlusPolicy
from replica.policy.vllm_style import VLLMStylePolicy

__all__ = ["DEFAULT_SCHEDULER", "PRESETS", "EngineLimits", "available_schedulers", "make_policy",
           "paper_schedulers", "scheduler_config"]

_CLASSES: dict[str, type[SchedulingPolicy]] = {
    "slai": SLAIPolicy, "slai-plus": SLAIPlusPolicy, "slai-next": SLAINextPolicy, "sarathi": SarathiPolicy, "vllm": VLLMStylePolicy, "rad": RADPolicy,
}

# The paper's schedulers (docs/paper.md "Variants evaluated" and "Baselines"), plus RAD, slai-plus and slai-next.
PRESETS: dict[str, dict[str, Any]] = {
    "sarathi-fcfs": {"kind": "sarathi", "admission_order": "fcfs"},
    "sarathi-spf": {"kind": "sarathi", "admission_order": "spf"},
    "vllm": {"kind": "vllm", "admission_order": "fcfs"},
    "slai-fcfs-fixed": {"kind": "slai", "admission_order": "fcfs", "dynamic_theta": False},
    "slai-spf-fixed": {"kind": "slai", "admission_order": "spf", "dynamic_theta": False},
    "slai-spf-dynamic": {"kind": "slai", "admission_order": "spf", "dynamic_theta": True},
    "slai-spf-tier-dynamic": {"kind": "slai", "admission_order": "spf-tier", "dynamic_theta": True},
    "rad": {"kind": "rad", "admission_order": "fcfs"},
    # Beyond the paper (replica/policy/slai_plus.py), and its ablation: one mechanism off each.
    "slai-plus": {"kind": "slai-plus", "admission_order": "spf", "dynamic_theta": True},
    "slai-plus-no-aging": {"kind": "slai-plus", "admission_order": "spf", "aging": False},
    "slai-plus-no-budget": {"kind": "slai-plus", "admission_order": "spf", "adaptive_budget": False},
    "slai-plus-no-offset": {"kind": "slai-plus", "admission_order": "spf", "adaptive_offset": False},
    "slai-plus-no-kv-guard": {"kind": "slai-plus", "admission_order": "spf", "kv_guard": False},
    "slai-plus-no-window": {"kind": "slai-plus", "admission_order": "spf", "recent_batch_time": False},
    # slai-plus with two more levers (replica/policy/slai_next.py, issue 20), and its ablation.
    "slai-next": {"kind": "slai-next", "admission_order": "spf"},
    "slai-next-no-srpf": {"kind": "slai-next", "admission_order": "spf", "srpf": False},
    "slai-next-no-eager-budget": {"kind": "slai-next", "admission_order": "spf", "eager_budget": False},
    "slai-next-no-aging": {"kind": "slai-next", "admission_order": "spf", "aging": False},
    "slai-next-no-shrink": {"kind": "slai-next", "admission_order": "spf", "shrink_budget": False},
}

# kinds whose iteration size adapts between a base budget and a ceiling
_ADAPTIVE_SIZE = {"slai-plus": "max_token_budget", "slai-next": "max_token_budget", "rad": "max_batch_tokens"}


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine that runs a policy imposes on it (None: the preset's value stands).

    * ``tile_tokens``: the GPU's GEMM tile, in tokens (a cost profile's ``tile_tokens``): RAD's
      iteration sizes and slai-plus's budget steps are multiples of it.
    * ``max_batch_tokens``: the most tokens one iteration may hold (vLLM's
      ``max_num_batched_tokens``, which sizes its buffers).  A policy with one iteration size
      (SLAI, Sarathi, vLLM-style) runs at that size; one whose size adapts (slai-plus, RAD) keeps
      its base budget at most that and grows up to it.
    * ``max_active_requests``: request slots (vLLM's ``max_num_seqs``).
    * ``max_decodes``: the most decodes one iteration may hold; caps the preset's.
    """

    tile_tokens: int | None = None
    max_batch_tokens: int | None = None
    max_active_requests: int | None = None
    max_decodes: int | None = None

    def apply(self, config: SchedulerConfig) -> dict[str, Any]:
        """The overrides these limits make to ``config``."""
        out: dict[str, Any] = {}
        if self.tile_tokens is not None:
            out["tile_tokens"] = self.tile_tokens
        limit = self.max_batch_tokens
        if limit is not None:
            ceiling = _ADAPTIVE_SIZE.get(config.kind)
            if ceiling is None:
                out["token_budget"] = limit
                out["max_prefill_tokens"] = limit
            else:
                out["token_budget"] = min(config.token_budget, limit)
                out[ceiling] = limit
        if self.max_active_requests is not None:
            out["max_active_requests"] = self.max_active_requests
        if self.max_decodes is not None:
            out["max_decodes"] = min(config.max_decodes, self.max_decodes)
        return out


def available_schedulers() -> list[str]:
    return list(PRESETS)


def paper_schedulers() -> list[str]:
    """The paper's schedulers and RAD (the `paper` benchmark's default set)."""
    return [n for n, p in PRESETS.items() if p["kind"] not in ("slai-plus", "slai-next")]


def scheduler_config(name: str, **overrides: Any) -> SchedulerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(PRESETS)}")
    return SchedulerConfig(name=name, **{**PRESETS[name], **overrides})


def make_policy(config: SchedulerConfig | str, *, engine: EngineLimits | None = None,
                **overrides: Any) -> SchedulingPolicy:
    """A fresh policy object (policies hold per-engine state: one per engine): the preset (or
    config) with the ``engine``'s limits applied, then ``overrides``."""
    if isinstance(config, str):
        config = scheduler_config(config)
    changes = {**(engine.apply(config) if engine is not None else {}), **overrides}
    if changes:  # validate the combination (model_copy would not)
        config = SchedulerConfig.model_validate({**config.model_dump(), **changes})
    return _CLASSES[config.kind](config)
