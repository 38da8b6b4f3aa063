"""The routing policy registry."""

import pytest

from router.policies.base import RoutingPolicy, RoutingRequest
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.registry import available_router_policies, make_router_policy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.slo import SLOPolicy


@pytest.mark.parametrize("name, kw, cls", [
    ("round-robin", {}, RoundRobinPolicy),
    ("round_robin", {}, RoundRobinPolicy),
    ("Pow2", {"seed": 1}, PowerOfTwoPolicy),
    ("slo", {}, SLOPolicy),
    ("slo", {"token_budget": 256, "tier_tbt_slo_s": {"premium": 0.1}}, SLOPolicy),
])
def test_names_make_fresh_policies(name, kw, cls):
    a, b = make_router_policy(name, **kw), make_router_policy(name, **kw)
    assert type(a) is cls and a is not b and isinstance(a, RoutingPolicy)
    assert a.name in available_router_policies()


def test_options_reach_the_policy():
    assert make_router_policy("slo", token_budget=256, kv_limit=0.9).config.token_budget == 256


@pytest.mark.parametrize("name, kw, match", [
    ("least-loaded", {}, r"unknown routing policy 'least-loaded'; choices: pow2, round-robin, slo"),
    ("", {}, "unknown routing policy"),
    ("pow2", {"sed": 1}, r"bad options for routing policy 'pow2'.*sed"),
    ("round-robin", {"seed": 1}, "bad options for routing policy 'round-robin'"),
    ("slo", {"token_budgett": 1}, r"(?s)bad options for routing policy 'slo'.*token_budgett"),
    ("slo", {"token_budget": 0}, r"(?s)bad options for routing policy 'slo'.*token_budget"),
    ("slo", {"kv_limit": 1.5}, "kv_limit"),
])
def test_registry_errors(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_router_policy(name, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"tbt_slo_s": 0.0}, "tbt_slo_s"), ({"tbt_slo_s": float("inf")}, "tbt_slo_s"),
    ({"prompt_len": -1}, "prompt_len"), ({"tier_rank": -1}, "tier_rank"),
])
def test_routing_requests_are_validated(kw, match):
    base = dict(request_id="r", tier="free", tbt_slo_s=0.5, tier_rank=1, prompt_len=10)
    with pytest.raises(ValueError, match=match):
        RoutingRequest(**{**base, **kw})


def test_the_policies_import_neither_ray_nor_vllm():
    import subprocess
    import sys
    code = ("import sys, router.feedback, router.ledger, router.policies.registry; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
