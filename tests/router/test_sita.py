"""SITA: equal-work prompt-length thresholds, interval -> replica groups, and the ranking."""

import numpy as np
import pytest

from replica.traces import load_trace
from router.policies.sita import (
    SITAPolicy,
    SITAPolicyConfig,
    equal_work_thresholds,
    group_bounds,
    interval_of,
)
from routing_testkit import req, view


@pytest.fixture(scope="module")
def paper():
    trace = load_trace("paper")
    return trace.prompt_lens, trace.prompt_lens + trace.output_lens


@pytest.fixture(scope="module")
def paper_policy():
    return SITAPolicy()


def interval_work(prompt_lens, work, thresholds):
    idx = [interval_of(int(p), thresholds) for p in prompt_lens]
    return np.bincount(idx, weights=np.asarray(work, dtype=float), minlength=len(thresholds) + 1)


# --- equal-work thresholds ----------------------------------------------------------------------

@pytest.mark.parametrize("prompt_lens, work, k, thresholds", [
    (list(range(1, 101)), [1] * 100, 4, [25, 50, 75]),           # uniform lengths, unit work
    (list(range(1, 101)), [1] * 100, 1, []),
    (list(range(1, 101)), [1] * 100, 2, [50]),
    (list(range(100, 0, -1)), [1] * 100, 4, [25, 50, 75]),       # order does not matter
    (list(range(1, 101)), list(range(1, 101)), 2, [71]),          # work = length: 71*72/2 = 2556 nearest 2525
    ([10] * 100 + [1000], [10] * 100 + [1000], 2, [10]),          # 100 short requests weigh one long one
    ([1, 2, 3], [1, 2, 1], 2, [1]),                               # tie (1 vs 3 of 2 wanted): the shorter
    ([5] * 10 + [7], [1] * 11, 3, [5, 5]),                        # one length holds most work: an empty interval
    ([0, 0, 8], [0, 1, 1], 2, [0]),
])
def test_equal_work_thresholds_known_answers(prompt_lens, work, k, thresholds):
    assert equal_work_thresholds(prompt_lens, work, k) == thresholds
    assert equal_work_thresholds(np.array(prompt_lens), np.array(work), k) == thresholds


@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
def test_paper_trace_intervals_carry_equal_work(paper, k):
    prompt_lens, work = paper
    thresholds = equal_work_thresholds(prompt_lens, work, k)
    assert len(thresholds) == k - 1
    assert all(a < b for a, b in zip(thresholds, thresholds[1:]))  # strictly increasing on this trace
    shares = interval_work(prompt_lens, work, thresholds) / work.sum()
    # off by at most the work of one prompt length (0.11 % of the total on this trace)
    assert np.abs(shares - 1 / k).max() < 0.002


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 5, 13])
def test_thresholds_are_monotone_and_within_one_length_of_equal(seed, k):
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(1, 300, size=400)
    work = prompt_lens + rng.integers(1, 200, size=400)
    thresholds = equal_work_thresholds(prompt_lens, work, k)
    assert thresholds == sorted(thresholds) and len(thresholds) == k - 1
    assert set(thresholds) <= set(prompt_lens.tolist())
    heaviest = max(work[prompt_lens == p].sum() for p in np.unique(prompt_lens))
    cum = np.cumsum(interval_work(prompt_lens, work, thresholds))
    targets = work.sum() * np.arange(1, k + 1) / k
    assert np.abs(cum - targets).max() <= heaviest / 2 + 1e-9  # each cut at the nearest length


@pytest.mark.parametrize("prompt_lens, work, k, match", [
    ([1, 2], [1, 1], 0, "k must be"),
    ([], [], 2, "no requests"),
    ([1, 2], [1], 2, "equal length"),
    ([1, -2], [1, 1], 2, "non-negative integers"),
    ([1.5, 2], [1, 1], 2, "non-negative integers"),
    ([1, 2], [1, -1], 2, "work must be"),
    ([1, 2], [0, 0], 2, "work must be"),
    ([1, 2], [1, float("nan")], 2, "work must be"),
])
def test_equal_work_thresholds_rejects_bad_input(prompt_lens, work, k, match):
    with pytest.raises(ValueError, match=match):
        equal_work_thresholds(prompt_lens, work, k)


