"""Several scheduler replicas on one PostgreSQL: who is alive, who leads, who is told what.

* **Registry of replicas.** Each replica keeps a row in ``replicas`` with a heartbeat
  every ``heartbeat_interval``; one silent for ``dead_after`` is dead. A node's row
  names the replica holding its stream (``nodes.replica_id``, set on each Hello).
* **Leadership.** Work that must run once per network (liveness sweep, ledger
  releases and uptime slashing, coverage pruning) runs on the replica holding the
  session-level advisory lock ``LEADER_LOCK``. The lock lives on a dedicated
  connection: a replica that dies (or loses PostgreSQL) loses it with that
  connection, and the next replica's ``pg_try_advisory_lock`` takes it within one
  ``heartbeat_interval``.
* **Notifications.** ``notify(kind, payload)`` is ``pg_notify`` on one channel; every
  replica LISTENs on a dedicated connection and calls the handlers registered for
  ``kind`` on its event loop. ``pending`` asks every replica for a placement pass
  (each places leases on the nodes whose streams it holds), ``cancel`` asks the
  replica holding a node to send it a LeaseCancel.
* **Cut off.** When this replica cannot reach PostgreSQL for ``dead_after`` it calls
  ``on_cut_off`` handlers (the server closes every agent stream with a "move to
  another replica" error) and refuses to lead until it reaches it again.

On SQLite there is one process: it always leads and notifications are local calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .db import Database, PostgresDatabase
from .storage import Conn

log = logging.getLogger(__name__)

CHANNEL = "gpu_scheduler"
LEADER_LOCK = 0x6770_7573_6368_0002
Handler = Callable[[str], None]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Replicas:
    def __init__(
        self,
        db: Database,
        *,
        replica_id: str = "",
        address: str = "",
        relay_url: str = "",
        heartbeat_interval: float = 1.0,
        dead_after: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.replica_id = replica_id or default_replica_id()
        self.address = address
        self.relay_url = relay_url
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.clock = clock
        self.distributed = isinstance(db, PostgresDatabase)
        self.leader = not self.distributed
        self.cut_off = False
        self._handlers: dict[str, list[Handler]] = {}
        self._on_leader: list[Callable[[bool], None]] = []
        self._on_cut_off: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_ok = time.monotonic()  # the lead thread's last good round trip
        self._watch: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- wiring --------------------------------------------------------------------

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_leader(self, handler: Callable[[bool], None]) -> None:
        self._on_leader.append(handler)

    def on_cut_off(self, handler: Callable[[], None]) -> None:
        self._on_cut_off.append(handler)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.distributed:
            return
        now = round(self.clock() * 1e9)
        await self.db.call(
            lambda c: c.execute(
                "INSERT INTO replicas (replica_id, address, relay_url, started_ns, heartbeat_ns)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET"
                " address = excluded.address, relay_url = excluded.relay_url,"
                " started_ns = excluded.started_ns, heartbeat_ns = excluded.heartbeat_ns",
                (self.replica_id, self.address, self.relay_url, now, now),
            )
        )
        self._last_ok = time.monotonic()
        for target, name in (
            (self._lead_loop, "replica-lead"),
            (self._listen_loop, "replica-listen"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watch = asyncio.create_task(self._watchdog(), name="replica-watchdog")
        log.info("replica started", extra={"replica_id": self.replica_id, "address": self.address})

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5.0)
        self._threads.clear()
        if self.distributed and not self.cut_off:
            with contextlib.suppress(Exception):
                await self.db.call(
                    lambda c: c.execute(
                        "DELETE FROM replicas WHERE replica_id = ?", (self.replica_id,)
                    )
                )

    # -- notifications -------------------------------------------------------------

    def notify_in(self, conn: Conn, kind: str, payload: str = "") -> None:
        """Inside a transaction: delivered to every replica when it commits."""
        if conn.dialect == "postgresql":
            conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"{kind}:{payload}"))

    async def notify(self, kind: str, payload: str = "") -> None:
        """Tell every replica (this one included); on SQLite, just this one."""
        if not self.distributed:
            self._dispatch(f"{kind}:{payload}")
            return
        await self.db.call(lambda c: self.notify_in(c, kind, payload))

    def _dispatch(self, message: str) -> None:
        kind, _, payload = message.partition(":")
        for handler in self._handlers.get(kind, ()):
            try:
                handler(payload)
            except Exception:  # one bad handler must not stop the others
                log.exception("replica notification handler failed", extra={"kind": kind})

    # -- queries -------------------------------------------------------------------

    async def live(self) -> dict[str, str]:
        """Replicas heard from within ``dead_after``: replica_id -> address."""
        if not self.distributed:
            return {self.replica_id: self.address}
        horizon = round((self.clock() - self.dead_after) * 1e9)
        rows = await self.db.call(
            lambda c: c.execute(
                "SELECT replica_id, address FROM replicas WHERE heartbeat_ns >= ?"
                " ORDER BY replica_id",
                (horizon,),
            ).fetchall()
        )
        return {str(r[0]): str(r[1]) for r in rows}

    async def nodes_held_elsewhere(self) -> set[str]:
        """Nodes whose stream a live replica other than this one holds."""
        if not self.distributed:
            return set()
        horizon = round((self.clock() - self.dead_after) * 1e9)
        rows = await self.db.call(
            lambda c: c.execute(
                "SELECT n.node_id FROM nodes n JOIN replicas r ON r.replica_id = n.replica_id"
                " WHERE r.replica_id != ? AND r.heartbeat_ns >= ?",
                (self.replica_id, horizon),
            ).fetchall()
        )
        return {str(r[0]) for r in rows}

    async def relay_holding(self, node_id: str) -> str:
        """The relay URL of the live replica other than this one that holds the node's
        stream (and so its tunnel, with an embedded relay); "" when none or unknown."""
        if not self.distributed:
            return ""
        horizon = round((self.clock() - self.dead_after) * 1e9)
        row = await self.db.call(
            lambda c: c.execute(
                "SELECT r.relay_url FROM nodes n JOIN replicas r ON r.replica_id = n.replica_id"
                " WHERE n.node_id = ? AND r.replica_id != ? AND r.heartbeat_ns >= ?",
                (node_id, self.replica_id, horizon),
            ).fetchone()
        )
        return str(row[0]) if row and row[0] else ""

    def claim_in(self, conn: Conn, node_id: str) -> None:
        """Inside a Hello's transaction: this replica now holds the node's stream."""
        conn.execute(
            "UPDATE nodes SET replica_id = ? WHERE node_id = ?", (self.replica_id, node_id)
        )

    # -- threads -------------------------------------------------------------------

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(fn, *args)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.leader:
            return
        self.leader = leader
        log.warning(
            "replica leadership %s",
            "taken" if leader else "lost",
            extra={"replica_id": self.replica_id},
        )
        for handler in self._on_leader:
            handler(leader)

    def _set_cut_off(self, cut: bool) -> None:
        if cut == self.cut_off:
            return
        self.cut_off = cut
        if cut:
            log.error(
                "replica cut off from its database: closing agent streams so they move",
                extra={"replica_id": self.replica_id},
            )
            for handler in self._on_cut_off:
                handler()
        else:
            log.warning("replica reached its database again", extra={"replica_id": self.replica_id})

    async def _watchdog(self) -> None:
        """From the event loop, so a heartbeat stuck on a silent network counts too: no
        good round trip for ``dead_after`` means cut off, and no longer leading (the
        lock may be gone with a connection we cannot see)."""
        while True:
            await asyncio.sleep(self.heartbeat_interval / 2)
            if time.monotonic() - self._last_ok >= self.dead_after:
                self._set_leader(False)
                self._set_cut_off(True)

    def _lead_loop(self) -> None:
        """Heartbeat the replica row and hold (or try for) the leader lock."""
        assert isinstance(self.db, PostgresDatabase)
        conn: Any = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.db.connect()
                now = round(self.clock() * 1e9)
                conn.execute(
                    "UPDATE replicas SET heartbeat_ns = %s WHERE replica_id = %s",
                    (now, self.replica_id),
                )
                if not self.leader:
                    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                    if got.fetchone()[0]:
                        self._call_soon(self._set_leader, True)
                self._last_ok = time.monotonic()
                self._call_soon(self._set_cut_off, False)
            except Exception as exc:
                log.warning("replica heartbeat failed", extra={"error": str(exc)[:200]})
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                # The lock went with the connection: whoever takes it next leads.
                self._call_soon(self._set_leader, False)
            self._stop.wait(self.heartbeat_interval)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _listen_loop(self) -> None:
        assert isinstance(self.db, PostgresDatabase)
        while not self._stop.is_set():
            try:
                with self.db.connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # A notification sent while no one listened is lost: after
                    # (re)connecting, ask for the work it may have carried.
                    self._call_soon(self._dispatch, "resync:")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._call_soon(self._dispatch, note.payload)
            except Exception as exc:
                log.warning("replica LISTEN connection failed", extra={"error": str(exc)[:200]})
                self._stop.wait(self.heartbeat_interval)
