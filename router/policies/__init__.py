"""Pure routing policies (no Ray, no vLLM): each ranks replicas for one request, best first."""

from router.policies.base import RoutingContext, RoutingPolicy, RoutingRequest
from router.policies.registry import (
           available_router_policies,
           make_router_policy,
           normalize_router_name,
)

__all__ = ["RoutingContext", "RoutingPolicy", "RoutingRequest", "available_router_policies", "make_router_policy",
           "normalize_router_name"]
