"""The cost model's throughput ceiling (loadtest/simulate/ceiling.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.simulate import ceiling as ce
from loadtest.simulate.__main__ import main
from replica.cost import BatchShape, CostModel, load_profile
from replica.policy.registry import scheduler_config
from replica.policy.state import KVCache

BIG_KV = KVCache(10**9)


class Affine(CostModel):
    """t_ms = base + tok * N + sq * sum p^2 + pctx * sum p c + dctx * sum ctx (hand-checkable)."""

    def __init__(self, base=10.0, tok=1.0, sq=0.0, pctx=0.0, dctx=0.0):
        self.c = (base, tok, sq, pctx, dctx)

    def iteration_time_s(self, s: BatchShape) -> float:
        base, tok, sq, pctx, dctx = self.c
        if s.num_tokens == 0:
            return 0.0
        return (base + tok * s.num_tokens + sq * s.sum_prefill_sq + pctx * s.sum_prefill_ctx
                + dctx * s.sum_decode_ctx) / 1000.0


def _mix(prompts, outputs):
    return ce.RequestMix(np.array(prompts), np.array(outputs))


def test_hand_computed_ceiling():
    # one request: prompt 6, output 3 -> 2 decodes at contexts 6 and 7; 8 tokens; budget 4:
    # prefill share 6/8 -> chunks of 3 (ctx 0, 3): sum p^2 = 18, sum p c = 9
    cost = Affine(base=10.0, tok=1.0, sq=0.5, pctx=0.25, dctx=0.1)
    c = ce.ceiling_at(cost, _mix([6], [3]), 4, BIG_KV, 128, 128)
    assert c.chunk_tokens == 3
    expected = {"per_iteration": 10.0 * 8 / 4, "per_token": 8.0, "prefill_sq": 0.5 * 18, "prefill_ctx": 0.25 * 9,
                "decode_ctx": 0.1 * 13}
    assert c.terms_ms == pytest.approx(expected)
    assert c.gpu_ms_per_request == pytest.approx(sum(expected.values()))
    assert c.qps == pytest.approx(1000.0 / sum(expected.values()))


def test_faster_profile_gives_a_higher_ceiling():
    mix = _mix([1000, 3000], [100, 300])
    slow = ce.ceiling_at(Affine(base=20.0, tok=0.05, dctx=2e-4), mix, 512, BIG_KV, 128, 128)
    fast = ce.ceiling_at(Affine(base=10.0, tok=0.025, dctx=1e-4), mix, 512, BIG_KV, 128, 128)
    assert fast.qps == pytest.approx(2 * slow.qps)


def test_larger_budget_amortises_the_per_iteration_cost():
    mix = _mix([1000, 3000], [100, 300])
    small = ce.ceiling_at(Affine(), mix, 256, BIG_KV, 128, 128)
    large = ce.ceiling_at(Affine(), mix, 1024, BIG_KV, 128, 128)
    assert large.terms_ms["per_iteration"] == pytest.approx(small.terms_ms["per_iteration"] / 4)
    assert large.terms_ms["per_token"] == pytest.approx(small.terms_ms["per_token"])
    assert large.qps > small.qps


def test_kv_capacity_caps_the_iteration_size():
    # 10 requests of prompt 16, output 17: 32 tokens each; KV of 4 blocks of 16 tokens
    mix = _mix([16] * 10, [17] * 10)
    kv = KVCache(4, block_size=16)
    free = ce.budget_ceiling(Affine(), mix, 256, BIG_KV, 10**6, 10**6)
    tight = ce.budget_ceiling(Affine(), mix, 256, kv, 10**6, 10**6)
    assert free.binding == "compute" and free.bound_qps == pytest.approx(free.compute.qps)
    assert tight.binding == "kv" and tight.bound.budget <= tight.compute.n_kv + 1e-9
    assert tight.bound_qps < tight.compute.qps
    # Little's law: at the bound's iteration size the mean KV in use fits the cache
    assert tight.bound.kv_tokens_at_ceiling <= 4 * 16 * (1 + 1e-9)


def test_request_slots_cap_the_iteration_size():
    mix = _mix([100] * 4, [400] * 4)
    bc = ce.budget_ceiling(Affine(), mix, 512, BIG_KV, max_active_requests=8)
    assert bc.binding == "slots" and bc.bound.running_at_ceiling <= 8 + 1e-9


def test_a_non_affine_cost_model_is_refused():
    class Quadratic(CostModel):
        def iteration_time_s(self, s: BatchShape) -> float:
            return 0.0 if s.num_tokens == 0 else 1e-3 * s.num_tokens ** 2

    with pytest.raises(ValueError, match="affine"):
        ce.ceiling_at(Quadratic(), _mix([10], [2]), 8, BIG_KV, 128, 128)


def test_profile_terms_match_its_coefficients():
    # the decomposition by the model's function gives coefficient x sum for a shipped profile
    prof = load_profile("rtx6000ada-mistral7b")
    k = prof.coefficients
    c = ce.ceiling_at(prof, _mix([600], [5]), 512, BIG_KV, 128, 128)
    # prefill share 600/604 -> chunk 509: chunks (509, ctx 0), (91, ctx 509); decodes at ctx 600..603
    assert c.chunk_tokens == 509
    assert c.terms_ms["prefill_sq"] == pytest.approx(k.prefill_sq_ms * (509**2 + 91**2))
    assert c.terms_ms["prefill_ctx"] == pytest.approx(k.prefill_ctx_ms * 91 * 509)
    assert c.terms_ms["decode_ctx"] == pytest.approx(k.decode_ctx_ms * (600 + 601 + 602 + 603))
    assert c.terms_ms["per_iteration"] == pytest.approx(k.base_ms * 604 / 512)


def test_scheduler_budget_is_its_largest_iteration():
    assert ce.scheduler_budget(scheduler_config("slai-spf-dynamic")) == 512
    assert ce.scheduler_budget(scheduler_config("rad")) == scheduler_config("rad").max_batch_tokens
    assert ce.scheduler_budget(scheduler_config("slai-spf-dynamic", token_budget=1024)) == 1024


def test_fractions_are_in_nominal_qps():
    bc = ce.budget_ceiling(Affine(), _mix([100], [10]), 64, BIG_KV)
    results = {"schedulers": {"s": {"capacity_qps": 0.5 * bc.compute.qps, "stable_capacity_qps": 0.25 * bc.compute.qps}}}
    f = ce.scheduler_fractions(results, {64: bc}, {"s": 64}, rate_per_qps=2.0)["s"]
    assert f["capacity_of_ceiling"] == pytest.approx(1.0) and f["stable_capacity_of_ceiling"] == pytest.approx(0.5)
    assert f["ceiling_qps"] == pytest.approx(bc.compute.qps / 2) and "p99_ttft_capacity_qps" not in f


def test_cli_writes_json_and_checks_the_results_setup(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["ceiling", "--requests", "200", "--budgets", "256,512", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["budgets"]) == {"256", "512"}
    assert doc["budgets"]["512"]["compute"]["qps"] > doc["budgets"]["256"]["compute"]["qps"]
    assert "Compute ceiling" in capsys.readouterr().out
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"setup": {"profile": "h100-mistral7b", "trace": "paper", "requests": 200, "seed": 42},
                               "schedulers": {}}))
    assert main(["ceiling", "--requests", "200", "--results", str(res)]) == 2
