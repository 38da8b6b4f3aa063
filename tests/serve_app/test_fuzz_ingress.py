"""Bad input never gets a 5xx: property-based fuzzing of the OpenAI-compatible ingress.

Three layers, one oracle (`check_response`): no status >= 500; every non-2xx is a 4xx with
OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``; every 2xx is a valid
completion (JSON with ``usage``, or SSE ending in ``[DONE]`` with no error event) served at the
key's tier; bodies over ``max_request_bytes`` are 413, bodies that are not a JSON object are 400
``invalid_json``.

1. In process, no Ray (fast, most examples): hand-written hypothesis strategies of raw bodies
   (valid requests, wrong types, huge and negative numbers, NaN/Infinity literals, lone UTF-16
   surrogates, deep nesting, truncated or oversized JSON, token-id lists out of the vocabulary,
   unknown models, missing and extra fields incl. tier/priority/vllm_xargs) through the real
   `Ingress._serve` with a fake replica handle that records each payload (every payload must be
   of the key's tier).
2. Live: schemathesis against the ingress's OpenAPI document, built in process
   (``serve_app.ingress.app.openapi()``: the app does not serve ``/openapi.json``, ``/docs`` or
   ``/redoc``).  The ingress reads bodies by hand, so that document has no request bodies: the
   test adds them from the pydantic request models (``model_json_schema``) before generating
   positive and negative cases for both generation endpoints.
3. Live: the hand-written raw-body strategy against a loopback Serve app (sim backend).
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingress_testkit import call_inprocess, make_ingress
from replica.contract import MAX_STOP_CHARS, MAX_STOP_STRINGS, GenerateRequest, SamplingFields, TierFacts
from serve_app.openai_api import ChatCompletionRequest, CompletionRequest
from serve_app.tokenizer import default_tokenizer

MODEL = "mistral-7b-sim"
KEYS = {"premium": "fuzz-premium-key-9f3a", "free": "fuzz-free-key-77c1"}
CONTEXT = 256
LIMIT = 20_000  # max_request_bytes
DEFAULT_MAX_TOKENS = 8
VOCAB = default_tokenizer().vocab_size
OVERRIDES = {"max_request_bytes": LIMIT, "default_max_tokens": DEFAULT_MAX_TOKENS, "engine.time_scale": 0.01,
             "replicas.num_replicas": 1, "replicas.cpus_per_replica": 0, "router.feedback_period_s": 0.5}
SERVE_ENV_VARS = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items())}  # read by local_serve
FUZZ_SETTINGS = {"deadline": None, "database": None, "print_blob": True,
                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]}


# ------------------------------------------------------------------------------------ strategies

SURROGATES = ["\ud800", "\udfff", "\udbff", "x\ud83d", "\ude00y", "\ud83d\ude00"]  # the last: a valid pair
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "hello world", "日本語のテキスト", "\x00\x01", "🙂👍🏽", "\u202e", "null",
                     MODEL]),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(SURROGATES), st.text(max_size=4)),
    st.integers(0, 3 * CONTEXT).map(lambda n: "hello " * n),
)
huge_ints = st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**40, -(10**40)])
leaves = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints,
                   st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=10)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, good_in_10: int = 7) -> st.SearchStrategy:
    return st.integers(0, 9).flatmap(lambda i: good if i < good_in_10 else bad)


int_field = mostly(st.integers(-2, 12), st.one_of(huge_ints, st.booleans(), st.floats(), st.just("8"), json_values))
float_field = mostly(st.floats(-3, 3), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("0.5"),
                                                 st.booleans(), json_values), 5)
token_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3), huge_ints),
                     min_size=0, max_size=CONTEXT + 8)
prompts = mostly(st.one_of(texts, token_ids, st.lists(texts, max_size=3)), json_values, 8)
parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": mostly(texts, json_values, 8)}),
                  st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text", "audio"])}),
                  json_values)
messages = mostly(
    st.lists(st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant"]), texts)},
                                   optional={"content": st.one_of(st.none(), texts, st.lists(parts, max_size=3),
                                                                  json_values),
                                             "name": texts}),
             min_size=0, max_size=4),
    json_values, 8)
# fields a client might try to pick its tier (or the replica payload's fields) with
ESCALATION = {
    "tier": st.sampled_from(["premium", "PREMIUM", "free", "admin", 0]),
    "priority": st.sampled_from([-100, 0, 1, "high"]),
    "user": st.sampled_from(["premium", "admin"]),
    "vllm_xargs": st.just({"tier": "premium", "priority": -100, "tier_rank": 0}),
    "extra_body": st.just({"tier": "premium", "priority": 0}),
    "metadata": st.just({"tier": "premium"}),
    "service_tier": st.sampled_from(["priority", "scale", "default", "flex"]),
    "tier_rank": st.just(0),
    "tbt_slo_s": st.just(0.001),
    "request_id": st.just("cmpl-forged"),
    "prompt_token_ids": st.just([1, 2, 3]),
    "sampling": st.just({"tier": "premium"}),
}
COMMON_OPTIONAL = {
    "max_tokens": int_field, "stream": mostly(st.booleans(), json_values, 8),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "temperature": float_field, "top_p": float_field, "n": mostly(st.just(1), int_field, 8),
    "seed": mostly(st.integers(), json_values, 8), "stop": mostly(st.one_of(texts, st.lists(texts, max_size=3)),
                                                                   json_values, 8),
    "presence_penalty": float_field, "frequency_penalty": float_field, "ignore_eos": st.booleans(),
    **ESCALATION,
}
models = mostly(st.just(MODEL), st.one_of(st.sampled_from(["gpt-4o", MODEL.upper(), MODEL + " ", ""]), json_values))
completion_bodies = st.fixed_dictionaries(
    {"model": models, "prompt": prompts},
    optional={**COMMON_OPTIONAL, "echo": st.booleans(), "logprobs": int_field, "junk": json_values})
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": messages},
    optional={**COMMON_OPTIONAL, "max_completion_tokens": int_field, "junk": json_values})
# well-formed requests (every field of a valid type and range; the tier fields are still there)
# (one text in ten is not: a lone surrogate or a JSON-escaped emoji, in otherwise valid requests)
good_text = mostly(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
                   st.builds(lambda a, s: a + s, st.text(max_size=4), st.sampled_from(SURROGATES)), 9)
GOOD_OPTIONAL = {
    "max_tokens": st.one_of(st.none(), st.integers(1, 12)), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.just(1),
    "seed": st.integers(-(2**63), 2**63 - 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "ignore_eos": st.booleans(),
    "user": good_text, "service_tier": st.sampled_from(["auto", "default", "flex", "priority"]),
}
good_models = mostly(st.just(MODEL), st.one_of(texts, st.sampled_from(["gpt-4o", MODEL.upper()])), 9)
good_completion_bodies = st.fixed_dictionaries(
    {"model": good_models, "prompt": st.one_of(good_text, st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                       max_size=40), st.lists(good_text, min_size=1,
                                                                                              max_size=1))},
    optional={**GOOD_OPTIONAL, "echo": st.booleans()})
good_chat_bodies = st.fixed_dictionaries(
    {"model": good_models,
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "assistant"])},
         optional={"content": st.one_of(good_text, st.lists(st.fixed_dictionaries(
             {"type": st.just("text"), "text": good_text}), max_size=2))}), min_size=1, max_size=3)},
    optional={**GOOD_OPTIONAL, "max_completion_tokens": st.integers(1, 12)})
dropped = st.sampled_from([(), (), (), (), (), (), ("model",), ("prompt", "messages"), ("model", "prompt", "messages")])


def _encode(body: dict[str, Any], drop: tuple[str, ...], ascii_escapes: bool) -> bytes:
    body = {k: v for k, v in body.items() if k not in drop}
    # allow_nan: NaN / Infinity literals; ensure_ascii=False + surrogatepass: raw surrogate bytes
    text = json.dumps(body, allow_nan=True, ensure_ascii=ascii_escapes)
    return text.encode("utf-8", "surrogatepass")


MUTATIONS = {
    "as is": lambda b, n: b,
    "truncated": lambda b, n: b[: n % max(len(b), 1)],
    "in a list": lambda b, n: b"[" + b + b"]",
    "deeply nested": lambda b, n: b"[" * (10, 900, 5000)[n % 3] + b + b"]" * (10, 900, 5000)[n % 3],
    "deep value": lambda b, n: b[:-1] + b', "junk2": ' + b"[" * 3000 + b"]" * 3000 + b"}" if b.endswith(b"}") else b,
    "oversized": lambda b, n: b + b" " * (LIMIT + 1 - len(b) + n % 100),
    "trailing junk": lambda b, n: b + b"}{",
    "utf-16": lambda b, n: b.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"),
}


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(chat?, raw body bytes)."""
    chat = draw(st.booleans())
    kind = draw(st.sampled_from(["json"] * 6 + ["literal", "binary"]))
    if kind == "literal":
        return chat, draw(st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999", b"NaN", b"{", b"{}",
                                           b"\xef\xbb\xbf{}",
                                           b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "max_tokens": NaN}',
                                           b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "max_tokens": 1e999}',
                                           b'{"model": "' + MODEL.encode()
                                           + b'", "prompt": "hi", "temperature": -Infinity}']))
    if kind == "binary":
        return chat, draw(st.binary(max_size=64))
    if draw(st.booleans()):
        body, drop = draw(good_chat_bodies if chat else good_completion_bodies), ()
    else:
        body, drop = draw(chat_bodies if chat else completion_bodies), draw(dropped)
    raw = _encode(body, drop, draw(st.booleans()))
    mutation = draw(st.sampled_from(["as is"] * 8 + sorted(MUTATIONS)))
    return chat, MUTATIONS[mutation](raw, draw(st.integers(0, 10**6)))


