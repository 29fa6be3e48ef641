"""Uptime per node from heartbeat coverage.

Each heartbeat at time t covers [t, t + interval]. Overlapping or touching spans
merge into one row, so a node heartbeating steadily for a month is one row, and
uptime over a window is covered time / window length. A node younger than the
window is measured since it was first seen, so a new node starts near 1.0
instead of being punished for time it did not exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

HOUR = 3600.0
WINDOWS: tuple[tuple[str, float], ...] = (("1h", HOUR), ("24h", 24 * HOUR), ("30d", 30 * 24 * HOUR))
RETENTION = 31 * 24 * HOUR


def extend(
    spans: list[tuple[float, float]], at: float, interval: float
) -> list[tuple[float, float]]:
    """Add the coverage of a heartbeat at ``at`` to sorted, disjoint ``spans``."""
    start, end = at, at + interval
    if spans and spans[-1][1] >= start:
        last_start, last_end = spans[-1]
        spans[-1] = (last_start, max(last_end, end))
    else:
        spans.append((start, end))
    return spans


def covered(spans: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    total = 0.0
    for start, end in spans:
        total += max(0.0, min(end, hi) - max(start, lo))
    return total


def ratio(
    spans: Sequence[tuple[float, float]], now: float, window: float, first_seen: float
) -> float:
    """Fraction of the window (or of the node's life, if shorter) covered, 0..1."""
    lo = max(now - window, first_seen)
    if now <= lo:
        return 0.0
    return min(1.0, covered(spans, lo, now) / (now - lo))
