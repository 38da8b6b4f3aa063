"""Two ingress replicas (``ingress.num_replicas: 2``) on a local loopback Serve: requests go through
both, each counts the other, and together they hold the shared in-flight bound
(``admission.max_in_flight``: each enforces ceil(bound / 2), `serve_app.admission.ingress_share`)."""

import threading
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

from serve_app.app import build_app  # noqa: E402

APP = "ingresses"
KEY = "ingress-test-premium-1"
BOUND = 6  # admission.max_in_flight: 3 at each of the 2 ingresses
SERVE_ENV_VARS = {"TIERED_API_KEYS": f"{KEY}:premium"}  # read by local_serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def base_url(local_serve):
    serve.run(build_app({"overrides": {
        "engine.time_scale": 0.05, "replicas.num_replicas": 2, "replicas.cpus_per_replica": 0,
        "router.feedback_period_s": 0.5, "ingress.num_replicas": 2, "ingress.count_period_s": 0.5,
        # the premium tier (shed last) is refused only at the in-flight bound; no fair-share reserve
        "admission.max_in_flight": BOUND, "admission.fair_share_reserve": 0}}), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{local_serve}"


def _ingresses():
    return serve.get_deployment_handle("Ingress", APP)


def test_each_ingress_counts_both_and_enforces_half_the_bound(base_url):
    counts = _ingresses().broadcast("count_ingress_replicas", 10.0).results(timeout_s=30)
    assert counts == [2, 2]
    sharing = _ingresses().broadcast("sharing").results(timeout_s=30)
    assert len({s["replica"] for s in sharing}) == 2  # two replicas answered, each for itself
    assert all(s["ingress_replicas"] == 2 and s["in_flight_share"] == 3 and s["max_in_flight"] == BOUND
               for s in sharing), sharing


def test_requests_go_through_both_ingresses_and_together_they_hold_the_bound(base_url):
    n = 4 * BOUND
    results: list[tuple[int, str]] = []

    def stream() -> None:  # ~3 s of tokens at time_scale 0.05: all arrive while the first ones still stream
        body = {"model": "mistral-7b-sim", "prompt": "several ingresses", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            results.append((r.status_code, r.read().decode()))

    threads = [threading.Thread(target=stream) for _ in range(n)]
    for t in threads:
        t.start()
    samples: list[list[int]] = []
    deadline = time.monotonic() + 45
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        states = _ingresses().broadcast("state").results(timeout_s=10)
        samples.append([s["in_flight"] for s in states])
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert len(results) == n
    ok = [text for code, text in results if code == 200]
    refused = [text for code, text in results if code == 429]
    assert len(ok) + len(refused) == n, [code for code, _ in results]
    assert all(text.endswith("data: [DONE]\n\n") for text in ok)
    assert all("this ingress's share of 6 over 2 ingress replicas" in text for text in refused), refused[:1]
    # each ingress held at most its share, the two together at most the bound, and both served
    assert samples and all(len(s) == 2 and max(s) <= BOUND // 2 and sum(s) <= BOUND for s in samples), samples
    assert all(max(s[i] for s in samples) > 0 for i in range(2)), samples
    assert BOUND // 2 < len(ok) <= BOUND and refused
