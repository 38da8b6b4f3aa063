"""`python -m serve_app`: argument parsing (the launch itself is exercised by loadtest.first_answer)."""

import pytest

from serve_app.__main__ import parse_args


def test_arguments_are_build_app_key_value_pairs():
    assert parse_args(["config=serve_app/configs/sim.yaml", "engine.time_scale=0.1"]) == {
        "config": "serve_app/configs/sim.yaml", "engine.time_scale": "0.1"}


@pytest.mark.parametrize("arg", ["sim.yaml", "=3"])
def test_an_argument_without_a_key_is_refused_with_an_example(arg):
    with pytest.raises(SystemExit, match="expected ARG=VALUE"):
        parse_args([arg])
