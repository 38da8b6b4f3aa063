"""`python -m serve_app`: argument parsing, Ray token authentication and API keys as digests (the
launch itself is exercised by tests/serve_app/test_closed_cluster.py, tests/loadtest/test_locust_smoke.py
and loadtest.first_answer)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.__main__ import blank_initial_environ, hash_env_keys, main, parse_args
from serve_app.auth import hash_key
from serve_app.config import AdmissionConfig, AppConfig, KeyLimits, ServingTier, SimEngineConfig, VLLMEngineConfig


def test_arguments_are_build_app_key_value_pairs():
    assert parse_args(["config=serve_app/configs/sim.yaml", "engine.time_scale=0.1"]) == {
        "config": "serve_app/configs/sim.yaml", "engine.time_scale": "0.1"}


@pytest.mark.parametrize("arg", ["sim.yaml", "=3"])
def test_an_argument_without_a_key_is_refused_with_an_example(arg):
    with pytest.raises(SystemExit, match="expected ARG=VALUE"):
        parse_args([arg])


# ------------------------------------------------------------------------------------------ --help

def _described(out: str, path: str, description: str) -> bool:
    """``path`` has its entry (``  path  (TYPE, ...)``) in ``out``, its description below it."""
    m = re.search(rf"^  {re.escape(path)}  \((.*)\n((?:      .*\n)*)", out, re.M)
    return m is not None and " ".join(description.split()) in " ".join(m.group(2).split())


def test_help_prints_the_usage_and_every_config_key_without_importing_ray():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "serve_app", "--help"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert out.startswith("usage: python -m serve_app [config=PATH]") and "ARG=VALUE" in out
    assert "config=PATH" in out and "serve_app/configs/sim.yaml" in out and "engine.time_scale=0.1" in out
    for path, model, name in (("engine.time_scale", SimEngineConfig, "time_scale"),
                              ("admission.fair_share_reserve", AdmissionConfig, "fair_share_reserve"),
                              ("tiers.N.tbt_slo_s", ServingTier, "tbt_slo_s"),
                              ("tiers.N.key_limits.requests_per_minute", KeyLimits, "requests_per_minute"),
                              ("api_keys.limits.KEY.tokens_per_minute", KeyLimits, "tokens_per_minute"),
                              ("engine.kv_cache_memory_bytes", VLLMEngineConfig, "kv_cache_memory_bytes")):
        assert _described(out, path, model.model_fields[name].description), path
    assert "  engine.time_scale  (float, default 1.0; gt 0)" in out
    assert "  admission.fair_share_reserve  (float, default 0.1; ge 0, lt 1)" in out
    # both engine variants, each with its fields
    sim, vllm = out.index("  engine as {backend: sim, ...}:"), out.index("  engine as {backend: vllm, ...}:")
    assert sim < out.index("  engine.cost_profile  (") < vllm < out.index("  engine.model  (")
    # every field of every model, at its dotted path
    leaves = re.findall(r"^  ([\w.]+)  \(", out, re.M)
    assert len(leaves) >= 60 and "http.drain_timeout_s" in leaves and "metrics.per_key_max_keys" in leaves
    # no Ray: not imported, so no cluster (python -X importtime lists every module imported)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "serve_app.config" in imported and not {m for m in imported if m == "ray" or m.startswith("ray.")}


def test_help_from_main_returns_before_anything_starts(nothing_starts, capsys):
    assert main(["engine.time_scale=0.1", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m serve_app") and "  engine.time_scale  (" in out


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail, rather than start a cluster, if `main` gets past its checks."""
    def refuse(_args):
        raise AssertionError("main got past its Ray auth checks")
    monkeypatch.setattr("serve_app.__main__.build_app", refuse)


@pytest.mark.parametrize("mode", ["disabled", ""])
def test_ray_auth_stays_on_any_other_mode_is_refused_before_anything_starts(monkeypatch, nothing_starts, mode):
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with pytest.raises(SystemExit, match="only with token authentication"):
        main(["config=serve_app/configs/sim.yaml"])


def test_a_ray_token_path_naming_no_token_is_refused_before_anything_starts(monkeypatch, nothing_starts, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="RAY_AUTH_TOKEN_PATH"):
        main(["config=serve_app/configs/sim.yaml"])


# ------------------------------------------------------------------------------- API keys as digests

def test_env_keys_become_digests_and_the_variable_goes():
    environ = {"TIERED_API_KEYS": "pk-launch-key-01:premium,fk-launch-key-02:free", "OTHER": "x"}
    config = AppConfig(api_keys={"hashes": {hash_key("pk-config-key-03"): "premium"}})
    overrides = hash_env_keys(config, environ)
    assert overrides == {"api_keys.env": None, "api_keys.hashes": {
        hash_key("pk-launch-key-01"): "premium", hash_key("fk-launch-key-02"): "free",
        hash_key("pk-config-key-03"): "premium"}}
    assert environ == {"OTHER": "x"}
    assert "launch-key" not in repr(overrides)


def test_the_configured_variable_is_the_one_read():
    environ = {"MY_KEYS": "pk-launch-key-01:premium", "TIERED_API_KEYS": "fk-launch-key-02:free"}
    overrides = hash_env_keys(AppConfig(api_keys={"env": "MY_KEYS"}), environ)
    assert overrides["api_keys.hashes"] == {hash_key("pk-launch-key-01"): "premium"}
    assert environ == {"TIERED_API_KEYS": "fk-launch-key-02:free"}  # not ours: not touched
    assert hash_env_keys(AppConfig(), {}) == {}
    empty = {"TIERED_API_KEYS": " "}
    assert hash_env_keys(AppConfig(), empty) == {} and empty == {}  # nothing to hand over, still removed


def test_a_bad_env_key_stops_the_launcher_without_showing_it():
    environ = {"TIERED_API_KEYS": "pk-launch-key-01:premium,short-k1:free"}
    with pytest.raises(SystemExit) as info:
        hash_env_keys(AppConfig(), environ)
    assert "entry 2" in str(info.value) and "shorter than 12" in str(info.value)
    assert "short-k1" not in str(info.value) and "pk-launch-key-01" not in str(info.value)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_blank_initial_environ_clears_what_proc_shows():
    """/proc/PID/environ shows the environment a process was started with; unsetenv alone leaves it."""
    code = ("import os, sys; from serve_app.__main__ import blank_initial_environ as b; "
            "ok = b('SECRET_FOR_TEST'); os.environ.pop('SECRET_FOR_TEST'); "
            "sys.stdout.write(str(ok) + ' ' + str(b'the-secret-value' in open('/proc/self/environ', 'rb').read()))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env={"SECRET_FOR_TEST": "the-secret-value", "PATH": "/usr/bin"},
                         cwd=root, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == "True False"
    assert blank_initial_environ("NO_SUCH_VARIABLE_SET_HERE") is False
