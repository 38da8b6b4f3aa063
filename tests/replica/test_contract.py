"""The request contract (`replica.contract`): one typed request from the ingress to the engine,
one stream chunk back, every default written once."""

from __future__ import annotations

import math
import pickle

import pytest

from replica.contract import (VLLM_SAMPLING_PARAMS, GenerateRequest, SamplingFields, StreamChunk, TierFacts,
                              TierMetadataError)

PREMIUM = TierFacts(name="premium", tbt_slo_s=0.1, ttft_target_s=0.5, rank=0)
FREE = TierFacts(name="free", tbt_slo_s=0.5, ttft_target_s=0.5, rank=1)
KNOWN = {t.name: t for t in (PREMIUM, FREE)}


def test_every_sampling_field_has_exactly_one_vllm_mapping():
    assert set(VLLM_SAMPLING_PARAMS) == set(SamplingFields.model_fields)


def test_the_vllm_mapping_names_real_sampling_params_arguments():
    vllm = pytest.importorskip("vllm")
    import inspect

    accepted = set(inspect.signature(vllm.SamplingParams).parameters) | set(
        getattr(vllm.SamplingParams, "__struct_fields__", ()))
    assert set(VLLM_SAMPLING_PARAMS.values()) <= accepted


def test_only_the_fields_a_client_set_reach_vllm():
    s = SamplingFields(temperature=0.0, stop=["\n"], seed=3)
    assert s.to_vllm() == {"temperature": 0.0, "stop": ["\n"], "seed": 3}
    assert SamplingFields().to_vllm() == {}


@pytest.mark.parametrize("field, value", [
    ("temperature", "0.5"), ("temperature", -1.0), ("temperature", math.inf), ("top_p", 0.0),
    ("top_p", 1.5), ("seed", 1.0), ("seed", 2**63), ("presence_penalty", 3.0), ("ignore_eos", 1),
])
def test_sampling_fields_are_strict_as_openai_has_them(field, value):
    with pytest.raises(ValueError):
        SamplingFields(**{field: value})


def test_tier_facts_travel_through_extra_args_and_back():
    assert TierFacts.from_extra_args(PREMIUM.to_extra_args(), {}, "free") == PREMIUM


def test_a_tier_named_alone_is_completed_from_the_known_tiers():
    assert TierFacts.from_extra_args({"tier": "premium"}, KNOWN, "free") == PREMIUM
    assert TierFacts.from_extra_args(None, KNOWN, "free") == FREE  # no tier: the default one
    faster = TierFacts.from_extra_args({"tier": "free", "tbt_slo_s": 0.25}, KNOWN, "free")
    assert faster == TierFacts("free", 0.25, 0.5, 1)


@pytest.mark.parametrize("extra, match", [
    ({"tier": "gold"}, "unknown tier 'gold'"),
    ({"tier": 7}, "tier must be a tier name"),
    ({"tier": "free", "tbt_slo_s": "fast"}, "tbt_slo_s"),
    ({"tier": "free", "tbt_slo_s": 0}, "tbt_slo_s"),
    ({"tier": "free", "tier_rank": -1}, "rank"),
    ({"tier": "free", "ttft_target_s": float("nan")}, "ttft_target_s"),
])
def test_bad_tier_metadata_is_refused_with_a_reason(extra, match):
    with pytest.raises(TierMetadataError, match=match):
        TierFacts.from_extra_args(extra, KNOWN, "free")


def _request(**kw) -> GenerateRequest:
    return GenerateRequest(**{"request_id": "cmpl-1", "prompt_token_ids": [1, 2, 3], "max_tokens": 4,
                              "tier": FREE, **kw})


def test_a_generate_request_knows_its_prompt_length_and_pickles_for_ray():
    req = _request(sampling=SamplingFields(temperature=0.5))
    assert req.prompt_len == 3
    assert pickle.loads(pickle.dumps(req)) == req


def test_a_retry_changes_the_request_id_only():
    req = _request()
    again = req.with_request_id("cmpl-1-retry1")
    assert again.request_id == "cmpl-1-retry1"
    assert (again.prompt_token_ids, again.max_tokens, again.tier, again.sampling) == (
        req.prompt_token_ids, req.max_tokens, req.tier, req.sampling)


@pytest.mark.parametrize("kw, match", [
    ({"request_id": ""}, "request_id"), ({"prompt_token_ids": []}, "empty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
])
def test_bad_generate_requests_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _request(**kw)


def test_prefix_hashes_travel_with_the_request_and_a_retry_keeps_them():
    from replica.prefix_hash import chained_block_hashes

    ids = list(range(1, 300))
    req = _request(prompt_token_ids=ids, prefix_hashes=chained_block_hashes(ids, 128), prefix_block_tokens=128)
    assert len(req.prefix_hashes) == 2 and pickle.loads(pickle.dumps(req)) == req
    again = req.with_request_id("cmpl-1-retry1")
    assert (again.prefix_hashes, again.prefix_block_tokens) == (req.prefix_hashes, 128)
    assert _request().prefix_hashes == () and _request().prefix_block_tokens == 0  # none by default
    assert _request(prefix_hashes=[], prefix_block_tokens=64).prefix_hashes == ()  # a prompt shorter than a block
    assert _request(prompt_token_ids=ids, prefix_hashes=[5], prefix_block_tokens=128).prefix_hashes == (5,)


@pytest.mark.parametrize("kw, match", [
    ({"prefix_block_tokens": -1}, "prefix_block_tokens"), ({"prefix_block_tokens": True}, "prefix_block_tokens"),
    ({"prefix_block_tokens": 2.0}, "prefix_block_tokens"),
    ({"prefix_hashes": (1,)}, "need a prefix_block_tokens"),
    ({"prefix_hashes": (1, 2), "prefix_block_tokens": 2}, "2 prefix hashes for a prompt of 3 tokens"),
    ({"prefix_hashes": (-1,), "prefix_block_tokens": 2}, r"integers in \[0, 2\*\*64\)"),
    ({"prefix_hashes": (1 << 64,), "prefix_block_tokens": 2}, "integers"),
    ({"prefix_hashes": ("x",), "prefix_block_tokens": 2}, "integers"),
])
def test_bad_prefix_signals_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _request(**kw)


def test_a_chunk_is_finished_when_it_has_a_finish_reason():
    assert not StreamChunk(num_tokens=1).finished
    assert StreamChunk(num_tokens=2, text="hi", finish_reason="stop").finished


def test_the_ingress_request_models_carry_the_sampling_fields():
    from serve_app.openai_api import ChatCompletionRequest, CompletionRequest

    for model in (CompletionRequest, ChatCompletionRequest):
        assert set(SamplingFields.model_fields) <= set(model.model_fields)
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 0.0, "user": "u"})
    assert req.sampling == SamplingFields(temperature=0.0)


def test_the_cached_token_count_rides_on_a_choices_first_chunk_and_survives_merging():
    first = StreamChunk(num_tokens=1, text="a", num_cached_tokens=256)
    assert StreamChunk(num_tokens=1).num_cached_tokens is None  # not reported
    merged = StreamChunk.merge([first, StreamChunk(num_tokens=2, text="b")])
    assert merged.num_cached_tokens == 256 and merged.text == "ab"
    assert StreamChunk.merge([StreamChunk(num_tokens=1), StreamChunk(num_tokens=2)]).num_cached_tokens is None
    assert StreamChunk.merge([StreamChunk(num_tokens=1, num_cached_tokens=0),
                              StreamChunk(num_tokens=2)]).num_cached_tokens == 0
