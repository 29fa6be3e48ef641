"""The usage outbox: signed records kept on disk until the coordinator acks them.

SQLite in WAL mode with ``synchronous=FULL``: a transaction that returned from
COMMIT survives power loss. A record is appended (and its lease's cursor moved
past it, in the same transaction) before anything is sent, so a crash at any
point either keeps the record and the cursor or neither, and the next interval
starts exactly where the last durable one ended.

Sequence numbers are assigned inside the append transaction from a stored
high-water mark, never from ``max(seq)``: pruning acked records must not let a
seq be handed out twice. Records are never dropped; when the backlog passes a
bound, ``backlog_alert`` turns on and metering carries on.

Thread-safe: one connection behind a lock; the daemon calls it via
``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuagent.usage import (
    SignedUsageRecord,
    UsageRecord,
    canonical_bytes,
    decode_canonical,
    sign_record,
    validate_record,
)

log = logging.getLogger(__name__)

OUTBOX_FILE_NAME = "usage.db"  # in the node's state_dir
# 2: lease_totals.unmeasured (schema 1 outboxes are upgraded in place when opened).
SCHEMA_VERSION = 2

# Test hook: called with a step name ("appended": rows written, not committed;
# "committed"; "acked") so crash tests can kill the process at that point.
Failpoint = Callable[[str], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    lease_id TEXT NOT NULL,
    appended_unix_ns INTEGER NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_lease ON records (lease_id);
CREATE TABLE IF NOT EXISTS cursors (
    lease_id TEXT PRIMARY KEY,
    end_mono_ns INTEGER NOT NULL,
    end_wall_ns INTEGER NOT NULL,
    counters TEXT NOT NULL,
    closed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_totals (
    lease_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_start_unix_ns INTEGER NOT NULL,
    last_end_unix_ns INTEGER NOT NULL,
    duration_ns INTEGER NOT NULL,
    gpu_ns INTEGER NOT NULL,
    energy_mj INTEGER NOT NULL,
    energy_estimated INTEGER NOT NULL,
    cpu_usec INTEGER NOT NULL,
    peak_memory_bytes INTEGER NOT NULL,
    peak_gpu_memory_bytes INTEGER NOT NULL,
    net_rx_bytes INTEGER NOT NULL,
    net_tx_bytes INTEGER NOT NULL,
    final INTEGER NOT NULL,
    unmeasured INTEGER NOT NULL DEFAULT 0  -- OR of the records' Unmeasured bits
);
"""


class OutboxError(Exception):
    """The outbox cannot be used as it is; the message names the file and the cause."""


@dataclass(frozen=True)
class LeaseCursor:
    """Where a lease's last closed interval ended, and the counters read there.

    ``counters`` holds cumulative readings (CPU, network, energy per GPU...) so the
    first interval after a restart bills what happened while the agent was down.
    """

    lease_id: str
    end_mono_ns: int
    end_wall_ns: int
    counters: Mapping[str, Any] = field(default_factory=dict)
    closed: bool = False


@dataclass(frozen=True)
class OutboxStats:
    last_seq: int  # highest seq ever assigned
    acked_seq: int  # every seq <= this is stored by the coordinator
    pending: int
    oldest_pending_unix_ns: int | None
    backlog_alert: bool

    def oldest_pending_age_s(self, now_unix_ns: int | None = None) -> float | None:
        if self.oldest_pending_unix_ns is None:
            return None
        now = time.time_ns() if now_unix_ns is None else now_unix_ns
        return max(0.0, (now - self.oldest_pending_unix_ns) / 1e9)


