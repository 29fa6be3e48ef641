"""Readiness: is this node able to take leases right now?

Each check may block (a Docker ping, an NVML call), so every check runs through
a ``BoundedCall``: all start together and share one deadline, and a check that
does not answer in time counts as failed ("timed out"), never as a hung probe.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .bounded import BoundedCall


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str = ""


# A check returns a CheckResult, or a bare bool; raising means "not ok".
Check = Callable[[], CheckResult | bool]


def _normalise(fn: Check) -> Callable[[], CheckResult]:
    def run() -> CheckResult:
        result = fn()
        return result if isinstance(result, CheckResult) else CheckResult(bool(result))

    return run


class Readiness:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self._timeout = timeout
        self._clock = clock
        self._checks: dict[str, BoundedCall[CheckResult]] = {}
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None

    def add(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = BoundedCall(_normalise(check), f"ready-{name}", self._clock)

    def evaluate(self) -> dict[str, Any]:
        """Run every check under one shared deadline; ``{"ready", "checks": {name: ...}}``."""
        with self._lock:
            checks = dict(self._checks)
        for call in checks.values():
            call.begin()
        deadline = time.monotonic() + self._timeout
        results: dict[str, dict[str, Any]] = {}
        for name, call in checks.items():
            outcome = call.call(max(deadline - time.monotonic(), 0.0))
            if outcome.ok and outcome.value is not None:
                results[name] = {"ok": outcome.value.ok, "detail": outcome.value.detail}
            else:
                results[name] = {"ok": False, "detail": outcome.error or "failed"}
        doc = {
            "ready": all(r["ok"] for r in results.values()),
            "checked_at": self._clock(),
            "checks": results,
        }
        with self._lock:
            self._last = doc
        return doc

    def last(self) -> dict[str, Any] | None:
        """The last evaluation, without running any check (for the status document)."""
        with self._lock:
            return self._last


def coordinator_check(connected: Callable[[], bool]) -> Check:
    def check() -> CheckResult:
        ok = connected()
        return CheckResult(ok, "connected" if ok else "not connected to the coordinator")

    return check


def docker_check(ping: Callable[[], object]) -> Check:
    """``ping``: e.g. ``docker_client.ping`` (blocking; raises when unreachable)."""

    def check() -> CheckResult:
        ping()
        return CheckResult(True, "reachable")

    return check


class _CountsGpus(Protocol):
    def device_count(self) -> int: ...


def nvml_check(source: _CountsGpus) -> Check:
    """NVML answers and sees at least one GPU; ``source`` is e.g. an ``NvmlGpuSource``,
    which initialises NVML itself (a bare module would answer ``Uninitialized``)."""

    def check() -> CheckResult:
        count = source.device_count()
        return CheckResult(count > 0, f"{count} GPUs" if count else "NVML sees no GPUs")

    return check


def disk_check(path: Path, min_free: int) -> Check:
    """Not ready when ``path``'s filesystem has less than ``min_free`` bytes free:
    the state DB and usage outbox live there, and a lease whose records cannot be
    stored must not start."""

    def check() -> CheckResult:
        free = shutil.disk_usage(path).free
        if free < min_free:
            return CheckResult(False, f"only {free} bytes free under {path} (need {min_free})")
        return CheckResult(True, f"{free} bytes free")

    return check
