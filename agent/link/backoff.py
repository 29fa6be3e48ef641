"""gRPC's connection-backoff algorithm (doc/connection-backoff.md in grpc/grpc).

The first retry waits ``initial``; each later one multiplies by ``multiplier``,
caps at ``maximum`` and then adds uniform jitter of +-``jitter`` of the delay, so
a fleet of agents that lost the same coordinator does not return in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable

INITIAL_BACKOFF = 1.0
MULTIPLIER = 1.6
JITTER = 0.2
MAX_BACKOFF = 120.0


class Backoff:
    def __init__(
        self,
        initial: float = INITIAL_BACKOFF,
        maximum: float = MAX_BACKOFF,
        multiplier: float = MULTIPLIER,
        jitter: float = JITTER,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1 or not 0 <= jitter < 1:
            raise ValueError(
                "backoff needs 0 < initial <= maximum, multiplier >= 1, 0 <= jitter < 1"
            )
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._uniform = uniform
        self._current: float | None = None

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt."""
        if self._current is None:
            # The spec's first deadline is INITIAL_BACKOFF exactly, without jitter.
            self._current = self.initial
            return self.initial
        self._current = min(self._current * self.multiplier, self.maximum)
        spread = self.jitter * self._current
        return self._current + self._uniform(-spread, spread)

    def reset(self) -> None:
        """After a healthy session: the next failure starts over at ``initial``."""
        self._current = None
