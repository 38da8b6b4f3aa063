"""Smoke tests of the in-process vLLM engine on the tiny model: what the scheduler plug-in relies on."""

from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the `cpu` or `gpu` extra)", allow_module_level=True)

from vllm_testkit import ENGINE_DEFAULTS, engine_scheduler  # noqa: E402

PROMPTS = ["Hello world", "The tiny model is a test", "a", "Stella dou kaipi 42!"]
PROBE = "vllm_probe_scheduler.ProbeScheduler"


def greedy(max_tokens: int = 8, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_tiny_model_folder_is_consistent(tiny_model_dir):
    from transformers import AutoTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config["vocab_size"] >= len(tok)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 32
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_default_scheduler_generates_greedy_tokens(make_llm):
    from vllm.v1.core.sched.scheduler import Scheduler

    llm = make_llm()
    assert isinstance(engine_scheduler(llm), Scheduler)
    first = token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    assert [len(t) for t in first] == [8] * len(PROMPTS)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    assert all(0 <= t < vocab for ts in first for t in ts)
    again = token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    assert again == first  # greedy, float32, same batch: reproducible
    assert not engine_scheduler(llm).requests  # nothing left in flight for the next test


def test_extra_args_reach_the_default_scheduler(make_llm):
    llm = make_llm()
    engine, sched = llm.llm_engine, engine_scheduler(llm)
    xargs = {"tier": "premium", "tbt_slo_s": 0.1}
    engine.add_request("xargs-probe", "Hello world", greedy(4, extra_args=xargs))
    # In-process, add_request hands the request straight to the scheduler. vLLM appends a random
    # suffix to the id.
    (req_id,) = [r for r in sched.requests if r.startswith("xargs-probe")]
    assert sched.requests[req_id].sampling_params.extra_args == xargs
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert len(outputs) == 1 and len(outputs[0].outputs[0].token_ids) == 4
    assert not sched.requests


def test_scheduler_cls_by_dotted_path_is_the_engine_scheduler(make_llm):
    import vllm_probe_scheduler

    reference = token_ids(make_llm().generate(PROMPTS, greedy(), use_tqdm=False))

    llm = make_llm(PROBE)
    probe = engine_scheduler(llm)
    assert type(probe) is vllm_probe_scheduler.ProbeScheduler
    probe.reset_probe()
    params = [greedy(extra_args={"tier": "free", "tag": i}) for i in range(len(PROMPTS))]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    # The subclass changes nothing: same tokens as the default scheduler.
    assert token_ids(outputs) == reference
    assert sorted(a["tag"] for a in probe.extra_args.values()) == list(range(len(PROMPTS)))
    assert all(a["tier"] == "free" for a in probe.extra_args.values())
    budget = ENGINE_DEFAULTS["max_num_batched_tokens"]
    assert probe.steps and all(sum(s.values()) <= budget for s in probe.steps)
    assert probe.updates >= len(probe.steps)
    assert make_llm(PROBE) is llm  # same arguments: the live engine is shared
