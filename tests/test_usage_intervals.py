"""Interval splitting and exact apportioning (pure functions, property-tested)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.usage.intervals import Point, apportion, split

S = 10**9

points = st.builds(Point, mono_ns=st.integers(0, 10**15), wall_ns=st.integers(0, 2 * 10**18))


@given(
    last=points,
    elapsed=st.integers(0, 10**13),
    wall_jump=st.integers(-(10**13), 10**13),
    record_ns=st.integers(1, 10**12),
    final=st.booleans(),
)
def test_split_has_no_gaps_or_overlaps(
    last: Point, elapsed: int, wall_jump: int, record_ns: int, final: bool
) -> None:
    """Pieces chain exactly from the last closed point to now, in both clocks; the
    durations sum to the monotonic time elapsed, whatever the wall clock did."""
    record_ns = max(record_ns, elapsed // 200 + 1)  # at most a few hundred pieces
    now = Point(last.mono_ns + elapsed, max(0, last.wall_ns + elapsed + wall_jump))
    pieces = split(last, now, record_ns, final=final)
    if not pieces:
        assert not final and elapsed < record_ns
        return
    assert pieces[0].start == last
    assert pieces[-1].end.mono_ns == now.mono_ns
    for before, after in itertools.pairwise(pieces):
        assert after.start == before.end
    assert sum(p.duration_ns for p in pieces) == elapsed
    for piece in pieces:
        assert piece.duration_ns >= 0
        assert piece.end.wall_ns >= piece.start.wall_ns  # wall chain never runs backwards
    for piece in pieces[:-1]:
        assert piece.duration_ns == record_ns
    if not final or elapsed >= record_ns:
        assert record_ns <= pieces[-1].duration_ns < 2 * record_ns


def test_split_waits_for_a_full_interval() -> None:
    """Before record_interval has elapsed nothing closes; a final call always closes one."""
    last = Point(100 * S, 1_000 * S)
    assert split(last, Point(159 * S, 1_059 * S), 60 * S, final=False) == []
    [only] = split(last, Point(100 * S, 1_000 * S), 60 * S, final=True)
    assert only.duration_ns == 0


def test_split_after_downtime_yields_regular_intervals() -> None:
    """Five and a half minutes since the last record become five records, the last 90 s."""
    last = Point(0, 1_000 * S)
    pieces = split(last, Point(330 * S, 1_330 * S), 60 * S, final=False)
    assert [p.duration_ns // S for p in pieces] == [60, 60, 60, 60, 90]
    assert [p.end.wall_ns // S for p in pieces] == [1060, 1120, 1180, 1240, 1330]


@pytest.mark.parametrize("jump_s", [-300, 300, -86_400])
def test_wall_clock_steps_do_not_change_durations(jump_s: int) -> None:
    """A wall clock stepped by +-5 min (or a day back) leaves the duration at 60 s;
    only the human timestamps move, and never backwards."""
    last = Point(0, 10_000 * S)
    [piece] = split(last, Point(60 * S, (10_060 + jump_s) * S), 60 * S, final=False)
    assert piece.duration_ns == 60 * S
    assert piece.end.wall_ns == max(last.wall_ns, (10_060 + jump_s) * S)


def test_split_rejects_time_running_backwards() -> None:
    """A 'now' before the last closed point is a bug, reported with both values."""
    with pytest.raises(ValueError, match="before the last closed point"):
        split(Point(10, 0), Point(5, 0), 1, final=True)


@given(
    total=st.integers(0, 10**15),
    weights=st.lists(st.integers(0, 10**12), min_size=1, max_size=20),
)
def test_apportion_preserves_the_total(total: int, weights: list[int]) -> None:
    """Parts sum to the total exactly and each is within one unit of its exact share."""
    parts = apportion(total, weights)
    assert sum(parts) == total
    assert len(parts) == len(weights)
    weight_sum = sum(weights)
    for part, weight in zip(parts, weights, strict=True):
        assert part >= 0
        if weight_sum:
            assert abs(part * weight_sum - total * weight) < weight_sum
            if weight == 0:
                assert part == 0


def test_apportion_rejects_bad_input() -> None:
    """Negative totals or weights and empty weights are errors, not silent zeros."""
    with pytest.raises(ValueError, match="total"):
        apportion(-1, [1])
    with pytest.raises(ValueError, match="negative"):
        apportion(1, [1, -1])
    with pytest.raises(ValueError, match="empty"):
        apportion(1, [])
