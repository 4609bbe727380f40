"""Units: reading and printing sizes, rates, FLOP/s and times in human units.

Sizes and rates accept ``"16GiB"``, ``"80GB"``, ``"25GB/s"``; FLOP/s ``"100T"`` or
``"312TFLOPS"``; times ``"5us"``, ``"1.5ms"``. Decimal prefixes (k, M, G, T, P) are powers of
1000; binary ones (Ki, Mi, Gi, Ti, Pi) powers of 1024. Sizes print in binary units and times in
s, ms or µs, with three significant digits: the one formatter of each for tables, errors and
messages.
"""

from __future__ import annotations

import re

from partition.errors import PlanError

__all__ = [
    "format_size",
    "format_time",
    "parse_flops",
    "parse_rate",
    "parse_seconds",
    "parse_size",
]

_PREFIX = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "p": 10**15,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
    "pi": 2**50,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def _parse(text: str | float | int, units: tuple[str, ...], what: str) -> float:
    if isinstance(text, (int, float)):
        if text < 0:
            raise PlanError(f"{what} must be non-negative, got {text}")
        return float(text)
    match = _NUMBER.match(text)
    if match is None:
        raise PlanError(f"cannot read {what} {text!r}: write a number with a unit, e.g. '16GiB'")
    value, suffix = float(match.group(1)), match.group(2).lower()
    for unit in units:
        if suffix.endswith(unit):
            prefix = suffix[: len(suffix) - len(unit)]
            if prefix in _PREFIX:
                return value * _PREFIX[prefix]
    raise PlanError(
        f"cannot read {what} {text!r}: unknown unit {match.group(2)!r}; "
        f"use k/M/G/T (powers of 1000) or Ki/Mi/Gi (powers of 1024) before {units[0]!r}"
    )


def parse_size(text: str | float | int) -> int:
    """Bytes from ``"16GiB"``, ``"80GB"``, ``"512MiB"`` or a plain number of bytes."""
    return round(_parse(text, ("b", ""), "size"))


_BINARY = (
    ("PiB", 2.0**50),
    ("TiB", 2.0**40),
    ("GiB", 2.0**30),
    ("MiB", 2.0**20),
    ("KiB", 2.0**10),
)


def format_size(x: float) -> str:
    """Bytes with 3 significant digits in binary units: ``131 KiB``, ``2.66 GiB``.

    Binary, as `parse_size` reads them: ``GiB`` is 2^30 bytes and ``GB`` 10^9, so an ``80GB``
    device prints as ``74.5 GiB``. The one formatter of sizes (tables, errors, messages).
    """
    for i, (unit, scale) in enumerate(_BINARY):
        if abs(x) >= scale:
            if abs(x) / scale >= 999.5 and i > 0:  # rounds to 1000: one unit up
                unit, scale = _BINARY[i - 1]
            return f"{_digits(x / scale)} {unit}"
    return f"{x:.0f} B"


def format_time(seconds: float) -> str:
    """Seconds with 3 significant digits in s, ms or µs: ``1.25 s``, ``18.5 ms``, ``730 µs``."""
    rounded = float(f"{seconds:.3g}")  # the unit is chosen for the number printed
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if abs(rounded) >= scale:
            return f"{_digits(rounded / scale)} {unit}"
    return f"{rounded * 1e6:.3g} µs"


def _digits(value: float) -> str:
    """Three significant digits, written out in full from 1000 up (the largest unit's case)."""
    return f"{value:.3g}" if abs(value) < 999.5 else f"{value:.0f}"


def parse_rate(text: str | float | int) -> float:
    """Bytes per second from ``"25GB/s"``, ``"1GiB/s"`` or a plain number."""
    if isinstance(text, str):
        text = text.replace("/s", "").replace("ps", "")
    return _parse(text, ("b", ""), "bandwidth")


def parse_flops(text: str | float | int) -> float:
    """FLOP/s from ``"100T"``, ``"312TFLOPS"``, ``"1.5e12"``."""
    if isinstance(text, str):
        text = re.sub(r"(?i)flop(s)?(/s)?$", "", text.strip())
    return _parse(text, ("",), "FLOP/s")


_SECONDS = (("us", 1e-6), ("ms", 1e-3), ("ns", 1e-9), ("s", 1.0))


def parse_seconds(text: str) -> float:
    """Seconds from ``"5us"``, ``"1.5ms"``, ``"20ns"``, ``"2s"`` or a plain number of seconds.

    Raises:
        PlanError: ``text`` is not a number, optionally followed by one of those units.
    """
    text = text.strip().lower()
    number, scale = text, 1.0
    for unit, unit_scale in _SECONDS:
        if text.endswith(unit):
            number, scale = text[: -len(unit)], unit_scale
            break
    try:
        return float(number) / (1 / scale)
    except ValueError:
        raise PlanError(
            f"cannot read time {text!r}: write a number with a unit, e.g. '5us' "
            "(units: ns, us, ms, s)"
        ) from None
