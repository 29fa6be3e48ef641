"""Small asyncio helpers both programs share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, within: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``within`` seconds (a pace, not a
    deadline: nothing is cancelled but the waits themselves)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_together(
    *coros: Coroutine[Any, Any, Any], return_when: str = asyncio.FIRST_COMPLETED
) -> None:
    """Run ``coros`` as tasks until ``return_when`` holds (the two directions of a byte
    pipe, say), then cancel and await the rest. Their errors end the run and are not
    raised: a pipe whose one side failed is simply over."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.wait(tasks, return_when=return_when)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def stop_on_signals(*signals: int) -> asyncio.Event:
    """An event the running loop sets on any of ``signals`` (SIGTERM, SIGINT): how a
    daemon's main coroutine learns it should shut down in its own phases."""
    import signal as signal_module

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals or (signal_module.SIGTERM, signal_module.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class TaskSet:
    """Background tasks a part started and must be able to cancel: each is held until
    it ends (asyncio keeps only weak references to tasks, so an unheld task can vanish
    mid-run), and ``cancel`` stops and awaits whatever is still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def cancel(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