# ------------------------------------------------------------------------------------------ oracle

def _parses_as_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def _max_tokens_of(raw: bytes, chat: bool) -> int | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("max_completion_tokens") if chat and data.get("max_completion_tokens") is not None \
        else data.get("max_tokens")
    return value if type(value) is int else None


def served_tier(ingress, raw: bytes, tier: str) -> str:  # noqa: ANN001
    """The tier a request of a ``tier`` key is served at: its own, or the cheaper one its
    ``service_tier`` asks for (`serve_app.service_tier`; never above the key's)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return tier
    requested = data.get("service_tier") if isinstance(data, dict) else None
    if requested not in ("auto", "default", "flex", "priority"):
        return tier
    return ingress.service_tiers.serve(tier, requested).tier


def check_response(status: int, headers: dict[str, str], content: bytes, *, chat: bool, tier: str,
                   raw: bytes | None = None, served: str | None = None) -> None:
    """The oracle (see the module docstring).  ``headers``: lower-case names; ``raw``: the body
    sent, when known (enables the 413 / invalid_json / max_tokens expectations); ``tier``: the
    key's; ``served``: the tier that serves the request (default: the key's)."""
    served = tier if served is None else served
    assert status < 500, f"{status}: {content[:500]!r}"
    if raw is not None and len(raw) > LIMIT:
        assert status == 413, (status, content[:300])
    if status >= 300:
        assert 400 <= status < 500, (status, content[:300])
        body = json.loads(content)
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and isinstance(err["code"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        if raw is not None and len(raw) <= LIMIT and not _parses_as_object(raw):
            assert (status, err["code"]) == (400, "invalid_json"), (status, err)
        if status == 401:
            assert headers.get("www-authenticate") == "Bearer"
        else:
            assert headers.get("x-tier") in (tier, served)
        return
    assert status == 200 and headers.get("x-tier") == served, (status, headers)
    assert raw is None or _parses_as_object(raw)
    max_tokens = _max_tokens_of(raw, chat) if raw is not None else None
    if headers.get("content-type", "").startswith("text/event-stream"):
        text = content.decode()
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert all(e for e in events) and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and not any("error" in c for c in chunks), chunks[-3:]
        want = "chat.completion.chunk" if chat else "text_completion"
        assert all(c["object"] == want and c["model"] == MODEL for c in chunks)
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finals == ["length"] or finals == ["stop"], finals
        n = sum(1 for c in chunks if c["choices"]
                and (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content")))
        assert 1 <= n <= (max_tokens or CONTEXT)
        return
    body = json.loads(content)
    assert body["object"] == ("chat.completion" if chat else "text_completion") and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert isinstance(text, str) and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert all(type(usage[k]) is int for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    assert usage["prompt_tokens"] >= 1 and 1 <= usage["completion_tokens"] <= (max_tokens or CONTEXT)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT


# ------------------------------------------------------------------------- in process (no Ray)

@pytest.fixture(scope="module")
def inprocess():
    return make_ingress(SERVE_ENV_VARS["TIERED_API_KEYS"], OVERRIDES, CONTEXT)


def _auth(tier: str = "free") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tier]}")]


def test_inprocess_fuzz_never_5xx_and_payloads_keep_the_key_tier(inprocess):
    ingress, replicas = inprocess
    outcomes: dict[int, int] = {}

    @settings(max_examples=500, **FUZZ_SETTINGS)
    @given(req=raw_requests(), tier=st.sampled_from(["free", "free", "premium"]))
    def run(req: tuple[bool, bytes], tier: str) -> None:
        chat, raw = req
        replicas.payloads.clear()
        status, headers, content = call_inprocess(ingress, raw, _auth(tier), chat=chat)
        outcomes[status] = outcomes.get(status, 0) + 1
        served = served_tier(ingress, raw, tier)
        check_response(status, headers, content, chat=chat, tier=tier, raw=raw, served=served)
        assert len(replicas.payloads) == (1 if status == 200 else 0)
        for p in replicas.payloads:  # the replica sees the tier served (at most the key's) and its SLO
            t = ingress.config.tier(served)
            assert p.tier == TierFacts(name=served, tbt_slo_s=t.tbt_slo_s, ttft_target_s=t.ttft_target_s,
                                       rank=t.rank, stream_interval_s=t.stream_interval_s) == t.facts()
            assert p.request_id.startswith("chatcmpl-" if chat else "cmpl-")
            assert type(p) is GenerateRequest and type(p.sampling) is SamplingFields
            sampling = p.sampling.model_dump(exclude_none=True)
            assert set(sampling) <= {"temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                                     "frequency_penalty", "ignore_eos", "stop"}  # the fields the strategies send
            assert all(not isinstance(v, float) or math.isfinite(v) for v in sampling.values())
            stops = sampling.get("stop", [])
            stops = [stops] if isinstance(stops, str) else stops
            assert len(stops) <= MAX_STOP_STRINGS and all(type(x) is str and 0 < len(x) <= MAX_STOP_CHARS
                                                          for x in stops)
            assert 1 <= p.prompt_len == len(p.prompt_token_ids) and p.prompt_len + p.max_tokens <= CONTEXT
            assert all(type(i) is int and 0 <= i < VOCAB for i in p.prompt_token_ids)

    run()
    print(f"in-process fuzz: statuses {outcomes}")
    # the strategies reach both sides: accepted requests and each kind of rejection
    assert outcomes.get(200, 0) >= 20 and {400, 404, 413} <= set(outcomes), outcomes


M = MODEL
# Each of these was a 500 before the ingress checked for it (found by the fuzzers above).
FIVE_HUNDREDS = [
    ("deeply nested body (RecursionError in json.loads)", False, b"[" * 9000 + b"]" * 9000, 400, "invalid_json"),
    ("deeply nested field", False, b'{"model": "%s", "prompt": "a", "stop": ' % M.encode() + b"[" * 5000 + b"]" * 5000
     + b"}", 400, "invalid_json"),
    ("lone surrogate in the prompt (tokenizer TypeError)", False,
     b'{"model": "%s", "prompt": "abc\\ud800", "max_tokens": 2}' % M.encode(), 400, "invalid_json"),
    ("lone surrogate in the model (404 body not UTF-8 encodable)", False,
     b'{"model": "\\udfff", "prompt": "abc", "max_tokens": 2}', 400, "invalid_json"),
    ("surrogate bytes in the body", False,
     b'{"model": "%s", "prompt": "abc\xed\xa0\x80", "max_tokens": 2}' % M.encode(), 400, "invalid_json"),
    ("lone surrogate in a UTF-16 body (json.loads decodes bytes with surrogatepass)", True,
     ('{"model": "%s", "messages": [{"role": "user", "content": "\ud800"}]}' % M).encode("utf-16", "surrogatepass"),
     400, "invalid_json"),
    ("lone surrogate in a UTF-16-LE body that is also valid UTF-8", False,
     ('{"model": "%s", "prompt": "\ud800\u0080", "max_tokens": 2}' % M).encode("utf-16-le", "surrogatepass"),
     400, "invalid_json"),
    ("lone surrogate in a chat text part", True,
     b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'
     % M.encode(), 400, "invalid_json"),
    ("lone surrogate in a chat role", True,
     b'{"model": "%s", "messages": [{"role": "\\ud800", "content": "hi"}]}' % M.encode(), 400, "invalid_json"),
    ("lone surrogate in a dict key", False,
     b'{"model": "%s", "prompt": "hi", "\\ud800": 1}' % M.encode(), 400, "invalid_json"),
    ("chat text part that is not a string", True,
     b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": [[[1]]]}]}]}'
     % M.encode(), 400, "invalid_value"),
]
# Wrong types are 400s, as in OpenAI's API, not coerced (they were accepted before).
WRONG_TYPES = [
    ("max_tokens as a string", {"max_tokens": "8"}), ("max_tokens as a bool", {"max_tokens": True}),
    ("max_tokens as a float", {"max_tokens": 8.0}), ("stream as a string", {"stream": "true"}),
    ("stream as an int", {"stream": 1}), ("n as a bool", {"n": True}), ("seed as a float", {"seed": 1.5}),
    ("temperature as a string", {"temperature": "0.5"}), ("top_p as a bool", {"top_p": True}),
    ("temperature Infinity", {"temperature": math.inf}), ("temperature NaN", {"temperature": math.nan}),
    ("token id as a bool", {"prompt": [1, True]}), ("token id as a float", {"prompt": [1.0, 2.0]}),
    ("echo as a string", {"echo": "yes"}), ("ignore_eos as an int", {"ignore_eos": 0}),
]
# Valid requests that look like the bad ones: still 200.
STILL_FINE = [
    ("a valid surrogate pair (emoji as escapes)", False,
     b'{"model": "%s", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}' % M.encode()),
    ("an escaped backslash before ud800", False,
     b'{"model": "%s", "prompt": "\\\\ud800", "max_tokens": 2}' % M.encode()),
    ("ints for float fields", False, b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "temperature": 1, "top_p": 1}'
     % M.encode()),
    ("fields the sim cannot honour, sent as nothing", False,
     b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "stop_token_ids": null, "logit_bias": {}, "stop": [],'
     b' "response_format": {"type": "text"}, "tools": [], "n": 1, "best_of": 1}' % M.encode()),
    ("a UTF-16 body", False, ('{"model": "%s", "prompt": "h\u00e9 \U0001f642", "max_tokens": 2}' % M).encode("utf-16")),
    ("a BOM before the JSON", False, b'\xef\xbb\xbf{"model": "%s", "prompt": "hi", "max_tokens": 2}' % M.encode()),
    ("chat with two text parts", True,
     b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},'
     b' {"type": "text", "text": "there"}]}]}' % M.encode()),
]
# Fields that used to be ignored: now refused, naming them (nothing a client sends is dropped).
NOT_IGNORED = [
    ("nested but shallow junk in an unknown field", False,
     b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "junk": ' % M.encode() + b"[" * 50 + b"]" * 50 + b"}",
     "junk"),
    ("chat with text and image parts", True,
     b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},'
     b' {"type": "image_url", "image_url": {"url": "x"}}]}]}' % M.encode(), "messages.0.content.1.type"),
]


@pytest.mark.parametrize("chat,raw,param", [c[1:] for c in NOT_IGNORED], ids=[c[0] for c in NOT_IGNORED])
def test_what_was_once_ignored_is_refused_naming_it(inprocess, chat, raw, param):
    status, headers, content = call_inprocess(inprocess[0], raw, _auth(), chat=chat)
    check_response(status, headers, content, chat=chat, tier="free", raw=raw)
    assert status == 400 and json.loads(content)["error"]["param"] == param, content


@pytest.mark.parametrize("chat,raw,status,code", [c[1:] for c in FIVE_HUNDREDS], ids=[c[0] for c in FIVE_HUNDREDS])
def test_former_500s_are_openai_4xx(inprocess, chat, raw, status, code):
    got, headers, content = call_inprocess(inprocess[0], raw, _auth(), chat=chat)
    check_response(got, headers, content, chat=chat, tier="free", raw=raw)
    assert (got, json.loads(content)["error"]["code"]) == (status, code), content


@pytest.mark.parametrize("fields", [c[1] for c in WRONG_TYPES], ids=[c[0] for c in WRONG_TYPES])
def test_wrong_types_are_400(inprocess, fields):
    raw = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}, allow_nan=True).encode()
    status, headers, content = call_inprocess(inprocess[0], raw, _auth())
    check_response(status, headers, content, chat=False, tier="free", raw=raw)
    err = json.loads(content)["error"]
    assert (status, err["code"]) == (400, "invalid_value") and err["param"].split(".")[0] == next(iter(fields))


@pytest.mark.parametrize("chat,raw", [c[1:] for c in STILL_FINE], ids=[c[0] for c in STILL_FINE])
def test_lookalikes_of_bad_input_are_served(inprocess, chat, raw):
    status, headers, content = call_inprocess(inprocess[0], raw, _auth(), chat=chat)
    check_response(status, headers, content, chat=chat, tier="free", raw=raw)
    assert status == 200, content


# ------------------------------------------------------------------------------------------ live

@pytest.fixture(scope="module")
def base_url(local_serve):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app({"overrides": OVERRIDES, "max_context_tokens": CONTEXT}), name="fuzz", route_prefix="/")
    return f"http://127.0.0.1:{local_serve}"


def augmented_openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """The ingress's OpenAPI document with the generation endpoints' request bodies (from the
    pydantic models the ingress validates with) and the Bearer security scheme.  ``model`` is an
    enum of the served model so positive cases get past the model check (negative cases send
    others); ``max_tokens`` is kept small in positive cases (negative ones send any integer)."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for path, cls in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        s = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        s["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        small = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, {"type": "null"}]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in s["properties"]:
                s["properties"][field] = small
        schemas[cls.__name__] = s
        spec["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{cls.__name__}"}}}}
    return spec