# --- intervals and groups -----------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len, interval", [(0, 0), (100, 0), (101, 1), (2000, 1), (2001, 2), (10**6, 2)])
def test_interval_upper_bounds_are_inclusive(prompt_len, interval):
    assert interval_of(prompt_len, (100, 2000)) == interval


@pytest.mark.parametrize("k, r, groups", [
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (2, 4, [(0, 2), (2, 4)]),
    (4, 6, [(0, 1), (1, 3), (3, 4), (4, 6)]),
    (3, 7, [(0, 2), (2, 4), (4, 7)]),
    (4, 2, [(0, 1), (0, 1), (1, 2), (1, 2)]),   # fewer replicas than intervals: neighbours share
    (3, 1, [(0, 1)] * 3),
    (1, 5, [(0, 5)]),
])
def test_groups_are_contiguous_and_cover_the_replicas(k, r, groups):
    assert [group_bounds(i, k, r) for i in range(k)] == groups


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("r", range(1, 13))
def test_groups_partition_the_replicas_when_there_are_enough(k, r):
    bounds = [group_bounds(i, k, r) for i in range(k)]
    assert all(0 <= lo < hi <= r for lo, hi in bounds)
    assert bounds[0][0] == 0 and bounds[-1][1] == r
    if r >= k:
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1


# --- ranking ------------------------------------------------------------------------------------

# Thresholds 500 / 2000 and replicas r0..r5 in two per group; loads (queue lengths) differ so the
# group, not the load, decides who comes first.
LOADS = {"r0": 5, "r1": 3, "r2": 9, "r3": 8, "r4": 0, "r5": 1}


def _views():
    return [view(rid, waiting=[100] * n) for rid, n in sorted(LOADS.items(), reverse=True)]


@pytest.mark.parametrize("prompt_len, order", [
    (1, ["r1", "r0", "r4", "r5", "r3", "r2"]),
    (500, ["r1", "r0", "r4", "r5", "r3", "r2"]),
    (501, ["r3", "r2", "r4", "r5", "r1", "r0"]),
    (2000, ["r3", "r2", "r4", "r5", "r1", "r0"]),
    (2001, ["r4", "r5", "r1", "r0", "r3", "r2"]),
    (8000, ["r4", "r5", "r1", "r0", "r3", "r2"]),
])
def test_the_group_of_the_prompt_length_comes_first_then_the_rest_by_queue_length(prompt_len, order):
    assert SITAPolicy(thresholds=[500, 2000]).rank(req("free", prompt_len), _views()) == order


@pytest.mark.parametrize("waiting_r0, ledger_r0, waiting_r1, ledger_r1, order", [
    (5, 0, 3, 0, ["r1", "r0"]),
    (5, 0, 3, 2, ["r0", "r1"]),   # 5 vs 3 + 2: fewer in flight first
    (5, 0, 3, 3, ["r0", "r1"]),
    (5, 2, 3, 0, ["r1", "r0"]),
    (3, 1, 3, 1, ["r0", "r1"]),   # all equal: the id
    (0, 4, 3, 0, ["r1", "r0"]),   # 0 + 4 in flight > 3 + 0
])
def test_within_the_group_the_least_loaded_comes_first_ledger_included(waiting_r0, ledger_r0, waiting_r1,
                                                                       ledger_r1, order):
    views = [view("r3"), view("r2", waiting=[100] * 9),
             view("r1", waiting=[100] * waiting_r1, ledger=[("free", 10)] * ledger_r1),
             view("r0", waiting=[100] * waiting_r0, ledger=[("free", 10)] * ledger_r0)]
    assert SITAPolicy(thresholds=[1000]).rank(req("free", 50), views) == order + ["r3", "r2"]
    assert SITAPolicy(thresholds=[1000]).rank(req("free", 5000), views)[2:] == order


