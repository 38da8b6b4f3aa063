"""loadtest.sim_to_real without vLLM: the workload and the simulator side of the comparison
(the engine side: tests/replica/vllm/test_sim_to_real_vllm.py)."""

from __future__ import annotations

import numpy as np

from loadtest import sim_to_real as s2r
from replica.tiers import parse_tiers


def test_scaled_trace_fits_the_tiny_model():
    t = s2r.scaled_trace("paper", 0.1, 1024)
    assert len(t) > 1000
    assert (t.prompt_lens + t.output_lens <= 1024).all()
    assert t.prompt_lens.min() >= 1 and t.output_lens.min() >= 1


def test_sim_side_matches_itself():
    """compare_runs of a simulator run against itself: zero errors; the workload fits the model."""
    prof = s2r.profile_stub(s2r.Coefficients(base_ms=3.0, per_token_ms=0.005, prefill_sq_ms=0.0,
                                             prefill_ctx_ms=0.0, decode_ctx_ms=1e-4))
    wl = s2r.build_workload(30, 10.0, 1, parse_tiers(s2r.DEFAULT_TIERS))
    assert (wl.prompt_lens + wl.output_lens <= s2r.ENGINE["max_model_len"]).all()
    limits = {"max_batch_tokens": 256, "max_active_requests": 16, "max_decodes": 16, "kv_tokens": 65536}
    run = s2r.run_sim(wl, prof, limits)
    res = s2r.compare_runs(run, run)
    assert all(v == 0.0 for t in res["rel_error"].values() for v in t.values() if np.isfinite(v))
