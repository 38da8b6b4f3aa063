"""slai-next in the virtual-time simulator: fast-forwarded decode stretches change no result (the
engine may replay an all-decode plan only if the policy would plan it again)."""

from __future__ import annotations

import pytest

from loadtest.metrics import summarize
from loadtest.simulate.replica import Workload, run_replica
from replica.cost.profile import load_profile
from replica.policy import make_policy
from replica.tiers import paper_tiers
from replica.traces import load_trace


@pytest.mark.parametrize("num_requests,qps", [(150, 0.5), (300, 1.5)])
@pytest.mark.parametrize("scheduler", ["slai-next", "slai-next-no-srpf"])
def test_fast_forwarded_decode_stretches_change_no_result(scheduler, num_requests, qps):
    rtx = load_profile("rtx6000ada-mistral7b")
    wl = Workload.build(load_trace("paper"), num_requests, qps, paper_tiers())
    fast = summarize(run_replica(wl, make_policy(scheduler), rtx, fast_forward=True))
    slow = summarize(run_replica(wl, make_policy(scheduler), rtx, fast_forward=False))
    assert fast["iterations"] == slow["iterations"]
    for key in ("ttft_p50_s", "ttft_p99_s", "goodput_rps", "makespan_s"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-9), key
    for tier in ("premium", "free"):
        for key in ("tbt_p99_s", "tbt_count"):
            assert fast["tiers"][tier][key] == pytest.approx(slow["tiers"][tier][key], rel=1e-9), (tier, key)
