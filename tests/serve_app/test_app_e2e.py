"""The whole app end to end on a local loopback Ray Serve: HTTP -> Ingress -> tier-aware router ->
3 simulated replicas, through httpx and the openai SDK."""

import json

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from serve_app.app import build_app  # noqa: E402
from serve_app.tokenizer import default_tokenizer  # noqa: E402

MODEL = "mistral-7b-sim"
KEYS = {"premium": "test-premium-key-123", "free": "test-free-key-456"}
CONTEXT = 512


SERVE_ENV_VARS = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items())}  # read by local_serve


@pytest.fixture(scope="module")
def base_url(local_serve):
    serve.run(build_app({"overrides": {"engine.time_scale": 0.05, "replicas.num_replicas": 3,
                                       "replicas.cpus_per_replica": 0, "max_request_bytes": 20_000,
                                       "router.feedback_period_s": 0.5},
                         "max_context_tokens": CONTEXT}),
              name="tiered", route_prefix="/")
    return f"http://127.0.0.1:{local_serve}"


def _auth(tier="free"):
    return {"Authorization": f"Bearer {KEYS[tier]}"}


def _sse_events(resp) -> list[str]:
    """The ``data:`` payloads of an SSE response, read line by line: every event is one
    ``data: ...`` line followed by a blank line."""
    events, expect_blank = [], False
    for line in resp.iter_lines():
        if expect_blank:
            assert line == "", f"no blank line after an event: {line!r}"
            expect_blank = False
        elif line:
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
            expect_blank = True
    assert not expect_blank, "the stream did not end with a blank line"
    return events


def _assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_health_and_models(base_url):
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["replicas"] >= 1  # the replicas answer the ingress's poll
    r = httpx.get(f"{base_url}/v1/models", headers=_auth())
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]


def test_streaming_completion_sse_framing_and_done(base_url):
    body = {"model": MODEL, "prompt": "Hello world, stream me some tokens.", "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=_auth(), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-tier"] == "free"
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]".removeprefix("data: ")
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]  # the last one carries the finish
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    # the first token alone, the rest in the replica's coalesced batches (at most one per token)
    tok = default_tokenizer()
    assert tokens[0]["choices"][0]["text"] == tok.sim_token_text(1) and 2 <= len(tokens) <= 7
    assert "".join(c["choices"][0]["text"] for c in tokens) == tok.sim_text(1, 7)
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert [c["choices"][0]["finish_reason"] for c in final] == ["length"]
    usage = chunks[-1]["usage"]
    n_prompt = default_tokenizer().count(body["prompt"])
    assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] <= n_prompt  # the engine's prefix cache
    assert usage == {"prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7}


def test_non_streaming_usage_counts(base_url):
    prompt = "The quick brown fox jumps over the lazy dog " * 3
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5},
                   headers=_auth("premium"), timeout=30)
    assert r.status_code == 200 and r.headers["x-tier"] == "premium"
    out = r.json()
    n_prompt = default_tokenizer().count(prompt)
    assert 0 <= out["usage"].pop("prompt_tokens_details")["cached_tokens"] <= n_prompt
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}
    assert out["choices"][0]["finish_reason"] == "length" and out["choices"][0]["text"]


def test_chat_streaming_and_non_streaming(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True},
                      headers=_auth(), timeout=30) as r:
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == default_tokenizer().sim_text(1, 4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_missing_and_unknown_keys_are_401(base_url):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body)
    _assert_error(r, 401, "invalid_api_key")
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": "Bearer not-a-real-key"})
    _assert_error(r, 401, "invalid_api_key")
    assert "not-a-real-key" not in r.text


def test_a_free_key_cannot_ask_for_premium(base_url):
    """Asking with OpenAI's service_tier is served at the key's tier (and says so); fields that
    would pick a tier are refused, naming the field, never ignored."""
    body = {"model": MODEL, "prompt": "make me premium", "max_tokens": 2, "service_tier": "priority",
            "priority": 0, "user": "premium"}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers={**_auth("free"), "x-tier": "premium"},
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-tier"] == "free" and r.json()["service_tier"] == "default"
    for field, value in (("tier", "premium"), ("vllm_xargs", {"tier": "premium"}), ("priority", -5)):
        r = httpx.post(f"{base_url}/v1/completions", json={**body, field: value}, headers=_auth("free"), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "lots"}, 400, "invalid_value"),
    ({"model": MODEL, "max_tokens": 3}, 400, "invalid_value"),
    ({"model": "gpt-unknown", "prompt": "hi", "max_tokens": 3}, 404, "model_not_found"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "hello " * (CONTEXT + 10), "max_tokens": 3}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": [5] * (CONTEXT - 4), "max_tokens": 5}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": [5, 10**9], "max_tokens": 3}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": -1}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 3, "top_p": 0}, 400, "invalid_value"),
    ({"model": MODEL, "prompt": "x" * 30_000, "max_tokens": 3}, 413, "request_too_large"),
])
def test_bad_inputs_get_openai_errors(base_url, body, status, code):
    kw = {"content": body, "headers": {**_auth(), "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": _auth()}
    r = httpx.post(f"{base_url}/v1/completions", timeout=30, **kw)
    _assert_error(r, status, code)


def test_without_max_tokens_a_request_gets_what_the_context_leaves(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": [5] * (CONTEXT - 3)},
                   headers=_auth(), timeout=30)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] <= CONTEXT - 3
    assert usage == {"prompt_tokens": CONTEXT - 3, "completion_tokens": 3, "total_tokens": CONTEXT}


def test_a_prompt_filling_the_whole_context_is_rejected(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": [5] * CONTEXT}, headers=_auth(),
                   timeout=30)
    _assert_error(r, 400, "context_length_exceeded")


def test_streaming_through_the_openai_sdk(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEYS["premium"], max_retries=0, timeout=30)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 6
    comp = client.completions.create(model=MODEL, prompt="hello world", max_tokens=3)
    assert comp.usage.completion_tokens == 3 and comp.choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0).models.list()



@pytest.fixture(scope="module")
def single_replica(base_url):
    """A second app on the same Serve: one replica at real GPU pace, so a stream stays open."""
    serve.run(build_app({"overrides": {"engine.time_scale": 1.0, "replicas.num_replicas": 1,
                                       "replicas.cpus_per_replica": 0}}),
              name="one", route_prefix="/one")
    return f"{base_url}/one", serve.get_deployment_handle("LLMReplica", app_name="one")


def test_client_disconnect_mid_stream_aborts_the_engine_request(single_replica):
    import time

    url, replica = single_replica
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", headers=_auth("free"), json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert replica.num_unfinished.remote().result() == 1  # 2000 tokens take ~40 s here
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while replica.num_unfinished.remote().result() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replica.num_unfinished.remote().result() == 0
