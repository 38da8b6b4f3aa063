"""One registry of routing policies: name -> factory of a configured policy object.

Names are case-insensitive and `_` reads as `-` ("round_robin" is "round-robin", "least_work" is
"least-work"). A policy gets the options it takes from the deployment's `RoutingContext`
(`RoutingPolicy.context_options`), then the explicit options, in its constructor; an unknown name
or a bad option raises ValueError. `serve_app.config.RouterConfig.policy` accepts exactly these
names (and "serve-default": Ray Serve's own router).

A new routing policy: one module with a `RoutingPolicy` subclass, one line in ``ROUTER_POLICIES``.
"""

from __future__ import annotations

import inspect
from typing import Any

from router.policies.base import RoutingContext, RoutingPolicy
from router.policies.least_work import LeastWorkPolicy
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.prefix_affinity import PrefixAffinityPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.sita import SITAPolicy
from router.policies.slo import SLONoPrefixPolicy, SLOPolicy

ROUTER_POLICIES: dict[str, type[RoutingPolicy]] = {
    "round-robin": RoundRobinPolicy,
    "pow2": PowerOfTwoPolicy,
    "slo": SLOPolicy,
    "least-work": LeastWorkPolicy,
    "sita": SITAPolicy,
    "slo-no-prefix": SLONoPrefixPolicy,
    "prefix-affinity": PrefixAffinityPolicy,
}


def available_router_policies() -> list[str]:
    return sorted(ROUTER_POLICIES)


def normalize_router_name(name: str) -> str:
    """The registry's spelling of a policy name (``Round_Robin`` -> ``round-robin``)."""
    return name.strip().lower().replace("_", "-")


def make_router_policy(name: str, context: RoutingContext | None = None, **options: Any) -> RoutingPolicy:
    """A fresh policy object (policies may hold state: one per router)."""
    key = normalize_router_name(name) if isinstance(name, str) else name
    cls = ROUTER_POLICIES.get(key)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choices: {', '.join(available_router_policies())}")
    kw = {**(cls.context_options(context) if context is not None else {}), **options}
    try:
        inspect.signature(cls).bind(**kw)
        return cls(**kw)
    except (TypeError, ValueError) as err:  # ValueError: pydantic's ValidationError, a bad trace
        raise ValueError(f"bad options for routing policy {key!r}: {err}") from err
