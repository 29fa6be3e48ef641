"""systemd readiness: READY after the first Welcome, or degraded-ready if the
coordinator is away.

systemd would otherwise keep the unit in 'activating' (and time it out) while the
coordinator is down, although the agent works: leases keep running and usage
keeps accruing.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gpuagent import sdnotify
from gpuagent.aio import wait_any

from .config import CoordinatorConfig


class Connection(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    async def wait_connected(self) -> None: ...


async def announce_ready(stop: asyncio.Event, link: Connection, config: CoordinatorConfig) -> None:
    connected = asyncio.Event()

    async def watch() -> None:
        await link.wait_connected()
        connected.set()

    watcher = asyncio.ensure_future(watch())
    try:
        await wait_any(connected, stop, within=config.call_timeout * 3)
    finally:
        watcher.cancel()
    if stop.is_set():
        return
    if link.connected:
        sdnotify.ready(status=f"connected to {config.address}")
    else:
        sdnotify.ready(
            status=f"degraded: coordinator {config.address} unreachable "
            f"({link.last_error or 'no answer'}); leases keep running"
        )
    await stop.wait()
    sdnotify.stopping(status="stopping: running containers are left to Docker")
