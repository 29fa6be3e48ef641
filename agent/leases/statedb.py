"""The local state DB: ``<state_dir>/state.db``, what the agent believes about leases.

SQLite in WAL mode with ``synchronous=FULL``: a state change is on disk before
it is reported, so a crash can lose a report (it is re-sent) but never a fact.
Calls block; daemon code runs them in a worker thread. One connection is shared
behind a lock, which is simpler than a connection per thread and fast enough
for a handful of writes per lease.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .records import LeaseRecord, LeaseUpdate
from .states import TERMINAL_STATES, LeaseState

log = logging.getLogger(__name__)

STATE_DB_NAME = "state.db"

# Migration N (1-based) takes the schema from version N-1 to N. Append only.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        gpu_uuids TEXT NOT NULL DEFAULT '[]',
        container_id TEXT,
        exit_code INTEGER,
        reason TEXT NOT NULL DEFAULT '',
        log_tail TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        started_at REAL,
        stop_state TEXT,
        stop_reason TEXT NOT NULL DEFAULT '',
        update_seq INTEGER NOT NULL DEFAULT 0,
        extra TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX leases_state ON leases(state);
    CREATE TABLE lease_updates (
        lease_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (lease_id, seq)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "lease_id, state, spec, gpu_uuids, container_id, exit_code, reason, log_tail, created_at, "
    "updated_at, expires_at, started_at, stop_state, stop_reason, update_seq, extra"
)


class StateDBError(Exception):
    """The state DB cannot be used; the message says which file and why."""


class StateDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateDBError(f"state DB {path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> StateDB:
        return cls(state_dir / STATE_DB_NAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StateDBError(
                    f"state DB {self.path} has schema {version}, newer than this agent's "
                    f"{SCHEMA_VERSION}: upgrade the agent or move the file aside"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
                log.info("state DB migrated", extra={"path": str(self.path), "schema": number})

    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def insert_new(self, record: LeaseRecord, update: LeaseUpdate | None = None) -> bool:
        """Insert a lease unless one with its id exists; False means it did."""
        with self._tx() as conn:
            exists = conn.execute(
                "SELECT 1 FROM leases WHERE lease_id = ?", (record.lease_id,)
            ).fetchone()
            if exists:
                return False
            self._write(conn, record, update)
            return True

    def save(self, record: LeaseRecord, update: LeaseUpdate | None = None) -> None:
        """Store the record and, in the same transaction, the update reporting it."""
        with self._tx() as conn:
            self._write(conn, record, update)

    @staticmethod
    def _write(conn: sqlite3.Connection, record: LeaseRecord, update: LeaseUpdate | None) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO leases ({_COLUMNS}) "  # noqa: S608 - constant column list
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.lease_id,
                record.state.value,
                json.dumps(record.spec, sort_keys=True),
                json.dumps(list(record.gpu_uuids)),
                record.container_id,
                record.exit_code,
                record.reason,
                record.log_tail,
                record.created_at,
                record.updated_at,
                record.expires_at,
                record.started_at,
                record.stop_state.value if record.stop_state else None,
                record.stop_reason,
                record.update_seq,
                json.dumps(record.extra, sort_keys=True),
            ),
        )
        if update is not None:
            conn.execute(
                "INSERT OR REPLACE INTO lease_updates (lease_id, seq, payload) VALUES (?, ?, ?)",
                (update.lease_id, update.seq, update.to_json()),
            )

    def get(self, lease_id: str) -> LeaseRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE lease_id = ?",  # noqa: S608 - constant
                (lease_id,),
            ).fetchone()
        return _record(row) if row else None

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        query = f"SELECT {_COLUMNS} FROM leases"  # noqa: S608 - constant column list
        params: tuple[str, ...] = ()
        if active_only:
            marks = ", ".join("?" for _ in TERMINAL_STATES)
            query += f" WHERE state NOT IN ({marks})"
            params = tuple(s.value for s in TERMINAL_STATES)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY created_at, lease_id", params).fetchall()
        return [_record(row) for row in rows]

    def pending_updates(self) -> list[LeaseUpdate]:
        """Updates not yet acknowledged by the coordinator, oldest first per lease."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload FROM lease_updates ORDER BY lease_id, seq"
            ).fetchall()
        return [LeaseUpdate.from_json(row[0]) for row in rows]

    def ack_update(self, lease_id: str, seq: int) -> int:
        """The coordinator stored updates up to ``seq``: forget them. Returns how many."""
        with self._tx() as conn:
            cursor = conn.execute(
                "DELETE FROM lease_updates WHERE lease_id = ? AND seq <= ?", (lease_id, seq)
            )
            return cursor.rowcount


def _record(row: tuple[Any, ...]) -> LeaseRecord:
    (
        lease_id,
        state,
        spec,
        gpu_uuids,
        container_id,
        exit_code,
        reason,
        log_tail,
        created_at,
        updated_at,
        expires_at,
        started_at,
        stop_state,
        stop_reason,
        update_seq,
        extra,
    ) = row
    return LeaseRecord(
        lease_id=lease_id,
        state=LeaseState(state),
        spec=json.loads(spec),
        gpu_uuids=tuple(json.loads(gpu_uuids)),
        container_id=container_id,
        exit_code=exit_code,
        reason=reason,
        log_tail=log_tail,
        created_at=created_at,
        updated_at=updated_at,
        expires_at=expires_at,
        started_at=started_at,
        stop_state=LeaseState(stop_state) if stop_state else None,
        stop_reason=stop_reason,
        update_seq=update_seq,
        extra=json.loads(extra),
    )
