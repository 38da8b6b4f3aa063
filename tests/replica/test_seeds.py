"""One run seed, independent random streams (replica/seeds.py)."""

import numpy as np
import pytest

from loadtest.arrivals import poisson_arrival_times
from replica.seeds import STREAMS, stream_rng
from replica.tiers import paper_tiers
from replica.traces import Trace, sample_requests


def test_each_stream_of_one_seed_draws_its_own_bits():
    draws = {name: stream_rng(42, name).integers(0, 2**63, size=4).tolist() for name in STREAMS}
    draws["plain"] = np.random.default_rng(42).integers(0, 2**63, size=4).tolist()
    assert len({tuple(d) for d in draws.values()}) == len(draws)


def test_a_stream_is_reproducible_alone():
    assert stream_rng(7, "tiers").random(5).tolist() == stream_rng(7, "tiers").random(5).tolist()
    assert stream_rng(7, "tiers").random(5).tolist() != stream_rng(8, "tiers").random(5).tolist()


def test_arrival_gaps_do_not_share_the_tier_draws_or_the_shuffle_generator():
    # the old code seeded all three with default_rng(seed): the gaps were its exponential draws
    n, qps = 1000, 2.0
    gaps_s = np.diff(poisson_arrival_times(n, qps, seed=42, max_gap_factor=np.inf))
    shared = np.random.default_rng(42).exponential(1.0 / qps, size=n - 1)
    assert not np.allclose(gaps_s, shared)
    tiers = paper_tiers()
    shared_tiers = np.random.default_rng(42).choice(2, size=n, p=tiers.shares)
    assert not np.array_equal(tiers.assign(n, seed=42), shared_tiers)


def test_the_trace_shuffle_stays_the_papers_seeded_permutation():
    trace = Trace(np.arange(1, 11), np.arange(1, 11), source="t")
    prompts, _ = sample_requests(trace, 4, seed=42)
    assert prompts.tolist() == (np.random.default_rng(42).permutation(10)[:4] + 1).tolist()


def test_an_unknown_stream_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown random stream 'gaps'.*arrivals"):
        stream_rng(42, "gaps")
