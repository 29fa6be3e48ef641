"""Drain: no new leases while it is on; at its deadline the running ones are stopped.

Set by the coordinator (``Drain``, ``Welcome.draining``) or locally (``gpu-agent
drain``); read by what the link reports (free GPUs, the draining flag). The
disconnect guard, off by default, stops leases after a long coordinator outage
(like Nomad's ``stop_on_client_after``) through the same ``cancel_all``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gpuagent import sdnotify

if TYPE_CHECKING:
    from .leases.manager import LeaseManager

log = logging.getLogger(__name__)


async def stop_all(leases: LeaseManager, reason: str) -> None:
    """Cancel every lease not yet ended, saying why."""
    running = [v.lease_id for v in leases.snapshot().leases if not v.state.terminal]
    if running:
        log.warning("stopping running leases", extra={"reason": reason, "leases": running})
    for lease_id in running:
        await leases.cancel(lease_id, reason)


class DrainController:
    def __init__(self, stop_leases: Callable[[str], Awaitable[None]]) -> None:
        self.stop_leases = stop_leases
        self.draining = False
        self.deadline: float | None = None  # unix seconds
        self._deadline_task: asyncio.Task[None] | None = None

    async def on_drain(self, msg: Any) -> None:
        """The coordinator's ``Drain`` message."""
        deadline = msg.deadline_unix_nanos / 1e9 if msg.deadline_unix_nanos else None
        source = f"coordinator: {msg.reason}" if msg.reason else "coordinator"
        self.set(msg.enabled, source, deadline)

    def set(self, draining: bool, source: str, deadline: float | None = None) -> None:
        """No new leases while draining; at ``deadline`` the running ones are stopped."""
        if draining == self.draining and deadline == self.deadline:
            return
        self.draining = draining
        self.deadline = deadline if draining else None
        if self._deadline_task is not None:
            self._deadline_task.cancel()
            self._deadline_task = None
        if draining and deadline is not None:
            self._deadline_task = asyncio.get_running_loop().create_task(
                self._stop_at_deadline(deadline), name="drain-deadline"
            )
        log.warning(
            "drain %s",
            "enabled: no new leases" if draining else "lifted",
            extra={"source": source, "deadline": deadline},
        )
        sdnotify.status("draining" if draining else "running")

    async def _stop_at_deadline(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        await self.stop_leases("drain deadline reached")


async def disconnect_guard(
    stop: asyncio.Event,
    connected: Callable[[], bool],
    limit: Callable[[], float | None],
    drain: DrainController,
) -> None:
    """Stop every lease once the coordinator has been away for ``limit()`` seconds
    (``coordinator.stop_leases_after_disconnect``; None, the default, never)."""
    while not stop.is_set():
        seconds = limit()
        if seconds is not None and not connected():
            since = time.monotonic()
            while not stop.is_set() and not connected():
                if time.monotonic() - since >= seconds:
                    await drain.stop_leases(
                        f"no coordinator for {seconds:.0f}s "
                        "(coordinator.stop_leases_after_disconnect)"
                    )
                    break
                await _wait(stop, 1.0)
            while not stop.is_set() and not connected():
                await _wait(stop, 1.0)
        await _wait(stop, 1.0)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
