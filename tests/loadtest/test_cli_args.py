"""The loadtest commands' shared argparse parsers (loadtest/cli_args.py)."""

from __future__ import annotations

import argparse

import pytest

from loadtest.cli_args import int_at_least


@pytest.mark.parametrize("minimum, text, message", [
    (1, "x", "expected a whole number, got 'x'"),
    (1, "2.5", "expected a whole number, got '2.5'"),
    (1, "0", "expected a number >= 1, got 0"),
    (20, "19", "expected a number >= 20, got 19"),
])
def test_int_at_least_refuses_with_a_message(minimum, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        int_at_least(minimum)(text)


def test_int_at_least_takes_the_bound_and_above():
    assert int_at_least(0)("0") == 0 and int_at_least(20)("25") == 25
