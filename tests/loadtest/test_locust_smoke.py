"""Smoke test of the locust load test against the live app: `python -m serve_app` with 2 simulated
replicas (RTX 6000 Ada profile, real pace) on a free loopback port, then locust headless for 20 s
of open-loop Poisson arrivals (2 QPS, tiers 50/50 so that both appear, outputs clamped to 32
tokens so that the drain is short).  Zero failures, both tiers in locust's stats and in the raw
samples, TTFT and TBT at the simulated GPU's pace.  Both processes run in their own process
groups and are stopped (SIGTERM, then SIGKILL of that group only).  ~60 s."""

import csv
import importlib.util
import os

import numpy as np
import pytest

from loadtest.capacity import launch_app, load_samples, locust_command, run_locust, session_pids, step_points
from replica.cost.profile import load_profile
from replica.cost.shape import BatchShape
from serve_app.config import default_config

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                 reason="locust is not installed (pip install -e '.[loadtest]')"),
              pytest.mark.timeout(240)]  # bounded: the app start (<= 90 s) + locust (<= 75 s) + stop

QPS, SECONDS, MAX_OUT = 2.0, 20, 32


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("ray")
    log = tmp_path_factory.mktemp("serve") / "serve_app.log"
    with launch_app(["config=serve_app/configs/sim.yaml", "replicas.num_replicas=2"], log_path=log,
                    ready_timeout_s=90, stop_grace_s=30) as running:
        yield running
    assert session_pids(running.pid) == [], "processes of the app's session outlived it"


def test_locust_smoke(app, tmp_path):
    base, keys = app.base, app.keys
    env = {**os.environ, "LOADTEST_KEYS": ",".join(f"{t}={k}" for t, k in keys.items())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    samples = tmp_path / "samples.jsonl"
    cmd = locust_command(base, [QPS], SECONDS, tmp_path / "locust", samples,
                         ["--drain-seconds", "25", "--tiers", "premium:0.1:0.5,free:0.5:0.5",
                          "--max-output-tokens", str(MAX_OUT), "--max-prompt-tokens", "2048"])
    rc = run_locust(cmd, env, tmp_path / "locust.log", timeout_s=SECONDS + 25 + 30)
    log = (tmp_path / "locust.log").read_text(errors="replace")
    assert rc == 0, f"locust exit code {rc} (non-zero: failures or a crash):\n{log[-4000:]}"

    # locust's own stats: TTFT and TBT per tier, no failures anywhere
    with open(tmp_path / "locust_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for kind in ("TTFT", "TBT"):
        for tier in ("premium", "free"):
            row = rows[(kind, tier)]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    with open(tmp_path / "locust_failures.csv") as f:
        assert list(csv.DictReader(f)) == []

    # raw samples: every scheduled request answered in full, at the simulated GPU's pace
    metas, recs = load_samples(samples)
    assert len(recs) == metas[0]["requests"] > 0
    assert all(r["ok"] and r["status"] == 200 and r["completion_tokens"] == r["max_tokens"] <= MAX_OUT for r in recs)
    assert {r["tier"] for r in recs} == {"premium", "free"}
    ttft = np.array([r["ttft_s"] for r in recs])
    assert np.all(ttft > 0) and np.median(ttft) < 2.0
    profile = load_profile("rtx6000ada-mistral7b")  # sim.yaml's, time_scale 1
    floor_s = profile.iteration_time_s(BatchShape.of(decode_ctxs=[1]))
    chunk_s = profile.iteration_time_s(BatchShape.of(prefill_chunks=[(512, 1536)], decode_ctxs=[2048] * 8))
    gaps = np.concatenate([r["tbt_s"] for r in recs])
    assert len(gaps) == sum(r["completion_tokens"] - 1 for r in recs)
    # the replicas coalesce a stream's tokens after the first (at most one message per tier's stream
    # interval): the gaps between messages are at the GPU's pace, or the interval, whichever is longer
    message_gaps = gaps[gaps > 0]
    longest_interval_s = max(t.stream_interval_s for t in default_config().tiers)
    assert 0.8 * floor_s < np.median(message_gaps) < longest_interval_s + 2.0 * chunk_s, \
        (np.median(message_gaps), floor_s, chunk_s, longest_interval_s)
    lag = np.array([r["lag_s"] for r in recs])
    assert np.quantile(lag, 0.99) < 0.5  # open loop: sent on schedule

    (point,) = step_points(metas, recs)
    assert point["qps"] == QPS and point["failures"] == 0 and point["unfinished"] == 0
    assert point["tiers"]["premium"]["requests"] > 0 and point["tiers"]["free"]["requests"] > 0
    assert point["tiers"]["premium"]["tbt_p99_s"] > 0.8 * floor_s
