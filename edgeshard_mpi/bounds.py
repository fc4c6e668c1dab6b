"""Limits on values a user can type: each number has a range the code can honour, and a
value outside it is refused with the field and the fix before any heavy work starts.

The limits are generous (far beyond any real job) but finite: an absurd value must fail
with a message, not a segfault (100000 torch threads), a hang (a 100 s poll interval) or an
exhausted host (a hostfile slot count of 10^20).
"""

from __future__ import annotations

import math
import re
import string

MAX_THREADS = 1024
"""torch threads per rank (torch segfaults creating 100000)."""
MAX_POLL_US = 1e5
"""A waiting rank sleeps at most this long between MPI_Test calls (0.1 s)."""
MIN_POLL_US = 0.1
MAX_SEED = 2**63 - 1
MAX_STALL_S = 7 * 86400.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
TEMPLATE_FIELDS = {"name", "time"}


class BoundsError(ValueError):
    """A value out of range; the message names the field and the fix."""


def int_in(value: int, lo: int, hi: int, where: str, fix: str = "") -> int:
    if not lo <= value <= hi:
        raise BoundsError(
            f"{where}: {value} is out of range; use an integer from {lo} to {hi}"
            + (f" ({fix})" if fix else "")
        )
    return value


def float_in(value: float, lo: float, hi: float, where: str, fix: str = "") -> float:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise BoundsError(
            f"{where}: {value} is out of range; use a number from {lo:g} to {hi:g}"
            + (f" ({fix})" if fix else "")
        )
    return value


def safe_name(value: str, where: str) -> str:
    """A name that becomes part of a file name: no folders, no `..`, no hidden files."""
    if not NAME_RE.fullmatch(value):
        raise BoundsError(
            f"{where}: {value!r} cannot be part of a file name; use letters, digits, '.', "
            "'_', '+' and '-', starting with a letter or digit (no '/' or '..')"
        )
    return value


def check_template(template: str, where: str, fields: set[str] = TEMPLATE_FIELDS) -> None:
    """A str.format template with only named fields from `fields`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise BoundsError(
            f"{where}: {template!r} is not a valid template ({e}); write literal braces "
            "as {{ and }}"
        ) from None
    allowed = ", ".join("{" + f + "}" for f in sorted(fields))
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in fields:
            what = "a positional field" if name == "" or name.isdigit() else "unknown field"
            raise BoundsError(
                f"{where}: {template!r} uses {what} {{{name}}}; the fields are {allowed}"
            )
        if spec or conv:
            raise BoundsError(f"{where}: write {{{name}}} without a format spec or conversion")
