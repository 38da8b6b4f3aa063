"""argparse `type=` parsers shared by the loadtest commands (their messages are what argparse
prints for a bad value)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A parser of a whole number >= `minimum`."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {v}")
        return v

    return parse


def ints_at_least(minimum: int) -> Callable[[str], list[int]]:
    """A parser of comma-separated whole numbers, each >= `minimum` (at least one)."""
    one = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        vals = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
        return vals

    return parse


def parse_positive_floats(text: str) -> list[float]:
    """Comma-separated finite numbers > 0 (at least one); ValueError with a message otherwise."""
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from e
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise ValueError(f"expected positive numbers, got {text!r}")
    return vals


def positive_floats(text: str) -> list[float]:
    """`parse_positive_floats` as an argparse type."""
    try:
        return parse_positive_floats(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_float(text: str) -> float:
    """One finite number > 0, as an argparse type."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v
