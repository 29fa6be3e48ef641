"""The scheduler's garbage-collection policy: freeze survivors, collect fully hourly."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from scheduler.gcpolicy import GcPolicy


class Node:
    """A weak-referenceable object to build reference cycles from."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the suite collects normally


def test_survivors_are_frozen_and_a_cycle_dropped_later_waits_for_the_hourly_collection() -> None:
    """After a freeze step, a cycle that was alive then and is garbage now survives
    ordinary full collections (they no longer walk frozen objects); the hourly step
    unfreezes and reclaims it, then freezes again."""
    now = [0.0]
    policy = GcPolicy(freeze_every=10, full_every=3600, clock=lambda: now[0])
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    assert policy.step() == "freeze"
    assert gc.get_freeze_count() > 0
    del a, b
    gc.collect()
    assert ref() is not None, "a frozen cycle was walked by a full collection"
    now[0] = 3599.0
    assert policy.step() == "freeze"
    assert ref() is not None
    now[0] = 3600.0
    assert policy.step() == "full"
    assert ref() is None, "the hourly full collection left frozen garbage behind"
    assert gc.get_freeze_count() > 0  # frozen again after collecting
