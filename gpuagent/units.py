"""Human units in config files: durations (``10s``, ``5m``) and sizes (``8GiB``).

Pydantic parses ISO 8601 durations but not the ``10s`` form people write in YAML,
so these small parsers live here, with annotated types the config models use.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGTPE]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "e": 1000**6,
    "eb": 1000**6,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
    "ei": 1024**6,
    "eib": 1024**6,
}


def parse_duration(value: object) -> float:
    """Seconds from ``1.5``, ``"90"``, ``"10s"``, ``"5m"``, ``"1h30m"``, ``"250ms"``.

    Negative values are rejected: a negative timeout or interval is always a mistake.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m or 1h, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            raise ValueError(f"duration must not be negative, got {value!r}")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match["num"]) * _DURATION_UNITS[match["unit"]]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"invalid duration {value!r}: use a number of seconds or units "
                    "ms, s, m, h, d (e.g. 10s, 5m, 1h30m)"
                ) from None
    else:
        raise ValueError(f"expected a duration such as 10s, 5m or 1h, got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"512MiB"``, ``"8GiB"``, ``"10GB"`` (SI and IEC units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 8GiB, not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"size in bytes must be a whole number, got {value!r}")
        size = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"size must not be negative, got {value!r}")
        match = _SIZE_RE.match(text)
        if not match:
            raise ValueError(
                f"invalid size {value!r}: use bytes or a unit such as KiB, MiB, GiB, TiB, MB, GB"
            )
        unit = (match["unit"] or "").lower()
        size = int(float(match["num"]) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"expected a size such as 512MiB or 8GiB, got {type(value).__name__}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """The shortest human form that parses back to the same value."""
    if seconds == 0:
        return "0s"
    for unit, factor in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds / factor)}{unit}"
    if (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds}s"


def format_size(size: int) -> str:
    """The largest IEC unit that divides the size exactly."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
"""Seconds, written as ``10s``/``5m``/``1h`` in YAML; never negative."""

ByteSize = Annotated[
    int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)
]
"""Bytes, written as ``512MiB``/``8GiB`` in YAML; never negative."""
