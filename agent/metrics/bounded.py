"""Call a blocking function under a deadline, and remember its last good result.

A scrape must answer even when NVML or Docker hangs. ``BoundedCall`` runs the
function in a daemon thread and waits at most ``timeout``; on a timeout or an
error it returns the last good value with the time it was read, so callers can
serve stale data and say how stale. At most one call is in flight: while a call
is stuck, later callers wait on that same call instead of piling up threads
behind a hung driver. Daemon threads (not an executor) so a call stuck forever
cannot block interpreter exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """``ok``: this call returned fresh data. ``value``/``at``: the newest good
    value and the wall-clock time it was read (None when there never was one)."""

    ok: bool
    value: T | None
    at: float | None
    error: str | None = None


class BoundedCall(Generic[T]):
    def __init__(
        self, fn: Callable[[], T], name: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._fn = fn
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: Future[tuple[T, float]] | None = None
        self._last: T | None = None
        self._last_at: float | None = None

    def _start(self) -> Future[tuple[T, float]]:
        future: Future[tuple[T, float]] = Future()

        def work() -> None:
            try:
                value = self._fn()
            except BaseException as exc:  # handed to the waiter, which decides what it means
                future.set_exception(exc)
            else:
                future.set_result((value, self._clock()))

        threading.Thread(target=work, name=f"bounded-{self._name}", daemon=True).start()
        return future

    def _absorb(self, future: Future[tuple[T, float]]) -> None:
        # Caller holds the lock. Keeps the newest good value.
        if self._inflight is future:
            self._inflight = None
        if future.exception() is None:
            value, at = future.result()
            if self._last_at is None or at >= self._last_at:
                self._last, self._last_at = value, at

    def begin(self) -> Future[tuple[T, float]]:
        """Start a call unless one is in flight; lets callers overlap several deadlines."""
        with self._lock:
            future = self._inflight
            if future is not None and future.done():
                # A call that outlived an earlier deadline has since finished:
                # keep its value, but read again rather than serve it as fresh.
                self._absorb(future)
                future = None
            if future is None:
                future = self._inflight = self._start()
            return future

    def call(self, timeout: float) -> Outcome[T]:
        future = self.begin()
        try:
            future.result(timeout=max(timeout, 0.0))
        except FutureTimeout:
            with self._lock:
                return Outcome(False, self._last, self._last_at, f"timed out after {timeout:g}s")
        except Exception as exc:
            with self._lock:
                self._absorb(future)
                return Outcome(False, self._last, self._last_at, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._absorb(future)
            return Outcome(True, self._last, self._last_at)

    @property
    def last(self) -> tuple[T | None, float | None]:
        with self._lock:
            return self._last, self._last_at
