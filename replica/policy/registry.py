"""One registry of scheduling policies: name -> configured policy object."""

from __future__ import annotations

from typing import Any

from replica.policy.base import SchedulingPolicy
from replica.policy.config import SchedulerConfig
from replica.policy.rad import RADPolicy
from replica.policy.sarathi import SarathiPolicy
from replica.policy.slai import SLAIPolicy
from replica.policy.slai_plus import SLAIPlusPolicy
from replica.policy.vllm_style import VLLMStylePolicy

_CLASSES = {"slai": SLAIPolicy, "slai-plus": SLAIPlusPolicy, "sarathi": SarathiPolicy, "vllm": VLLMStylePolicy, "rad": RADPolicy}

# The paper's schedulers (PAPER.md "Variants evaluated" and "Baselines"), plus RAD and slai-plus.
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
}


def available_schedulers() -> list[str]:
    return list(PRESETS)


def paper_schedulers() -> list[str]:
    """The paper's schedulers and RAD (the `paper` benchmark's default set)."""
    return [n for n, p in PRESETS.items() if p["kind"] != "slai-plus"]


def scheduler_config(name: str, **overrides: Any) -> SchedulerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(PRESETS)}")
    return SchedulerConfig(name=name, **{**PRESETS[name], **overrides})


def make_policy(config: SchedulerConfig | str, **overrides: Any) -> SchedulingPolicy:
    """A fresh policy object (policies hold per-engine state: one per engine)."""
    if isinstance(config, str):
        config = scheduler_config(config, **overrides)
    elif overrides:  # validate the combination (model_copy would not)
        config = SchedulerConfig.model_validate({**config.model_dump(), **overrides})
    return _CLASSES[config.kind](config)
