"""Each response shape is rendered once for both endpoints (`serve_app.render`)."""

from __future__ import annotations

import json

import pytest

from replica.contract import StreamChunk, TokenLogprob
from serve_app.openai_api import RequestError
from serve_app.render import DONE_EVENT, LOGPROB_FLOOR, Choice, Renderer, usage
from serve_app.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _event(text: str) -> dict:
    assert text.startswith("data: ") and text.endswith("\n\n")
    return json.loads(text[len("data: "):])


def _choice(index: int, text: str, num_tokens: int, finish: str = "length") -> Choice:
    c = Choice(index)
    c.parts, c.num_tokens, c.finish_reason = [text], num_tokens, finish
    return c


@pytest.mark.parametrize("chat, obj, key", [(False, "text_completion", "text"), (True, "chat.completion", "message")])
def test_the_whole_response_has_the_endpoints_shape(tok, chat, obj, key):
    body = Renderer("m", tok, chat=chat).response("id-1", [_choice(0, "hello", 2)], 3, service_tier="default")
    assert body["object"] == obj and body["model"] == "m" and body["id"] == "id-1"
    assert body["service_tier"] == "default"
    [choice] = body["choices"]
    assert key in choice and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert (choice["message"]["content"] if chat else choice["text"]) == "hello"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("chat", [False, True])
def test_usage_says_how_many_prompt_tokens_the_prefix_cache_held(tok, chat):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``, in the whole response and in the
    stream's usage event."""
    r = Renderer("m", tok, chat=chat)
    body = r.response("id-1", [_choice(0, "hello", 2)], 300, cached_tokens=256)
    assert body["usage"] == {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302,
                             "prompt_tokens_details": {"cached_tokens": 256}}
    event = _event(r.usage_event("id-1", 7, 300, 2, cached_tokens=128))
    assert event["usage"]["prompt_tokens_details"] == {"cached_tokens": 128} and event["choices"] == []
    assert _event(r.usage_event("id-1", 7, 300, 2))["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_stream_events_of_both_endpoints(tok):
    comp, chat = Renderer("m", tok, chat=False), Renderer("m", tok, chat=True)
    e = _event(comp.chunk_event("id", 7, "hi", None))
    assert e["object"] == "text_completion" and e["choices"][0]["text"] == "hi" and e["created"] == 7
    assert "service_tier" not in e  # only when given
    first = _event(chat.chunk_event("id", 7, "", None, first=True))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                           "content": ""}
    last = _event(chat.chunk_event("id", 7, None, "stop"))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = _event(chat.usage_event("id", 7, 4, 6))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10
    err = _event(Renderer.error_event(RequestError(500, "boom", type="server_error")))
    assert err["error"]["message"] == "boom"
    assert DONE_EVENT == "data: [DONE]\n\n"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("text, finish, index, tier, usage_now", [
    ("hi", None, 0, None, None),
    ("", "length", 1, "default", None),
    (None, "stop", 0, "flex", None),
    ('quote " back \\ nl \n tab \t é 日本 \u2028 \x00', None, 2, None, (64, 10, 0)),
    ("x", "abort", 0, "priority", (3, 0, 0)),
    ("y", None, 1, "default", (1024, 7, 896)),
])
def test_the_preformatted_stream_event_is_the_same_json_as_the_generic_one(tok, chat, text, finish, index, tier,
                                                                          usage_now):
    r = Renderer("m", tok, chat=chat)
    fast = r.stream_events("id-1", 7, tier).text(index, text, finish, usage_now)
    if not chat and text is None:
        text = ""  # completions always carry a text
    generic = r.chunk_event("id-1", 7, text, finish, index=index, service_tier=tier,
                            usage=None if usage_now is None else usage(*usage_now))
    assert fast == generic


def test_engine_text_is_used_as_is_and_simulated_tokens_read_as_the_tokenizers_text(tok):
    r = Renderer("m", tok, chat=False)
    assert r.text(StreamChunk(num_tokens=3, text=" world"), 1) == " world"
    # the simulated engine has no text: a chunk of tokens 2..4 reads as those three tokens
    assert r.text(StreamChunk(num_tokens=4), 1) == "".join(tok.sim_token_text(n) for n in (2, 3, 4))
    assert r.text(StreamChunk(num_tokens=1), 0) == tok.sim_token_text(1)


@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_are_rendered_by_index_and_usage_counts_them_all(tok, chat):
    body = Renderer("m", tok, chat=chat).response("id", [_choice(0, "a", 3, "stop"), _choice(1, "b", 5)], 4,
                                                  echo_text="P: ")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    texts = [c["message"]["content"] if chat else c["text"] for c in body["choices"]]
    assert texts == ["P: a", "P: b"]  # echo starts every choice
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_every_stream_event_carries_its_choice_index_and_the_service_tier(tok):
    e = _event(Renderer("m", tok, chat=True).chunk_event("id", 7, "x", None, index=3, service_tier="flex"))
    assert e["choices"][0]["index"] == 3 and e["service_tier"] == "flex"
    u = _event(Renderer("m", tok, chat=False).usage_event("id", 7, 1, 2, service_tier="flex"))
    assert u["service_tier"] == "flex"


# vLLM's order of a position's candidates: the sampled token first, then the top ones
SAMPLED = TokenLogprob(token_id=10, token="b", logprob=-2.0, top=((10, "b", -2.0), (11, "a", -0.5), (12, None, float("-inf"))))


def test_completion_logprobs_have_tokens_offsets_and_the_top_n_plus_the_sampled_token(tok):
    """OpenAI's completions shape as vLLM builds it: top_logprobs keeps entries i <= N of the
    engine's candidates (the sampled token and the top N); -inf is clipped to -9999; a token the
    engine did not detokenize is decoded alone; the prompt's first token has no logprob."""
    r = Renderer("m", tok, chat=False)
    lp = r.logprobs([1, 10, 10], [None, SAMPLED, SAMPLED], top=2, text_offset=5)
    assert lp["tokens"] == [tok.hf.decode([1]), "b", "b"]
    assert lp["token_logprobs"] == [None, -2.0, -2.0]
    assert lp["text_offset"] == [5, 5 + len(tok.hf.decode([1])), 6 + len(tok.hf.decode([1]))]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"b": -2.0, "a": -0.5, tok.hf.decode([12]): LOGPROB_FLOOR}
    assert r.logprobs([10], [SAMPLED], top=0)["top_logprobs"] == [{"b": -2.0}]


def test_chat_logprobs_list_the_first_top_logprobs_candidates_with_their_bytes(tok):
    lp = Renderer("m", tok, chat=True).logprobs([10], [SAMPLED], top=2)
    [entry] = lp["content"]
    assert entry["token"] == "b" and entry["logprob"] == -2.0 and entry["bytes"] == [98]
    assert entry["top_logprobs"] == [{"token": "b", "logprob": -2.0, "bytes": [98]},
                                     {"token": "a", "logprob": -0.5, "bytes": [97]}]
    assert Renderer("m", tok, chat=True).logprobs([10], [SAMPLED], top=0)["content"][0]["top_logprobs"] == []
