"""Reconnect backoff follows gRPC's connection-backoff spec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.link import Backoff


def test_schedule_without_jitter_is_1s_times_1_6_capped_at_120s() -> None:
    """1, 1.6, 2.56, ... and never above 120 s."""
    backoff = Backoff(uniform=lambda lo, hi: 0.0)
    delays = [backoff.next_delay() for _ in range(15)]
    assert delays[:4] == pytest.approx([1.0, 1.6, 2.56, 4.096])
    assert max(delays) == 120.0
    assert delays[-1] == 120.0


@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=30))
def test_jitter_stays_within_20_percent(draws: list[float]) -> None:
    """Whatever the random source returns in its range, each delay is within +-20 %
    of the un-jittered schedule."""
    it = iter(draws * 2)
    backoff = Backoff(uniform=lambda lo, hi: lo + (hi - lo) * next(it, 0.5))
    plain = Backoff(uniform=lambda lo, hi: 0.0)
    for _ in range(len(draws)):
        got, base = backoff.next_delay(), plain.next_delay()
        assert base * 0.8 - 1e-9 <= got <= base * 1.2 + 1e-9


def test_reset_after_healthy_session_starts_over() -> None:
    """After reset() the next delay is the initial one again."""
    backoff = Backoff(uniform=lambda lo, hi: 0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_invalid_parameters_are_refused() -> None:
    """A cap below the initial delay is a configuration mistake, not a silent clamp."""
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(initial=5, maximum=1)
