"""slai-next inside vLLM: shortest-remaining-prefill-first leaves a started prefill out of a step
(vLLM V1 runs the other requests; the adapter sets it aside), and vLLM executes every plan."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_slai_scheduler import POLICY, Arrival, run_script, steps_of  # noqa: E402
from vllm_testkit import assert_executed_as_planned, engine_scheduler  # noqa: E402

from replica.policy.slai_next import SLAINextPolicy  # noqa: E402
from replica.vllm_scheduler import replica_engine_config  # noqa: E402


def test_slai_next_in_vllm_runs_a_short_prompt_before_a_started_long_one(make_llm):
    config = {"tiered_llm": replica_engine_config(scheduler="slai-next")}
    llm = make_llm(POLICY, max_num_batched_tokens=64, max_num_seqs=8, additional_config=config)
    sched = engine_scheduler(llm)
    assert isinstance(sched.policy, SLAINextPolicy)
    steps_of(llm)
    script = [Arrival(0, "long", 400, 4, {"tier": "free"}), Arrival(2, "short", 20, 4, {"tier": "free"}),
              Arrival(3, "mid", 50, 4, {"tier": "free"})]
    ours = run_script(llm, script)
    log = steps_of(llm)
    assert_executed_as_planned(log, budget=64)

    def planned(rec, rid):
        return any(r.startswith(rid) for r, _ in rec.planned["prefills"])

    skipped = [k for k, rec in enumerate(log)
               if any(r.startswith("short") for r in rec.planned["admitted"]) and not planned(rec, "long")]
    assert skipped, "the started long prompt was never left out for the short one"
    # the long prompt had started before that step and still prefills after it
    k = skipped[0]
    assert any(planned(rec, "long") for rec in log[:k]) and any(planned(rec, "long") for rec in log[k + 1:])
    assert ours == run_script(make_llm(None, max_num_batched_tokens=64, max_num_seqs=8), script)