@dataclass(frozen=True)
class LeaseTotals:
    lease_id: str
    records: int
    pending: int
    last_seq: int
    first_start_unix_ns: int
    last_end_unix_ns: int
    duration_ns: int
    gpu_ns: int
    energy_mj: int
    energy_estimated: bool
    cpu_usec: int
    peak_memory_bytes: int
    peak_gpu_memory_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    final: bool
    unmeasured: int = 0  # OR of the records' Unmeasured bits: a set bit = some interval unread

    @property
    def acked(self) -> int:
        return self.records - self.pending


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        alert_records: int = 100_000,
        failpoint: Failpoint | None = None,
        clock_wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self.alert_records = alert_records
        self._failpoint = failpoint
        self._clock_wall_ns = clock_wall_ns
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so
            # the module never opens or commits one behind our back.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"{path}: cannot open the usage outbox: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._check_schema_version()
        except sqlite3.Error as exc:
            self._db.close()
            raise OutboxError(f"{path}: cannot open the usage outbox: {exc}") from None
        except OutboxError:
            self._db.close()
            raise

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', 0)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('acked_seq', 0)")
        elif row[0] == 1:
            # Schema 1 had no unmeasured bits in the totals; its records' bits are
            # still in their bodies, but a lease's pruned records are gone, so the
            # upgraded totals only know about records from now on.
            self._db.execute(
                "ALTER TABLE lease_totals ADD COLUMN unmeasured INTEGER NOT NULL DEFAULT 0"
            )
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise OutboxError(
                f"{self.path}: outbox schema {row[0]} is not {SCHEMA_VERSION}; "
                "was it written by another agent version?"
            )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _hit(self, step: str) -> None:
        if self._failpoint is not None:
            self._failpoint(step)

    def append_many(
        self,
        records: Sequence[UsageRecord],
        sign: Callable[[bytes], bytes],
        cursors: Iterable[LeaseCursor] = (),
    ) -> list[SignedUsageRecord]:
        """Assign seqs, sign and store ``records`` and move ``cursors``, atomically.

        ``records`` come with ``seq=0``; the stored, signed records are returned in
        seq order. Durable when this returns (WAL + synchronous=FULL); on any error
        nothing of the call is stored.
        """
        with self._lock, self._transaction():
            seq = self._meta("last_seq")
            now = self._clock_wall_ns()
            signed: list[SignedUsageRecord] = []
            for draft in records:
                seq += 1
                record = draft.with_seq(seq)
                validate_record(record)
                signature = sign_record(record, sign)
                self._db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                    (seq, record.lease_id, now, canonical_bytes(record), signature),
                )
                self._add_to_totals(record)
                signed.append(SignedUsageRecord(record, signature))
            self._set_meta("last_seq", seq)
            for cursor in cursors:
                self._db.execute(
                    "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?)",
                    (
                        cursor.lease_id,
                        cursor.end_mono_ns,
                        cursor.end_wall_ns,
                        json.dumps(dict(cursor.counters), sort_keys=True),
                        int(cursor.closed),
                    ),
                )
            self._hit("appended")
        self._hit("committed")
        return signed

    def _add_to_totals(self, r: UsageRecord) -> None:
        self._db.execute(
            """
            INSERT INTO lease_totals VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (lease_id) DO UPDATE SET
                records = records + 1,
                last_seq = excluded.last_seq,
                first_start_unix_ns = min(first_start_unix_ns, excluded.first_start_unix_ns),
                last_end_unix_ns = max(last_end_unix_ns, excluded.last_end_unix_ns),
                duration_ns = duration_ns + excluded.duration_ns,
                gpu_ns = gpu_ns + excluded.gpu_ns,
                energy_mj = energy_mj + excluded.energy_mj,
                energy_estimated = max(energy_estimated, excluded.energy_estimated),
                cpu_usec = cpu_usec + excluded.cpu_usec,
                peak_memory_bytes = max(peak_memory_bytes, excluded.peak_memory_bytes),
                peak_gpu_memory_bytes = max(peak_gpu_memory_bytes, excluded.peak_gpu_memory_bytes),
                net_rx_bytes = net_rx_bytes + excluded.net_rx_bytes,
                net_tx_bytes = net_tx_bytes + excluded.net_tx_bytes,
                final = max(final, excluded.final),
                unmeasured = unmeasured | excluded.unmeasured
            """,
            (
                r.lease_id,
                r.seq,
                r.start_unix_ns,
                r.end_unix_ns,
                r.duration_ns,
                r.gpu_ns,
                r.energy_mj,
                int(r.energy_estimated),
                r.cpu_usec,
                r.peak_memory_bytes,
                r.peak_gpu_memory_bytes,
                r.net_rx_bytes,
                r.net_tx_bytes,
                int(r.final),
                r.unmeasured,
            ),
        )

    def pending(self, limit: int, after_seq: int = 0) -> list[SignedUsageRecord]:
        """Unacked records with seq > ``after_seq``, ascending, at most ``limit``.

        After a reconnect, start from 0: everything unacked is sent again (the
        coordinator stores each seq once, so a replay is harmless).
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT body, signature FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SignedUsageRecord(decode_canonical(body), bytes(sig)) for body, sig in rows]

    def ack(self, upto_seq: int) -> int:
        """Record that every seq <= ``upto_seq`` is stored; prune them. Returns the count.

        Idempotent and never moves backwards. An ack beyond any seq we assigned
        means the coordinator already holds those numbers (say, this node's state
        was restored from an old backup): new records then continue above it, so
        none is ever taken for a duplicate and dropped.
        """
        if upto_seq < 0:
            raise ValueError(f"ack seq must not be negative, got {upto_seq}")
        with self._lock, self._transaction():
            acked = self._meta("acked_seq")
            if upto_seq <= acked:
                return 0
            last = self._meta("last_seq")
            if upto_seq > last:
                log.error(
                    "coordinator acked seqs this outbox never assigned; skipping past them",
                    extra={"acked_seq": upto_seq, "last_seq": last, "outbox": str(self.path)},
                )
                self._set_meta("last_seq", upto_seq)
            cur = self._db.execute("DELETE FROM records WHERE seq <= ?", (upto_seq,))
            self._set_meta("acked_seq", upto_seq)
            pruned = cur.rowcount
        self._hit("acked")
        return pruned

    def stats(self) -> OutboxStats:
        with self._lock:
            pending, oldest = self._db.execute(
                "SELECT count(*), min(appended_unix_ns) FROM records"
            ).fetchone()
            last, acked = self._meta("last_seq"), self._meta("acked_seq")
        return OutboxStats(
            last_seq=last,
            acked_seq=acked,
            pending=pending,
            oldest_pending_unix_ns=oldest,
            backlog_alert=pending > self.alert_records,
        )

    def cursor(self, lease_id: str) -> LeaseCursor | None:
        with self._lock:
            row = self._db.execute(
                "SELECT lease_id, end_mono_ns, end_wall_ns, counters, closed FROM cursors "
                "WHERE lease_id = ?",
                (lease_id,),
            ).fetchone()
        return None if row is None else _cursor(row)

    def open_cursors(self) -> list[LeaseCursor]:
        """Cursors of leases without a final record: those a restarted agent re-adopts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT lease_id, end_mono_ns, end_wall_ns, counters, closed FROM cursors "
                "WHERE closed = 0 ORDER BY lease_id"
            ).fetchall()
        return [_cursor(row) for row in rows]

    def totals(self, lease_id: str | None = None) -> list[LeaseTotals]:
        """Per-lease sums over every record ever appended (pruned ones included)."""
        query = """
            SELECT t.lease_id, t.records,
                   (SELECT count(*) FROM records r WHERE r.lease_id = t.lease_id),
                   t.last_seq, t.first_start_unix_ns, t.last_end_unix_ns, t.duration_ns,
                   t.gpu_ns, t.energy_mj, t.energy_estimated, t.cpu_usec,
                   t.peak_memory_bytes, t.peak_gpu_memory_bytes, t.net_rx_bytes,
                   t.net_tx_bytes, t.final, t.unmeasured
            FROM lease_totals t
        """
        params: tuple[str, ...] = ()
        if lease_id is not None:
            query += " WHERE t.lease_id = ?"
            params = (lease_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY t.first_start_unix_ns", params).fetchall()
        return [_totals(row) for row in rows]


def _cursor(row: tuple[Any, ...]) -> LeaseCursor:
    lease_id, end_mono, end_wall, counters, closed = row
    return LeaseCursor(lease_id, end_mono, end_wall, json.loads(counters), bool(closed))


def _totals(row: tuple[Any, ...]) -> LeaseTotals:
    (lease_id, records, pending, last_seq, first_start, last_end, duration, gpu_ns, energy) = row[
        :9
    ]
    return LeaseTotals(
        lease_id=lease_id,
        records=records,
        pending=pending,
        last_seq=last_seq,
        first_start_unix_ns=first_start,
        last_end_unix_ns=last_end,
        duration_ns=duration,
        gpu_ns=gpu_ns,
        energy_mj=energy,
        energy_estimated=bool(row[9]),
        cpu_usec=row[10],
        peak_memory_bytes=row[11],
        peak_gpu_memory_bytes=row[12],
        net_rx_bytes=row[13],
        net_tx_bytes=row[14],
        final=bool(row[15]),
        unmeasured=row[16],
    )


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the writer lock is
    taken up front so two writers never deadlock upgrading a read transaction)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