@pytest.mark.parametrize("thresholds, prompt_len, first", [
    ([100, 1000, 4000], 50, "a"),     # K = 4 on 2 replicas: intervals 0, 1 -> a; 2, 3 -> b
    ([100, 1000, 4000], 500, "a"),
    ([100, 1000, 4000], 2000, "b"),
    ([100, 1000, 4000], 9000, "b"),
    ([], 50, "b"),                    # K = 1: one group, the least loaded of all
    ([500, 500], 400, "a"),           # a repeated threshold: interval 1 is empty
    ([500, 500], 501, "b"),
])
def test_fewer_replicas_than_intervals_share_groups(thresholds, prompt_len, first):
    views = [view("b", waiting=[100] * 2), view("a", waiting=[100] * 4)]
    assert SITAPolicy(thresholds=thresholds).rank(req("free", prompt_len), views)[0] == first


def test_every_replica_once_whatever_the_prompt(paper_policy):
    views = [view(f"r{i}", waiting=[100] * (i % 3), ledger=[("free", 10)] * (i % 2)) for i in range(7)]
    views.append(view("new", no_feedback=True))
    for prompt_len in (1, 300, 1500, 3000, 6000, 10**5):
        order = paper_policy.rank(req("free", prompt_len), views)
        assert sorted(order) == sorted(v.replica_id for v in views)
    assert paper_policy.rank(req(), []) == []
    assert paper_policy.rank(req(), views[:1]) == ["r0"]


# --- thresholds from the trace ------------------------------------------------------------------

@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4, 8])
def test_default_thresholds_split_the_paper_trace_for_the_current_replica_count(paper, paper_policy, num_replicas):
    thresholds = paper_policy.thresholds_for(num_replicas)
    assert list(thresholds) == equal_work_thresholds(*paper, num_replicas)
    assert paper_policy.thresholds_for(num_replicas) is thresholds  # cached per replica count


@pytest.mark.parametrize("prompt_len, first", [(1, "r0"), (600, "r0"), (3000, "r1"), (5000, "r2"), (7000, "r3")])
def test_short_prompts_go_to_the_first_group_long_ones_to_the_last(paper_policy, prompt_len, first):
    # paper trace, K = 4: thresholds 2171 / 3932 / 5720 tokens
    views = [view(f"r{i}") for i in (3, 1, 0, 2)]
    assert paper_policy.thresholds_for(4) == (2171, 3932, 5720)
    assert paper_policy.rank(req("free", prompt_len), views)[0] == first


def test_num_intervals_fixes_k_whatever_the_replica_count(paper):
    policy = SITAPolicy(num_intervals=2)
    assert policy.thresholds_for(4) == policy.thresholds_for(7) == tuple(equal_work_thresholds(*paper, 2))
    views = [view(f"r{i}", waiting=[100] * (4 - i)) for i in range(4)]  # r3 least loaded
    assert policy.rank(req("free", 100), views) == ["r1", "r0", "r3", "r2"]
    assert policy.rank(req("free", 7000), views) == ["r3", "r2", "r1", "r0"]


def test_thresholds_from_a_csv_trace(tmp_path):
    path = tmp_path / "trace.csv"
    rows = [(p, 1) for p in range(1, 101)]  # work = prompt_len + 1
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{p},{o}\n" for p, o in rows))
    policy = SITAPolicy(trace=str(path))
    lens = np.arange(1, 101)
    assert list(policy.thresholds_for(3)) == equal_work_thresholds(lens, lens + 1, 3)
    assert policy.thresholds_for(2) == (70,)  # work of prompts <= 70: 2555, the nearest to 5150 / 2


@pytest.mark.parametrize("kw, match", [
    ({"thresholds": [1000, 100]}, "non-decreasing"),
    ({"thresholds": [-1]}, "non-negative"),
    ({"thresholds": [100], "num_intervals": 2}, "not both"),
    ({"num_intervals": 0}, "num_intervals"),
    ({"trace": ""}, "trace"),
    ({"trace": "/no/such/trace.csv"}, "no such file"),
    ({"threshold": [1]}, "threshold"),
])
def test_config_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        SITAPolicy(**kw)


def test_explicit_thresholds_need_no_trace():
    cfg = SITAPolicyConfig(thresholds=[100, 100, 2000])
    policy = SITAPolicy(cfg)
    assert policy.thresholds_for(5) == (100, 100, 2000) and policy._prompt_lens is None
    assert SITAPolicy(cfg, thresholds=[7]).thresholds_for(2) == (7,)
