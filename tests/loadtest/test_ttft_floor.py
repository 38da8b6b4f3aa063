"""The TTFT floor of a workload (`loadtest.simulate.autoscale --ttft-floor`): the attainment no
scaling can exceed, from each prompt's least prefill time on an idle replica."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.simulate.autoscale import prefill_floor_s, ttft_floor
from loadtest.simulate.replica import Workload
from replica.cost import BatchShape, available_profiles, load_profile
from replica.tiers import parse_tiers

PROFILE = load_profile("rtx6000ada-mistral7b")


def chunked_s(prompt_len: int, chunk: int) -> float:
    t, done = 0.0, 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        t += PROFILE.iteration_time_s(BatchShape.of(prefill_chunks=[(n, done)]))
        done += n
    return t


@pytest.mark.parametrize("prompt_len", [1, 64, 700, 4096, 12_000])
def test_the_floor_is_no_later_than_any_chunking(prompt_len):
    floor = prefill_floor_s(prompt_len, PROFILE)
    sizes = sorted({*range(64, prompt_len, 64), prompt_len})
    assert floor <= min(chunked_s(prompt_len, b) for b in sizes) + 1e-12
    assert floor > 0


def test_a_long_prompt_cannot_meet_half_a_second_on_the_papers_gpu():
    assert prefill_floor_s(1000, PROFILE) < 0.5 < prefill_floor_s(8000, PROFILE)


def test_the_attainable_share_counts_the_requests_whose_floor_fits_the_target():
    tiers = parse_tiers("premium:0.1:0.5,free:0.5:0.5")
    prompts = np.array([500, 8000, 1000, 9000, 300, 200])
    wl = Workload(arrival_s=np.arange(6.0), prompt_lens=prompts, output_lens=np.full(6, 10),
                  tier_idx=np.array([0, 0, 0, 1, 1, 1]), tiers=tiers, qps=1.0)
    floor = ttft_floor(wl, PROFILE)
    assert floor["premium"]["attainable"] == pytest.approx(2 / 3)
    assert floor["free"]["attainable"] == pytest.approx(2 / 3)
    assert floor["premium"]["requests"] == 3


def test_a_workload_that_reuses_prefixes_gets_no_floor():
    tiers = parse_tiers("premium:0.1:0.5,free:0.5:0.5")
    wl = Workload(arrival_s=np.arange(2.0), prompt_lens=np.array([100, 200]), output_lens=np.full(2, 5),
                  tier_idx=np.array([0, 1]), tiers=tiers, qps=1.0, prefix_hashes=((1,), (1, 2)), hash_block_tokens=16)
    with pytest.raises(ValueError, match="reuses prompt prefixes"):
        ttft_floor(wl, PROFILE)


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_makes_the_most_equal_split_the_fastest(name):
    """prefill_floor_s's premise: prefill_sq_ms >= prefill_ctx_ms / 2."""
    c = load_profile(name).coefficients
    assert c.prefill_sq_ms >= c.prefill_ctx_ms / 2
