"""Whether an exited service container is started again, and after how long.

The lease's ``restart`` policy decides (``never`` | ``on-failure`` | ``always``);
``max_restarts`` bounds the *consecutive* restarts (a streak), and each restart
in a streak waits ``leaserules.restart_backoff(n)``: 1 s, 2 s, 4 s ... at most
5 minutes. A container that ran ``leaserules.STABLE_AFTER_S`` (10 minutes) before
it exited starts a new streak. A liveness failure (``health``) is a failure even
when the server then exits 0 on the SIGTERM.

The counts live in the lease record's ``extra`` in the state DB (keys below), so
an agent killed mid-backoff resumes the same streak instead of starting a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuagent import leaserules

RESTARTS = "restarts"  # total container restarts of the lease
STREAK = "restart_streak"  # consecutive restarts, the one max_restarts bounds
PENDING = "restart_pending"  # counted and waiting for its backoff to end
LIVENESS = "liveness_kill"  # why the agent stopped the container (health failed)


@dataclass(frozen=True)
class Exit:
    """How the container ended, as the manager read it from Docker."""

    exit_code: int | None
    oom_killed: bool
    ran_for: float | None  # seconds from its last start to its exit, when known
    reason: str  # the failure sentence the lease would end with ("" for exit 0)


@dataclass(frozen=True)
class Decision:
    restart: bool  # False: the lease ends FAILED with ``reason``
    delay: float  # seconds to wait before the start
    reason: str  # why the container is restarted, or why the lease now fails
    restarts: int  # the lease's total after this decision
    streak: int


def counts(extra: dict[str, Any]) -> tuple[int, int]:
    """(total restarts, current streak) from a record's ``extra``."""
    return int(extra.get(RESTARTS, 0) or 0), int(extra.get(STREAK, 0) or 0)


def decide(policy: str, max_restarts: int, ended: Exit, extra: dict[str, Any]) -> Decision | None:
    """The decision for an exit the agent did not cause on purpose; None: no restart
    applies (the lease ends as before: succeeded on exit 0, failed otherwise)."""
    liveness = str(extra.get(LIVENESS) or "")
    failed = bool(liveness) or ended.oom_killed or ended.exit_code != 0
    why = liveness or ended.reason or f"container exited with code {ended.exit_code}"
    if policy == "never" or (policy == "on-failure" and not failed):
        if liveness:
            return Decision(False, 0.0, f"liveness check failed: {liveness}", *counts(extra))
        return None
    total, streak = counts(extra)
    if ended.ran_for is not None and ended.ran_for >= leaserules.STABLE_AFTER_S:
        streak = 0
    if streak >= max_restarts:
        return Decision(
            False,
            0.0,
            f"restarted {streak} times in a row (max_restarts {max_restarts}); last exit: {why}",
            total,
            streak,
        )
    streak += 1
    return Decision(True, leaserules.restart_backoff(streak), why, total + 1, streak)
