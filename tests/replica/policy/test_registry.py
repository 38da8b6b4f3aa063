"""The scheduler registry and its one builder: every engine builds its policy with
`make_policy(name, engine=EngineLimits(...))`, and the engine's limits reach each kind the same way."""

from __future__ import annotations

import pytest

from replica.policy import DEFAULT_SCHEDULER, EngineLimits, SchedulingPolicy, available_schedulers, make_policy
from replica.policy.registry import PRESETS


@pytest.mark.parametrize("name", available_schedulers())
def test_every_preset_builds_a_scheduling_policy(name):
    policy = make_policy(name)
    assert isinstance(policy, SchedulingPolicy) and policy.name == name
    assert policy.mean_batch_time_s == 0.0  # nothing measured yet
    assert policy.order is None or policy.order.value == PRESETS[name]["admission_order"]


def test_the_default_scheduler_is_a_preset():
    assert DEFAULT_SCHEDULER in available_schedulers()


@pytest.mark.parametrize("name, limits, expected", [
    # one iteration size: the engine's limit is the budget
    ("slai-spf-dynamic", EngineLimits(max_batch_tokens=256), {"token_budget": 256, "max_prefill_tokens": 256}),
    ("sarathi-fcfs", EngineLimits(max_batch_tokens=2048), {"token_budget": 2048}),
    ("vllm", EngineLimits(max_batch_tokens=4096), {"token_budget": 4096, "max_prefill_tokens": 4096}),
    # an adaptive size: the base budget stays at most the limit, the ceiling is the limit
    ("slai-plus", EngineLimits(max_batch_tokens=1024), {"token_budget": 512, "max_token_budget": 1024}),
    ("slai-plus", EngineLimits(max_batch_tokens=256), {"token_budget": 256, "max_token_budget": 256}),
    ("rad", EngineLimits(max_batch_tokens=1024), {"token_budget": 512, "max_batch_tokens": 1024}),
    ("rad", EngineLimits(max_batch_tokens=256), {"token_budget": 256, "max_batch_tokens": 256}),
    # the GPU's tile, request slots and the decode cap
    ("rad", EngineLimits(tile_tokens=64), {"tile_tokens": 64}),
    ("slai-plus", EngineLimits(tile_tokens=256), {"tile_tokens": 256}),
    ("slai-spf-dynamic", EngineLimits(max_active_requests=16, max_decodes=256),
     {"max_active_requests": 16, "max_decodes": 128}),
    ("slai-spf-dynamic", EngineLimits(max_decodes=16), {"max_decodes": 16}),
    ("slai-spf-dynamic", EngineLimits(), {"token_budget": 512, "tile_tokens": 128, "max_decodes": 128}),
])
def test_engine_limits_reach_every_kind_of_policy(name, limits, expected):
    config = make_policy(name, engine=limits).config
    assert {k: getattr(config, k) for k in expected} == expected


def test_explicit_overrides_win_over_engine_limits():
    policy = make_policy("sarathi-fcfs", engine=EngineLimits(max_batch_tokens=256), token_budget=128)
    assert policy.config.token_budget == 128


def test_rad_never_plans_past_the_engine_limit():
    from replica.policy import EngineState, KVCache, Request

    policy = make_policy("rad", engine=EngineLimits(max_batch_tokens=256))
    state = EngineState(now_s=0.0, kv=KVCache(10_000), waiting=[
        Request(req_id=f"r{i}", prompt_len=900, arrival_s=float(i)) for i in range(4)])
    assert 0 < policy.schedule(state).num_tokens <= 256


def test_an_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="unknown scheduler 'slai-max'; choose from sarathi-fcfs"):
        make_policy("slai-max")
