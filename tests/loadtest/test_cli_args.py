"""The loadtest commands' shared argparse parsers (loadtest/cli_args.py)."""

from __future__ import annotations

import argparse

import pytest

from loadtest.cli_args import int_at_least, ints_at_least, positive_float, positive_floats


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


def test_ints_at_least_reads_a_comma_list_and_refuses_a_bad_item():
    assert ints_at_least(1)("16, 64,") == [16, 64]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 1, got 0"):
        ints_at_least(1)("16,0")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated whole numbers"):
        ints_at_least(1)(" , ")


@pytest.mark.parametrize("text, message", [
    ("1,x", "expected comma-separated numbers, got '1,x'"),
    ("", "expected positive numbers, got ''"),
    ("2,0", "expected positive numbers, got '2,0'"),
    ("-1", "expected positive numbers, got '-1'"),
    ("nan", "expected positive numbers, got 'nan'"),
])
def test_positive_floats_refuses_with_a_message(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_floats(text)


def test_positive_floats_reads_a_comma_list():
    assert positive_floats("0.5, 1,1.5") == [0.5, 1.0, 1.5]


@pytest.mark.parametrize("text, message", [("x", "expected a number, got 'x'"), ("0", "expected a number > 0, got '0'"),
                                           ("inf", "expected a number > 0, got 'inf'")])
def test_positive_float_refuses_with_a_message(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_float(text)


@pytest.mark.parametrize("argv, message", [
    (["paper", "--qps", "0.5,0"], "expected positive numbers, got '0.5,0'"),
    (["cluster", "--replicas", "2", "--qps", "nan"], "expected positive numbers, got 'nan'"),
])
def test_the_simulate_command_refuses_a_rate_that_is_not_positive(argv, message, capsys):
    from loadtest.simulate.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
