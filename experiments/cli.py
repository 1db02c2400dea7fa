"""The one set of argparse ``type=`` helpers every experiment command uses.

Each helper parses one command-line string and raises ``argparse.ArgumentTypeError`` with
the value and what was expected; argparse then exits with status 2 and a message naming the
flag (``argument --seeds: expected an integer >= 1, got '0'``) before any work starts.
``tests/test_cli_contract.py`` checks that every entry point refuses bad values this way.
"""
from __future__ import annotations

import argparse
import math


def int_range(low: int | None = None, high: int | None = None):
    """A type for an integer in [low, high] (either bound may be None)."""
    if low is not None and high is not None:
        want = f"an integer in [{low}, {high}]"
    elif low is not None:
        want = f"an integer >= {low}"
    elif high is not None:
        want = f"an integer <= {high}"
    else:
        want = "an integer"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        if (low is not None and v < low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v

    parse.__name__ = want
    return parse


def float_range(low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False):
    """A type for a finite float in the interval (low/high None: unbounded; *_open:
    the bound itself is excluded)."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    want = f"a finite number in {'(' if low_open or low is None else '['}{lo}, {hi}" \
           f"{')' if high_open or high is None else ']'}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        bad = not math.isfinite(v)
        if low is not None:
            bad |= v <= low if low_open else v < low
        if high is not None:
            bad |= v >= high if high_open else v > high
        if bad:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v

    parse.__name__ = want
    return parse


def comma_list(item, *, min_len: int = 1, max_len: int | None = None, tuple_out=False):
    """A type for a comma-separated list whose entries each parse with ``item`` (one of the
    helpers above), with min_len ≤ length ≤ max_len."""

    def parse(s: str):
        parts = [p.strip() for p in str(s).split(",")]
        if any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        if len(parts) < min_len or (max_len is not None and len(parts) > max_len):
            n = f"{min_len}" if max_len is None else f"{min_len}..{max_len}"
            more = "" if max_len is not None else " or more"
            raise argparse.ArgumentTypeError(
                f"expected {n}{more} comma-separated values, got {s!r}")
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{s!r}: entry {p!r}: {e}") from None
        return tuple(out) if tuple_out else out

    parse.__name__ = "comma list"
    return parse


def choice_list(choices, *, min_len: int = 1):
    """A type for a comma-separated subset of ``choices`` (order kept)."""
    choices = tuple(choices)

    def parse(s: str) -> list:
        names = [n.strip() for n in str(s).split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or len(names) < min_len:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {s!r}")
        return names

    parse.__name__ = "comma list of names"
    return parse


pos_int = int_range(1)
nonneg_int = int_range(0)
pos_float = float_range(0.0, low_open=True)
nonneg_float = float_range(0.0)
probability = float_range(0.0, 1.0)
pos_ints = comma_list(pos_int)
nonneg_ints = comma_list(nonneg_int)
pos_floats = comma_list(pos_float, tuple_out=True)
