"""Cutting a lease's metered time into closed intervals (pure functions).

Intervals are measured on the monotonic clock, so a wall-clock step never
changes a duration. Wall-clock timestamps are carried along for people: each
interval starts at the previous interval's wall end and its own wall end is
the wall clock at that instant, clamped so it never runs backwards. Both
chains are therefore contiguous: no gaps, no overlaps, in either clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One instant on both clocks, in nanoseconds."""

    mono_ns: int
    wall_ns: int


@dataclass(frozen=True)
class Interval:
    start: Point
    end: Point

    @property
    def duration_ns(self) -> int:
        return self.end.mono_ns - self.start.mono_ns


def wall_at(mono_ns: int, now: Point, floor_wall_ns: int) -> int:
    """The wall time of a past monotonic instant, never earlier than ``floor_wall_ns``."""
    return max(floor_wall_ns, now.wall_ns - (now.mono_ns - mono_ns))


def split(last: Point, now: Point, record_ns: int, *, final: bool) -> list[Interval]:
    """The intervals to close between ``last`` (the last closed point) and ``now``.

    Nothing is closed before ``record_ns`` has elapsed, unless ``final``. The span is
    cut into ``record_ns`` pieces with the remainder added to the last piece, so
    every piece but a final one lasts at least ``record_ns`` and they end exactly
    at ``now``: intervals close only at sample instants, where counters were read.
    A final call with nothing elapsed yields one zero-length interval so that
    every lease gets its final record.
    """
    if record_ns <= 0:
        raise ValueError(f"record_ns must be positive, got {record_ns}")
    elapsed = now.mono_ns - last.mono_ns
    if elapsed < 0:
        raise ValueError(f"now ({now.mono_ns}) is before the last closed point ({last.mono_ns})")
    if elapsed < record_ns and not final:
        return []
    pieces = max(1, elapsed // record_ns)
    intervals: list[Interval] = []
    start = last
    for index in range(pieces):
        end_mono = now.mono_ns if index == pieces - 1 else start.mono_ns + record_ns
        end = Point(end_mono, wall_at(end_mono, now, start.wall_ns))
        intervals.append(Interval(start, end))
        start = end
    return intervals


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split a non-negative integer ``total`` in proportion to ``weights`` exactly.

    Largest-remainder rounding: the parts always sum to ``total``, so a counter
    delta shared by several intervals is neither lost nor counted twice. With all
    weights zero the whole total goes to the last part.
    """
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    if not weights:
        raise ValueError("weights must not be empty")
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    weight_sum = sum(weights)
    if weight_sum == 0:
        return [0] * (len(weights) - 1) + [total]
    parts = [total * w // weight_sum for w in weights]
    remainders = [(total * w % weight_sum, index) for index, w in enumerate(weights)]
    # Ties go to the later part: it is the one closest to the reading.
    for _, index in sorted(remainders, reverse=True)[: total - sum(parts)]:
        parts[index] += 1
    return parts
