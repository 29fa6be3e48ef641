"""Human units: durations and sizes parse, reject nonsense, and round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuagent.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1.5", 1.5),
        (3, 3.0),
        ("0", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    """Durations in seconds or with units parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-5s", -1, "10 parsecs", "", "s", "5m3", True, [1], "1h-5m"])
def test_parse_duration_rejects(bad: object) -> None:
    """Negative, unitless garbage and wrong types are rejected with a message."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * 1024**3),
        ("500MB", 500_000_000),
        ("1024", 1024),
        (4096, 4096),
        ("1.5KiB", 1536),
        ("2g", 2_000_000_000),
        ("3Ti", 3 * 1024**4),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    """Sizes in bytes or SI/IEC units parse to bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "8 GiBs", 1.5, False, None])
def test_parse_size_rejects(bad: object) -> None:
    """Negative, fractional bytes, unknown units and wrong types are rejected."""
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip(ms: int) -> None:
    """format_duration output parses back to the same number of seconds."""
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(size: int) -> None:
    """format_size output parses back to the same number of bytes."""
    assert parse_size(format_size(size)) == size
