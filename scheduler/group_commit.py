"""Group commit: many small writes from many streams share one SQLite transaction.

At fleet scale (docs/performance.md) one ``BEGIN IMMEDIATE .. COMMIT`` (and fsync)
per Hello or heartbeat saturates the single database thread: 10,000 agents
connected at ~45/s and their heartbeats queued behind each other. Here a write
still returns only once it is durable, but writes that arrive while a commit is
in flight are queued and committed together by one writer task.

Each write runs inside its own SAVEPOINT, so one failing write is rolled back
alone and raises to its own caller; the others in the batch still commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from .db import Database
from .storage import Conn, RetryableError

log = logging.getLogger(__name__)

T = TypeVar("T")
Write = Callable[[Conn], Any]


class GroupCommit:
    """``await write(fn)``: run ``fn(conn)`` in the next shared transaction."""

    def __init__(self, db: Database, *, max_batch: int = 2000) -> None:
        self.db = db
        # Bounds one transaction's length, so a storm cannot hold the thread for long.
        self.max_batch = max_batch
        self._queue: list[tuple[Write, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # commits made, for tests and benchmarks
        self.writes = 0

    async def write(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` on the database thread; returns after its transaction committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # Retrieved here so a write whose caller went away logs no "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append((fn, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="group-commit")
        # Shielded: a cancelled stream must not cancel a write others share.
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            fns = [fn for fn, _ in batch]

            def run(conn: Conn, fns: list[Write] = fns) -> list[tuple[bool, Any]]:
                return _run_batch(conn, fns)

            try:
                outcomes = await self.db.call(run)
            except Exception as exc:  # the transaction itself failed: every write did
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.writes += len(batch)
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)


def _run_batch(conn: Conn, fns: list[Write]) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    for fn in fns:
        conn.execute("SAVEPOINT w")
        try:
            value = fn(conn)
        except RetryableError:
            raise  # the whole transaction lost a race (PostgreSQL): Database.call reruns it
        except Exception as exc:
            conn.execute("ROLLBACK TO w")
            conn.execute("RELEASE w")
            outcomes.append((False, exc))
            continue
        conn.execute("RELEASE w")
        outcomes.append((True, value))
    return outcomes
