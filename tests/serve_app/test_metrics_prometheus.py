"""The app's metrics on a real loopback Ray Serve, read back from the node's Prometheus endpoint:
a few requests of each tier (streaming and not) and a few rejections go through the app, then the
per-tier histograms, counters and replica gauges must show up on
``http://127.0.0.1:METRICS_PORT/metrics`` with their tags and plausible values."""

import time
from collections import defaultdict

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")
from ray import serve  # noqa: E402

from serve_app import metrics as m  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.ray_loopback import require_loopback, runtime_env  # noqa: E402
from loadtest.ports import free_port as _free_port

pytestmark = pytest.mark.timeout(180)

MODEL = "mistral-7b-sim"
KEYS = {"premium": "metrics-premium-key-1", "free": "metrics-free-key-2"}
APP = "tiered-metrics"
CONTEXT = 512
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def serve_with_metrics(tmp_path_factory, check_ray_auth):
    """Like conftest's ``local_serve`` (a closed cluster: its Prometheus exporter on 127.0.0.1 too; Ray
    token authentication on, with the session's token), but with
    a known metrics export port and Ray's metrics reported every second (default: 10 s).  Yields
    (http_port, metrics_port)."""
    env_vars = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items())}
    http_port, metrics_port = _free_port(), _free_port()
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env=runtime_env(env_vars))
    try:
        assert ray._private.worker.global_worker.node.metrics_export_port == metrics_port
        require_loopback()
        check_ray_auth(ray)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app({"overrides": {"engine.time_scale": 0.05, "replicas.num_replicas": 2,
                                           "replicas.cpus_per_replica": 0, "max_request_bytes": 20_000,
                                           "router.feedback_period_s": 0.5},
                             "max_context_tokens": CONTEXT}),
                  name=APP, route_prefix="/")
        yield http_port, metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def _scrape(metrics_port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{series name: [(labels, value)]} of this app's tiered_* series."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    out: dict[str, list] = defaultdict(list)
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_tiered_") and s.labels.get("application") == APP:
                out[s.name].append((s.labels, s.value))
    return out


def _total(series, name, **labels) -> float:
    return sum(v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def scraped(serve_with_metrics):
    http_port, metrics_port = serve_with_metrics
    base = f"http://127.0.0.1:{http_port}"
    auth = {t: {"Authorization": f"Bearer {k}"} for t, k in KEYS.items()}
    body = {"model": MODEL, "prompt": "Hello there, how are you today?", "max_tokens": MAX_TOKENS}
    with httpx.Client(base_url=base, timeout=60) as c:
        # the last one: a premium key's request served as free (service_tier flex) counts as free
        for tier, stream, extra in (("premium", True, {}), ("premium", False, {}), ("free", True, {}),
                                    ("free", False, {}), ("premium", True, {"service_tier": "flex"})):
            if stream:
                with c.stream("POST", "/v1/completions", json={**body, "stream": True, **extra},
                              headers=auth[tier]) as r:
                    assert r.status_code == 200 and r.read().decode().endswith("data: [DONE]\n\n")
                    assert r.headers["x-tier"] == ("free" if extra else tier)
            else:
                r = c.post("/v1/chat/completions", headers=auth[tier],
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": MAX_TOKENS})
                assert r.status_code == 200, r.text
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json={**body, "max_tokens": 0}, headers=auth["free"]).status_code == 400
        assert c.post("/v1/completions", json={**body, "prompt": [5] * CONTEXT},
                      headers=auth["premium"]).status_code == 400
        assert c.post("/v1/completions", json={**body, "prompt": "x" * 30_000},
                      headers=auth["free"]).status_code == 413
    expected = {("ray_tiered_ttft_seconds_count", "premium"): 2, ("ray_tiered_ttft_seconds_count", "free"): 3,
                ("ray_tiered_generated_tokens_total", "free"): 3 * MAX_TOKENS}
    deadline = time.monotonic() + 45  # Ray exports every second here; the agent may take a few
    series: dict = {}
    while time.monotonic() < deadline:
        series = _scrape(metrics_port)
        if all(_total(series, n, tier=t) >= v for (n, t), v in expected.items()) \
                and "ray_tiered_replica_kv_usage_ratio" in series \
                and _total(series, "ray_tiered_request_rejections_total") >= 4:
            break
        time.sleep(1)
    return series


def test_per_tier_latency_histograms_are_exported(scraped):
    for tier, n in (("premium", 2), ("free", 3)):
        assert _total(scraped, "ray_tiered_ttft_seconds_count", tier=tier) == n
        ttft = _total(scraped, "ray_tiered_ttft_seconds_sum", tier=tier) / n
        assert 0 < ttft < 10, ttft
        gaps = _total(scraped, "ray_tiered_tbt_seconds_count", tier=tier)
        assert gaps == n * (MAX_TOKENS - 1)
        tbt = _total(scraped, "ray_tiered_tbt_seconds_sum", tier=tier) / gaps
        assert 0 <= tbt < 2, tbt
        les = {lab["le"] for lab, _ in scraped["ray_tiered_tbt_seconds_bucket"] if lab["tier"] == tier}
        assert {"0.1", "0.5", "+Inf"} <= les
        inf = _total(scraped, "ray_tiered_tbt_seconds_bucket", tier=tier, le="+Inf")
        assert inf == gaps
    labels = scraped["ray_tiered_ttft_seconds_count"][0][0]
    assert labels["deployment"] == "Ingress" and labels["replica"]  # Serve's own tags


def test_request_outcomes_and_rejections_are_counted(scraped):
    req = "ray_tiered_requests_total"
    assert _total(scraped, req, tier="premium", outcome="admitted") == 2
    assert _total(scraped, req, tier="free", outcome="admitted") == 3
    assert _total(scraped, req, outcome="rejected") == 4 and _total(scraped, req, outcome="shed") == 0
    rej = "ray_tiered_request_rejections_total"
    assert _total(scraped, rej, tier="unknown", reason="unauthorized") == 1
    assert _total(scraped, rej, tier="free", reason="invalid") == 1
    assert _total(scraped, rej, tier="premium", reason="context") == 1
    assert _total(scraped, rej, tier="free", reason="too_large") == 1
    fin = "ray_tiered_requests_finished_total"
    assert _total(scraped, fin, tier="premium", status="completed") == 2
    assert _total(scraped, fin, tier="free", status="completed") == 3
    assert _total(scraped, "ray_tiered_generated_tokens_total", tier="premium") == 2 * MAX_TOKENS
    goodput = _total(scraped, "ray_tiered_goodput_requests_total")
    misses = _total(scraped, "ray_tiered_slo_misses_total")
    assert goodput <= 5 and (goodput == 5 or misses > 0)


def test_replica_gauges_are_exported_per_replica(scraped):
    kv = scraped["ray_tiered_replica_kv_usage_ratio"]
    replicas = {lab["replica"] for lab, _ in kv}
    assert len(replicas) == 2 and all(lab["deployment"] == "LLMReplica" for lab, _ in kv)
    assert all(0.0 <= v <= 1.0 for _, v in kv)
    for name in ("ray_tiered_replica_waiting_prefill_tokens", "ray_tiered_replica_waiting_requests",
                 "ray_tiered_replica_running_requests", "ray_tiered_replica_mean_batch_time_seconds"):
        assert {lab["replica"] for lab, _ in scraped[name]} == replicas, name
        assert all(v >= 0 for _, v in scraped[name])
    # the replicas ran iterations: the scheduler's mean batch time is positive on at least one
    assert max(v for _, v in scraped["ray_tiered_replica_mean_batch_time_seconds"]) > 0


def test_every_exported_name_is_defined(scraped):
    assert set(scraped) <= m.exported_series_names()


def test_ray_histograms_take_the_prebuilt_tags_fast_path(serve_with_metrics):
    from ray.serve.metrics import Histogram

    h = Histogram("tiered_test_fast_path_seconds", boundaries=[0.1, 0.5], tag_keys=("tier",))
    observe = m._observer(h, {"tier": "free"})
    assert getattr(observe, "func", None) == h._metric.record  # the native recorder, tags built once
    observe(0.2)
