"""Units: sizes, rates, FLOP/s and times read in human units and printed with three digits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partition.errors import PlanError
from partition.units import (
    format_size,
    format_time,
    parse_flops,
    parse_rate,
    parse_seconds,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * 2**30),
        ("80GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5k", 1500),
        (4096, 4096),
        ("7", 7),
        ("2 TiB", 2 * 2**40),
        ("3e3B", 3000),
        ("1PiB", 2**50),
    ],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_rates() -> None:
    assert parse_rate("25GB/s") == 25e9
    assert parse_rate("1GiB/s") == 2**30
    assert parse_rate("10Gbps") == 10e9  # "ps" read as "/s"; the b is bytes, as everywhere
    assert parse_rate(5e9) == 5e9


def test_flops() -> None:
    assert parse_flops("100T") == 100e12
    assert parse_flops("312TFLOPS") == 312e12
    assert parse_flops("1.5e12") == 1.5e12
    assert parse_flops("2 GFLOP/s") == 2e9


@pytest.mark.parametrize("bad", ["sixteen", "16XB", "-3GB", "", "1.2.3GB"])
def test_bad_sizes_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(PlanError, match="size"):
        parse_size(bad)


def test_a_negative_number_is_refused() -> None:
    with pytest.raises(PlanError, match="non-negative, got -1"):
        parse_size(-1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5us", 5e-6),
        ("1.5ms", 1.5e-3),
        ("20ns", 2e-8),
        ("2s", 2.0),
        ("0.25", 0.25),
        (" 7 US ", 7e-6),
    ],
)
def test_seconds(text: str, expected: float) -> None:
    assert parse_seconds(text) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("bad", ["fast", "5 minutes", "us", ""])
def test_bad_times_say_how_to_write_one(bad: str) -> None:
    # They raised float()'s own "could not convert string to float", naming no unit.
    with pytest.raises(PlanError, match=r"cannot read time .*'5us'"):
        parse_seconds(bad)


def test_sizes_print_in_binary_units_with_three_digits() -> None:
    # They printed as "0.000131 GB" and "2.66e-05 GB"; GB is 10^9 bytes, GiB 2^30.
    size = format_size
    assert [size(x) for x in (0, 512, 1023, 1024, 131_000, 26_600, 2.66 * 2**30)] == [
        "0 B",
        "512 B",
        "1023 B",
        "1 KiB",
        "128 KiB",
        "26 KiB",
        "2.66 GiB",
    ]
    assert size(80 * 10**9) == "74.5 GiB" and size(2**20 - 1) == "1 MiB"
    assert size(1023.7 * 2**20) == "1 GiB"
    assert size(3 * 2**40) == "3 TiB" and size(-2048) == "-2 KiB"
    # 1000 TiB and more printed as "1e+03 TiB": TiB was the largest unit.
    assert size(1000 * 2**40) == "0.977 PiB" and size(2**62) == "4096 PiB"


def test_times_print_with_three_digits_in_the_largest_unit() -> None:
    assert [format_time(x) for x in (2.5, 1.0, 0.0185, 0.9999, 7.3e-4, 0.0)] == [
        "2.5 s",
        "1 s",
        "18.5 ms",
        "1 s",
        "730 µs",
        "0 µs",
    ]
    # 999.6 µs printed as "1e+03 µs": the unit was chosen before rounding to three digits.
    assert format_time(9.996e-4) == "1 ms" and format_time(9.994e-4) == "999 µs"
    assert format_time(125.0) == "125 s" and format_time(1234.5) == "1230 s"


@given(st.integers(min_value=0, max_value=2**60))
def test_a_printed_size_reads_back_within_its_three_digits(x: int) -> None:
    text = format_size(x)
    value, unit = text.split()
    assert "e" not in value and (float(value) < 1000 or unit in ("B", "PiB"))
    assert abs(parse_size(text.replace(" ", "")) - x) <= max(0.5, 5e-3 * x)


@given(st.floats(min_value=1e-7, max_value=1e5))
def test_a_printed_time_reads_back_within_its_three_digits(x: float) -> None:
    value, unit = format_time(x).split()
    assert "e" not in value and (float(value) < 1000 or unit == "s")
    assert abs(parse_seconds(value + unit.replace("µs", "us")) - x) <= 5e-3 * x
