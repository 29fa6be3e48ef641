"""Garbage collection for a scheduler that holds thousands of streams.

Each open Connect stream keeps about 125 objects the cyclic garbage collector
tracks (grpc.aio's call state, coroutines, tasks, futures, closures). At 10,000
agents that is over a million, and CPython's full collection of the oldest
generation walks all of them: about a second with the event loop stopped, in
which every heartbeat and placement waits (docs/performance.md measured it as
the heartbeat p99 at 10k agents).

So, every second, what has survived so far is moved out of the collector's
sight (``gc.freeze()``, which costs nothing) and every collection only walks
what is newer: both the full ones and the young ones, which CPython triggers by
allocations minus deallocations and which therefore grow huge when every new
message's objects replace an old message's (200 ms young collections measured
at 10k streams before, 30 ms after). Frozen objects are still freed by reference
counting; only cycles that become garbage after being frozen wait, and once an
hour everything is unfrozen and collected in one full pause (then frozen again),
so such cycles cannot pile up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FREEZE_EVERY = 1.0
FULL_EVERY = 3600.0


class GcPolicy:
    def __init__(
        self,
        freeze_every: float = FREEZE_EVERY,
        full_every: float = FULL_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.freeze_every = freeze_every
        self.full_every = full_every
        self._clock = clock
        self._last_full = clock()

    def step(self) -> str:
        """One round: ``"freeze"`` normally, ``"full"`` when the hourly collection was due."""
        now = self._clock()
        if now - self._last_full >= self.full_every:
            self._last_full = now
            started = time.perf_counter()
            gc.unfreeze()
            collected = gc.collect()
            gc.freeze()
            log.info(
                "full garbage collection",
                extra={
                    "collected": collected,
                    "frozen": gc.get_freeze_count(),
                    "pause_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            return "full"
        # No collection first: a young collection here is the very pause this avoids
        # (tens of ms at 10k streams). Cyclic garbage frozen along waits for the hour.
        gc.freeze()
        return "freeze"

    async def run(self) -> None:
        """Step every ``freeze_every`` seconds until cancelled; unfreezes on the way out."""
        try:
            while True:
                await asyncio.sleep(self.freeze_every)
                self.step()
        finally:
            gc.unfreeze()
