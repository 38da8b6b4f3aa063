"""`python -m serve_app`: argument parsing and Ray token authentication (the launch itself is exercised
by tests/loadtest/test_locust_smoke.py and loadtest.first_answer)."""

import pytest

from serve_app.__main__ import main, parse_args


def test_arguments_are_build_app_key_value_pairs():
    assert parse_args(["config=serve_app/configs/sim.yaml", "engine.time_scale=0.1"]) == {
        "config": "serve_app/configs/sim.yaml", "engine.time_scale": "0.1"}


@pytest.mark.parametrize("arg", ["sim.yaml", "=3"])
def test_an_argument_without_a_key_is_refused_with_an_example(arg):
    with pytest.raises(SystemExit, match="expected ARG=VALUE"):
        parse_args([arg])


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
