"""One registry of routing policies: name -> factory of a configured policy object.

Names are case-insensitive and `_` reads as `-` ("round_robin" is "round-robin", "least_work" is
"least-work"). Options go to the policy's constructor; an unknown name or a bad option raises
ValueError. `serve_app.config.RouterConfig.policy` lists the same names (underscore spelling, plus
"serve-default"); tests/router/test_router_registry.py checks the two agree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from router.policies.base import RoutingPolicy
from router.policies.least_work import LeastWorkPolicy
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.sita import SITAPolicy
from router.policies.slo import SLOPolicy

ROUTER_POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round-robin": RoundRobinPolicy,
    "pow2": PowerOfTwoPolicy,
    "slo": SLOPolicy,
    "least-work": LeastWorkPolicy,
    "sita": SITAPolicy,
}


def available_router_policies() -> list[str]:
    return sorted(ROUTER_POLICIES)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def make_router_policy(name: str, **kw: Any) -> RoutingPolicy:
    """A fresh policy object (policies may hold state: one per router)."""
    key = _normalize(name) if isinstance(name, str) else name
    factory = ROUTER_POLICIES.get(key)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; choices: {', '.join(available_router_policies())}")
    try:
        inspect.signature(factory).bind(**kw)
        return factory(**kw)
    except (TypeError, ValueError) as err:  # ValueError: pydantic's ValidationError, a bad trace
        raise ValueError(f"bad options for routing policy {key!r}: {err}") from err
