"""The paper's statistics and the capacity search."""

from types import SimpleNamespace

import numpy as np
import pytest

from loadtest.metrics import capacity_bracket, find_capacity, summarize
from replica.tiers import paper_tiers


def _run(ttft, tbt_premium, tbt_free, waiting=0, prompt_lens=None):
    n = len(ttft)
    wl = SimpleNamespace(
        tiers=paper_tiers(),
        tier_idx=np.array([0] + [1] * (n - 1)),
        prompt_lens=np.array(prompt_lens or [100] * n),
        output_lens=np.full(n, 10),
        qps=1.0,
        __len__=lambda self: n,
    )
    wl = type("WL", (), {**vars(wl), "__len__": lambda self: n})()
    return SimpleNamespace(
        workload=wl, ttft_s=np.array(ttft, dtype=float), tbt_s={"premium": np.array(tbt_premium), "free": np.array(tbt_free)},
        tbt_miss_frac=np.zeros(n), waiting_at_last_arrival=waiting, unfinished=0, num_iterations=1,
        num_preemptions=0, makespan_s=10.0, wall_s=0.0,
    )


def test_slo_met_needs_median_ttft_within_half_a_second():
    assert summarize(_run([0.1, 0.2, 0.4], [0.05], [0.2]))["slo_met"]
    assert not summarize(_run([0.1, 0.6, 0.7], [0.05], [0.2]))["slo_met"]


def test_slo_met_needs_every_tiers_p99_tbt_within_its_slo():
    ok = summarize(_run([0.1] * 3, [0.09] * 100, [0.45] * 100))
    assert ok["slo_met"] and ok["tbt_p99_s"]["premium"] == pytest.approx(0.09)
    assert not summarize(_run([0.1] * 3, [0.09] * 98 + [0.2] * 2, [0.45] * 100))["slo_met"]
    assert not summarize(_run([0.1] * 3, [0.09] * 100, [0.45] * 98 + [0.6] * 2))["slo_met"]


def test_stable_requires_small_backlog_at_last_arrival():
    s = summarize(_run([0.1] * 3, [0.05], [0.2], waiting=1))
    assert s["slo_met"] and not s["stable"] and not s["stable_slo_met"]


def test_ttft_by_prompt_bucket_and_long_prompt_tail():
    s = summarize(_run([0.1, 0.2, 5.0], [0.05], [0.2], prompt_lens=[100, 3000, 6000]))
    assert s["ttft_p50_by_prompt_s"]["0-511"] == pytest.approx(0.1)
    assert s["ttft_p50_by_prompt_s"]["2048-4095"] == pytest.approx(0.2)
    assert s["ttft_p99_long_s"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    "passing, expected",
    [
        ({0.2: True, 0.4: True, 0.6: False}, (0.4, 0.6)),
        ({0.2: False, 0.4: False}, (0.0, 0.2)),
        ({0.2: True, 0.4: True}, (0.4, None)),
        ({0.2: True, 0.4: False, 0.6: True, 0.8: False}, (0.2, 0.4)),  # a pass above a miss does not count
    ],
)
def test_capacity_bracket(passing, expected):
    assert capacity_bracket([{"qps": q, "slo_met": ok} for q, ok in passing.items()]) == expected


def test_find_capacity_bisects_towards_the_threshold():
    true_capacity = 0.93
    evaluate = lambda q: {"qps": q, "slo_met": q <= true_capacity}  # noqa: E731
    grid = [evaluate(q) for q in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)]
    cap, extra = find_capacity(evaluate, grid, refine_steps=4)
    assert len(extra) == 4
    assert 0.8 <= cap <= true_capacity and true_capacity - cap <= 0.2 / 2**4
