"""What a policy learns an iteration's time from: the shape the iteration ran with
(`BatchPlan.ran_shape`, recorded when the mechanism starts it), not the shape its requests have
once the iteration advanced them; and slai-plus's time model, fed those shapes by the simulator,
recovers the cost profile the simulator times iterations with."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.simulate.replica import Workload, run_replica
from replica.cost.model import CostModel
from replica.cost.profile import load_profile
from replica.cost.shape import BatchShape
from replica.policy import BatchPlan, Request, make_policy
from replica.policy.sarathi import SarathiPolicy
from replica.sim.engine import SimEngine
from replica.tiers import paper_tiers
from replica.traces import load_trace

BS = 16


class OneSecond(CostModel):
    def iteration_time_s(self, shape) -> float:
        return 1.0

    def decode_stretch_times_s(self, num_decodes: int, sum_decode_ctx: int, num_iterations: int) -> np.ndarray:
        return np.ones(num_iterations)


class ShapeLog(SarathiPolicy):
    """Sarathi, noting each call's recorded shape and how many iterations the call covers."""

    def __init__(self, **overrides) -> None:
        super().__init__(make_policy("sarathi-fcfs", **overrides).config)
        self.learned: list[tuple[BatchShape | None, int]] = []

    def on_batches_end(self, state, plan, starts_s, ends_s) -> None:
        self.learned.append((plan.ran_shape, len(ends_s)))

    def on_batch_end(self, state, plan, batch_start_s, batch_end_s) -> None:
        self.on_batches_end(state, plan, [batch_start_s], [batch_end_s])


def run_to_end(engine: SimEngine, reqs: list[Request]) -> None:
    for r in reqs:
        engine.add_request(r)
    now = 0.0
    while engine.has_work:
        now = engine.step(now)[1]


def test_each_iteration_is_learned_at_the_contexts_it_ran_with():
    policy = ShapeLog(token_budget=64)
    engine = SimEngine(policy, OneSecond(), num_kv_blocks=100)
    run_to_end(engine, [Request("r", 100, 0.0, max_output_tokens=3)])
    assert policy.learned == [
        (BatchShape(64, 64 * 64, 0, 0, 0), 1),  # the first chunk, at context 0
        (BatchShape(36, 36 * 36, 36 * 64, 0, 0), 1),  # the rest, on the 64 tokens before it
        (BatchShape(0, 0, 0, 1, 100), 2),  # a decode stretch of 2, from its first iteration
    ]


def test_an_admission_is_learned_at_its_cached_prefix():
    policy = ShapeLog()
    engine = SimEngine(policy, OneSecond(), num_kv_blocks=2000, prefix_caching=True)
    shared = list(range(1, 33))  # 32 blocks = 512 tokens
    run_to_end(engine, [Request("warm", 32 * BS + 100, 0.0, max_output_tokens=1, block_hashes=shared + [100, 101, 102, 103, 104, 105])])
    policy.learned.clear()
    run_to_end(engine, [Request("hit", 32 * BS + 100, 0.0, max_output_tokens=1, block_hashes=shared + [200, 201, 202, 203, 204, 205])])
    assert policy.learned == [(BatchShape(100, 100 * 100, 100 * 32 * BS, 0, 0), 1)]


def test_a_planned_admission_is_priced_from_its_cached_prefix():
    """Before the mechanism admits it (the vLLM adapter records the shape then), a waiting
    request has computed nothing; its chunk still starts after its cached prefix."""
    r = Request("w", 600, 0.0, num_cached_tokens=512)
    plan = BatchPlan(prefills=[(r, 88)], admitted=[r])
    assert plan.shape() == BatchShape(88, 88 * 88, 88 * 512, 0, 0)


@pytest.mark.parametrize("profile", ["rtx6000ada-mistral7b", "h100-mistral7b-measured"])
def test_slai_plus_learns_the_cost_profile_the_simulator_times_iterations_with(profile):
    cost = load_profile(profile)
    c = cost.coefficients
    truth = np.array([c.base_ms / 1e3, c.per_token_ms / 1e3, c.decode_ctx_ms, c.prefill_sq_ms * 1e3,
                      c.prefill_ctx_ms * 1e3])  # in the time model's units (s, s/token, s/Ktok, s/Mtok^2)
    policy = make_policy("slai-plus")
    run_replica(Workload.build(load_trace("paper"), 300, 1.5, paper_tiers()), policy, cost)
    np.testing.assert_allclose(policy.time_model.coefficients, truth, rtol=1e-3)
