"""The routing policy registry."""

import pytest

from pydantic import ValidationError

from router.policies import registry
from router.policies.base import RoutingContext, RoutingPolicy, RoutingRequest
from router.policies.least_work import LeastWorkPolicy
from router.policies.pow2 import PowerOfTwoPolicy
from router.policies.registry import available_router_policies, make_router_policy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.sita import SITAPolicy
from router.policies.slo import SLOPolicy
from serve_app.config import RouterConfig


@pytest.mark.parametrize("name, kw, cls", [
    ("round-robin", {}, RoundRobinPolicy),
    ("round_robin", {}, RoundRobinPolicy),
    ("Pow2", {"seed": 1}, PowerOfTwoPolicy),
    ("slo", {}, SLOPolicy),
    ("slo", {"token_budget": 256, "tier_tbt_slo_s": {"premium": 0.1}}, SLOPolicy),
    ("least_work", {}, LeastWorkPolicy),
    ("least-work", {"decode_token_weight": 0}, LeastWorkPolicy),
    ("SITA", {}, SITAPolicy),
    ("sita", {"thresholds": [100, 1000]}, SITAPolicy),
    ("sita", {"num_intervals": 3}, SITAPolicy),
])
def test_names_make_fresh_policies(name, kw, cls):
    a, b = make_router_policy(name, **kw), make_router_policy(name, **kw)
    assert type(a) is cls and a is not b and isinstance(a, RoutingPolicy)
    assert a.name in available_router_policies()


@pytest.mark.parametrize("name, kw, field, value", [
    ("slo", {"token_budget": 256, "kv_limit": 0.9}, "token_budget", 256),
    ("least_work", {"decode_token_weight": 16}, "decode_token_weight", 16),
    ("sita", {"thresholds": [100, 1000]}, "thresholds", (100, 1000)),
])
def test_options_reach_the_policy(name, kw, field, value):
    assert getattr(make_router_policy(name, **kw).config, field) == value


def test_the_app_config_accepts_exactly_the_registered_policies():
    for name in available_router_policies():
        assert RouterConfig(policy=name).policy == name
        RouterConfig(policy=name.replace("-", "_"))  # either spelling, as the registry reads it
    RouterConfig(policy="serve-default")  # Ray Serve's own router: no policy of ours
    with pytest.raises(ValidationError, match="unknown routing policy 'least-loaded'"):
        RouterConfig(policy="least-loaded")


def test_a_new_policy_is_one_registry_line(monkeypatch):
    class Newest(RoutingPolicy):
        name = "newest"

        def rank(self, request, replicas):
            return [v.replica_id for v in reversed(replicas)]

    monkeypatch.setitem(registry.ROUTER_POLICIES, "newest", Newest)
    assert RouterConfig(policy="newest").policy == "newest"  # the app config offers it
    assert isinstance(make_router_policy("newest", RoutingContext(seed=1)), Newest)


@pytest.mark.parametrize("name, field, value", [
    ("slo", "tier_tbt_slo_s", {"premium": 0.1, "free": 0.5}),
    ("slo", "token_budget", 256),
])
def test_policies_take_what_they_need_from_the_routing_context(name, field, value):
    ctx = RoutingContext(tier_tbt_slo_s={"premium": 0.1, "free": 0.5}, token_budget=256, seed=7)
    assert getattr(make_router_policy(name, ctx).config, field) == value
    # explicit options override the context
    assert make_router_policy("slo", ctx, token_budget=1024).config.token_budget == 1024
    # a seeded context makes a randomised policy repeatable
    a, b = make_router_policy("pow2", ctx), make_router_policy("pow2", ctx)
    assert a.rng.random() == b.rng.random()
    # policies that need nothing ignore it
    assert make_router_policy("round_robin", ctx).name == "round-robin"


@pytest.mark.parametrize("name, kw, match", [
    ("least-loaded", {}, r"unknown routing policy 'least-loaded'; choices: least-work, pow2, prefix-affinity, round-robin, sita, slo, slo-no-prefix"),
    ("", {}, "unknown routing policy"),
    ("pow2", {"sed": 1}, r"bad options for routing policy 'pow2'.*sed"),
    ("round-robin", {"seed": 1}, "bad options for routing policy 'round-robin'"),
    ("slo", {"token_budgett": 1}, r"(?s)bad options for routing policy 'slo'.*token_budgett"),
    ("slo", {"token_budget": 0}, r"(?s)bad options for routing policy 'slo'.*token_budget"),
    ("slo", {"kv_limit": 1.5}, "kv_limit"),
    ("least_work", {"decode_token_weight": -1}, r"(?s)bad options for routing policy 'least-work'.*weight"),
    ("least_work", {"decode_weight": 4}, r"(?s)bad options for routing policy 'least-work'.*decode_weight"),
    ("sita", {"thresholds": [1000, 100]}, r"(?s)bad options for routing policy 'sita'.*non-decreasing"),
    ("sita", {"thresholds": [100], "num_intervals": 2}, r"(?s)bad options.*not both"),
    ("sita", {"num_intervals": 0}, r"(?s)bad options.*num_intervals"),
    ("sita", {"trace": "no/such/trace.csv"}, r"(?s)bad options for routing policy 'sita'.*no such file"),
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