def ingress_openapi() -> dict[str, Any]:
    """The ingress's OpenAPI document, built in process: FastAPI's ``app.openapi()`` works whether or
    not the app serves it (``openapi_url=None``), and the app must not serve it publicly."""
    from serve_app.ingress import app

    return app.openapi()


def test_schemathesis_against_the_ingress_openapi(base_url):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    spec = ingress_openapi()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    schema = schemathesis.openapi.from_dict(augmented_openapi(spec))
    ops = [schema["/v1/completions"]["POST"], schema["/v1/chat/completions"]["POST"]]
    strategy = st.one_of(*[op.as_strategy(generation_mode=mode) for op in ops
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    auth = {"Authorization": f"Bearer {KEYS['free']}"}
    statuses: dict[int, int] = {}

    @settings(max_examples=200, **FUZZ_SETTINGS)
    @given(case=strategy)
    def run(case) -> None:  # noqa: ANN001
        resp = case.call(base_url=base_url, headers=auth, timeout=30)
        case.validate_response(resp, checks=[not_a_server_error])
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        headers = {k.lower(): (v[0] if isinstance(v, list) else v) for k, v in resp.headers.items()}
        check_response(resp.status_code, headers, resp.content, chat="chat" in case.path, tier="free")

    run()
    print(f"schemathesis: statuses {statuses}")
    assert statuses.get(200, 0) >= 5 and any(400 <= s < 500 for s in statuses), statuses


def test_live_raw_fuzz_never_5xx(base_url):
    outcomes: dict[int, int] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:

        @settings(max_examples=250, **FUZZ_SETTINGS)
        @given(req=raw_requests())
        def run(req: tuple[bool, bytes]) -> None:
            chat, raw = req
            path = "/v1/chat/completions" if chat else "/v1/completions"
            r = client.post(path, content=raw, headers={"Authorization": f"Bearer {KEYS['free']}",
                                                        "Content-Type": "application/json"})
            outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
            check_response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, chat=chat,
                           tier="free", raw=raw)

        start = time.monotonic()
        run()
        # hypothesis may discard its oversized examples (data_too_large): send one for sure
        oversized = MUTATIONS["oversized"](json.dumps({"model": MODEL, "prompt": "hi"}).encode(), 0)
        r = client.post("/v1/completions", content=oversized, headers={"Authorization": f"Bearer {KEYS['free']}",
                                                                       "Content-Type": "application/json"})
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        check_response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, chat=False,
                       tier="free", raw=oversized)
    print(f"live raw fuzz: statuses {outcomes} in {time.monotonic() - start:.1f} s")
    assert outcomes.get(200, 0) >= 10 and {400, 413} <= set(outcomes), outcomes
    assert time.monotonic() - start < 120
