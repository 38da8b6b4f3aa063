"""Each response shape is rendered once for both endpoints (`serve_app.render`)."""

from __future__ import annotations

import json

import pytest

from replica.contract import StreamChunk
from serve_app.openai_api import RequestError
from serve_app.render import DONE_EVENT, Renderer
from serve_app.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _event(text: str) -> dict:
    assert text.startswith("data: ") and text.endswith("\n\n")
    return json.loads(text[len("data: "):])


@pytest.mark.parametrize("chat, obj, key", [(False, "text_completion", "text"), (True, "chat.completion", "message")])
def test_the_whole_response_has_the_endpoints_shape(tok, chat, obj, key):
    body = Renderer("m", tok, chat=chat).response("id-1", "hello", "length", 3, 2)
    assert body["object"] == obj and body["model"] == "m" and body["id"] == "id-1"
    [choice] = body["choices"]
    assert key in choice and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert (choice["message"]["content"] if chat else choice["text"]) == "hello"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_stream_events_of_both_endpoints(tok):
    comp, chat = Renderer("m", tok, chat=False), Renderer("m", tok, chat=True)
    e = _event(comp.chunk_event("id", 7, "hi", None))
    assert e["object"] == "text_completion" and e["choices"][0]["text"] == "hi" and e["created"] == 7
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


def test_engine_text_is_used_as_is_and_simulated_tokens_read_as_the_tokenizers_text(tok):
    r = Renderer("m", tok, chat=False)
    assert r.text(StreamChunk(num_tokens=3, text=" world"), 1) == " world"
    # the simulated engine has no text: a chunk of tokens 2..4 reads as those three tokens
    assert r.text(StreamChunk(num_tokens=4), 1) == "".join(tok.sim_token_text(n) for n in (2, 3, 4))
    assert r.text(StreamChunk(num_tokens=1), 0) == tok.sim_token_text(1)
