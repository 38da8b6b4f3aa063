"""Pure scheduling policies (no vLLM or Ray imports): SLAI, Sarathi-Serve, vLLM-style, RAD, slai-plus."""

from replica.policy.base import AdmissionOrder, SchedulingPolicy
from replica.policy.config import DEFAULT_SCHEDULER, DEFAULT_TOKEN_BUDGET, SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.registry import EngineLimits, available_schedulers, make_policy, scheduler_config
from replica.policy.state import EngineState, KVCache, Request

__all__ = [
    "DEFAULT_SCHEDULER", "DEFAULT_TOKEN_BUDGET", "AdmissionOrder", "BatchPlan", "EngineLimits", "EngineState",
    "KVCache", "Request", "SchedulerConfig", "SchedulingPolicy", "available_schedulers", "make_policy",
    "scheduler_config",
]
