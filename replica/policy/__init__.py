"""Pure scheduling policies (no vLLM or Ray imports): SLAI, Sarathi-Serve, vLLM-style, RAD."""

from replica.policy.base import AdmissionOrder, SchedulingPolicy
from replica.policy.config import SchedulerConfig
from replica.policy.plan import BatchPlan
from replica.policy.registry import available_schedulers, make_policy, scheduler_config
from replica.policy.state import EngineState, KVCache, Request

__all__ = [
    "AdmissionOrder", "BatchPlan", "EngineState", "KVCache", "Request", "SchedulerConfig",
    "SchedulingPolicy", "available_schedulers", "make_policy", "scheduler_config",
]
