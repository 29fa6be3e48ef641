"""The scheduler's SQLite database: one file, WAL, versioned migrations.

sqlite3 blocks, so every statement runs on one dedicated worker thread (which
also serializes writers without extra locking). WAL checkpoints run on a thread
of their own (``Checkpointer``): left to SQLite, every thousandth page written
makes one commit copy the WAL back into the database and fsync it, a stall of
tens to hundreds of milliseconds that every heartbeat queued behind it waits out.
``PRAGMA user_version`` records how many migrations have run; new ones are
appended to ``MIGRATIONS``, never edited, so every database reaches the same
schema by the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .storage import (
    PG_VERSION_TABLE,
    Conn,
    PgConn,
    RetryableError,
    SqliteConn,
    Target,
    parse_target,
    postgres_ddl,
    register_pg_types,
    split_script,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: node registry, sessions, heartbeat coverage for uptime.
    """
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        region TEXT NOT NULL DEFAULT '',
        labels_json TEXT NOT NULL DEFAULT '{}',
        agent_version TEXT NOT NULL DEFAULT '',
        protocol_version TEXT NOT NULL DEFAULT '',
        inventory BLOB,            -- serialized gpuagent.v1.Inventory
        last_heartbeat BLOB,       -- serialized gpuagent.v1.Heartbeat
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER,      -- wall clock of the last Hello or Heartbeat
        draining INTEGER NOT NULL DEFAULT 0,
        acked_usage_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        peer TEXT NOT NULL DEFAULT '',
        started_ns INTEGER NOT NULL,
        ended_ns INTEGER,
        end_reason TEXT
    );
    CREATE INDEX sessions_node ON sessions(node_id, started_ns);
    CREATE TABLE coverage (
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        PRIMARY KEY (node_id, start_ns)
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: leases, their transition history, and placement attempts.
    """
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,         -- server-generated or the idempotency key
        buyer TEXT NOT NULL DEFAULT '',
        spec BLOB NOT NULL,                -- serialized gpuagent.v1.LeaseSpec
        gpu_count INTEGER NOT NULL,
        price_micros_per_gpu_hour INTEGER NOT NULL DEFAULT 0,  -- the buyer's ceiling
        accepted_price_micros_per_gpu_hour INTEGER,  -- the node's ask, once placed
        max_duration_s INTEGER NOT NULL DEFAULT 0,
        pinned_node_id TEXT NOT NULL DEFAULT '',
        replace_on_lost INTEGER NOT NULL DEFAULT 0,
        node_id TEXT,
        gpu_uuids_json TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,
        exit_code INTEGER,
        reason TEXT NOT NULL DEFAULT '',
        log_tail TEXT NOT NULL DEFAULT '',
        container_id TEXT NOT NULL DEFAULT '',
        last_update_seq INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        placed_ns INTEGER,                 -- last offer to node_id
        started_ns INTEGER,
        ended_ns INTEGER,
        cancel_requested_ns INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        expires_at_ns INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX leases_state ON leases(state, created_ns);
    CREATE INDEX leases_node ON leases(node_id, state);
    CREATE INDEX leases_buyer ON leases(buyer, created_ns);
    CREATE TABLE lease_events (
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        seq INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        node_id TEXT,
        ts_ns INTEGER NOT NULL,
        PRIMARY KEY (lease_id, seq)
    );
    CREATE TABLE placement_attempts (
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        node_id TEXT NOT NULL,
        -- offered | accepted | rejected | timeout | unreachable | lost | interrupted
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        ts_ns INTEGER NOT NULL
    );
    CREATE INDEX placement_attempts_lease ON placement_attempts(lease_id, ts_ns);
    """,
    # 3: usage records and the ledger (docs/ledger.md). Amounts are integer micro-units.
    """
    CREATE TABLE usage_records (
        node_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        lease_id TEXT NOT NULL,
        status TEXT NOT NULL,              -- accepted | rejected (stored so the ack moves on)
        reason TEXT NOT NULL DEFAULT '',
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        duration_ns INTEGER NOT NULL,
        gpu_count INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        final INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL DEFAULT 0,
        canonical BLOB NOT NULL,           -- the signed bytes: every field, exactly
        signature BLOB NOT NULL,
        received_ns INTEGER NOT NULL,
        PRIMARY KEY (node_id, seq)
    );
    CREATE INDEX usage_records_lease ON usage_records(lease_id, start_ns);
    CREATE TABLE accounts (
        buyer TEXT PRIMARY KEY,
        balance_micros INTEGER NOT NULL DEFAULT 0 CHECK (balance_micros >= 0),
        deposited_micros INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE escrow (
        lease_id TEXT PRIMARY KEY,
        buyer TEXT NOT NULL,
        cap_micros INTEGER NOT NULL,       -- the most this lease can ever cost
        reserved_micros INTEGER NOT NULL,  -- moved from the balance, ever
        settled_micros INTEGER NOT NULL DEFAULT 0,
        released_micros INTEGER NOT NULL DEFAULT 0,
        unbilled_micros INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,               -- held | released
        final_seen INTEGER NOT NULL DEFAULT 0,
        ended_ns INTEGER,                  -- the lease reached a terminal state
        created_ns INTEGER NOT NULL,
        CHECK (reserved_micros - settled_micros - released_micros >= 0)
    );
    CREATE TABLE billing (
        lease_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        price_micros_per_gpu_hour INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL DEFAULT 0,
        cost_micros INTEGER NOT NULL DEFAULT 0,  -- floor(price * gpu_ns / 3.6e12)
        PRIMARY KEY (lease_id, node_id)
    );
    CREATE TABLE earnings (
        node_id TEXT PRIMARY KEY,
        micros INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE collateral (
        node_id TEXT PRIMARY KEY,
        staked_micros INTEGER NOT NULL DEFAULT 0,
        slashed_micros INTEGER NOT NULL DEFAULT 0,
        uptime_commitment_ratio REAL NOT NULL DEFAULT 0,
        committed_ns INTEGER NOT NULL,     -- uptime is measured from here
        last_uptime_slash_ns INTEGER,
        CHECK (slashed_micros <= staked_micros)
    );
    CREATE TABLE ledger_entries (
        entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns INTEGER NOT NULL,
        kind TEXT NOT NULL,                -- deposit|reserve|settle|release|stake|slash
        buyer TEXT NOT NULL DEFAULT '',
        node_id TEXT NOT NULL DEFAULT '',
        lease_id TEXT NOT NULL DEFAULT '',
        amount_micros INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        ref TEXT NOT NULL DEFAULT ''       -- idempotency key (deposits) or node:seq (settles)
    );
    CREATE UNIQUE INDEX ledger_entries_deposit_ref ON ledger_entries(ref)
        WHERE kind = 'deposit' AND ref != '';
    CREATE INDEX ledger_entries_lease ON ledger_entries(lease_id);
    """,
    # 4: attestation verdicts, one row per GPU per challenge (scheduler/attestation_store.py).
    """
    CREATE TABLE attestations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        gpu_uuid TEXT NOT NULL,
        challenge_id TEXT NOT NULL DEFAULT '',  -- '' when judged without a challenge
        sku TEXT NOT NULL DEFAULT '',           -- judged against; '<sku>@simulated' in demos
        passed INTEGER NOT NULL,
        reason TEXT NOT NULL,                   -- 'ok' or the reject reason
        message TEXT NOT NULL DEFAULT '',
        measured_tflops REAL NOT NULL DEFAULT 0,
        elapsed_ns INTEGER NOT NULL DEFAULT 0,  -- challenge sent -> commit received
        created_ns INTEGER NOT NULL,
        expires_ns INTEGER NOT NULL             -- a passed verdict counts until then
    );
    CREATE INDEX attestations_gpu ON attestations(node_id, gpu_uuid, created_ns);
    """,
    # 5: who may do what (scheduler/auth, docs/security.md): accounts with one role,
    # tokens stored only as SHA-256 hashes, nodes bound to a provider account, the
    # audit log, and registry credentials encrypted at rest beside the lease.
    """
    CREATE TABLE acl_accounts (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'buyer', 'provider')),
        created_ns INTEGER NOT NULL
    );
    CREATE TABLE acl_tokens (
        token_id TEXT PRIMARY KEY,         -- public half, shown in lists
        account TEXT NOT NULL REFERENCES acl_accounts(name),
        kind TEXT NOT NULL CHECK (kind IN ('api', 'enrollment')),
        hash BLOB NOT NULL UNIQUE,         -- sha256 of the whole token
        description TEXT NOT NULL DEFAULT '',
        created_ns INTEGER NOT NULL,
        expires_ns INTEGER NOT NULL DEFAULT 0,   -- 0 = never
        revoked_ns INTEGER NOT NULL DEFAULT 0    -- 0 = valid
    );
    CREATE INDEX acl_tokens_account ON acl_tokens(account);
    CREATE TABLE audit_log (
        entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ns INTEGER NOT NULL,
        account TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        peer TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_log_account ON audit_log(account, ts_ns);
    ALTER TABLE nodes ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE leases ADD COLUMN registry_auth_enc BLOB;
    """,
    # 6: service leases (issue #16): the latest endpoints an agent reported for a lease
    # (serialized gpuagent.v1.Lease holding only its endpoints) and its restart count.
    """
    ALTER TABLE leases ADD COLUMN endpoints_pb BLOB;
    ALTER TABLE leases ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: the market (docs/market.md): each node's offer (market.proto NodeOffer: prices
    # per GPU model, location, measured bandwidth), and price history per GPU model,
    # kept 30 days: kind 'ask' is the median ask of the online nodes at a sample,
    # 'accepted' one row per lease placed, at the price it was placed at.
    """
    ALTER TABLE nodes ADD COLUMN offer BLOB;
    CREATE TABLE price_history (
        gpu_model TEXT NOT NULL,
        at_ns INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('ask', 'accepted')),
        micros_per_gpu_hour INTEGER NOT NULL CHECK (micros_per_gpu_hour >= 0)
    );
    CREATE INDEX price_history_model ON price_history(gpu_model, kind, at_ns);
    CREATE INDEX price_history_at ON price_history(at_ns);
    """,
    # 8: scheduler replicas on one PostgreSQL (scheduler/replicas.py, docs/scaling.md):
    # who is alive, and which replica holds each node's stream. Unused on SQLite.
    """
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        address TEXT NOT NULL DEFAULT '',
        started_ns INTEGER NOT NULL,
        heartbeat_ns INTEGER NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN replica_id TEXT NOT NULL DEFAULT '';
    """,
    # 9: endpoint tokens (scheduler/endpoint_tokens.py): the relay checks the hash, the
    # buyer reads the sealed token back (lease show).
    """
    CREATE TABLE endpoint_tokens (
        lease_id TEXT PRIMARY KEY,
        token_sha256 BLOB NOT NULL,
        token_enc BLOB NOT NULL,
        rotated_ns INTEGER NOT NULL
    );
    """,
    # 10: redundant runs (scheduler/verify.py, docs/verification.md): a parent lease, its
    # copies with their output digests and payout, and nodes flagged for disagreeing.
    """
    CREATE TABLE verify_groups (
        parent_id TEXT PRIMARY KEY,
        replicas INTEGER NOT NULL CHECK (replicas BETWEEN 2 AND 3),
        state TEXT NOT NULL DEFAULT 'verifying',
        decided_ns INTEGER
    );
    CREATE TABLE verify_copies (
        copy_id TEXT PRIMARY KEY,
        parent_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('copy', 'tiebreak')),
        ended INTEGER NOT NULL DEFAULT 0,
        digest BLOB,
        paid INTEGER,
        outcome TEXT NOT NULL DEFAULT 'held'
    );
    CREATE INDEX verify_copies_parent ON verify_copies(parent_id);
    CREATE TABLE verify_flags (
        copy_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        flagged_ns INTEGER NOT NULL,
        slashed_micros INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL
    );
    CREATE INDEX verify_flags_node ON verify_flags(node_id);
    """,
    # 11: lease outputs (issue #22, scheduler/outputs_store.py): the node's signed
    # commitment from a lease's terminal update, checked against the node key first;
    # one per lease (the first verified one wins; an agent re-sends the same).
    """
    CREATE TABLE lease_outputs (
        lease_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        digest BLOB NOT NULL,
        size INTEGER NOT NULL,
        commitment BLOB NOT NULL,          -- serialized gpuagent.v1.OutputCommitment
        stored_ns INTEGER NOT NULL
    );
    """,
    # 12: where buyers reach each replica's embedded relay (replica.relay_url): a relay
    # without the tunnel of a lease's node redirects to the replica holding it.
    """
    ALTER TABLE replicas ADD COLUMN relay_url TEXT NOT NULL DEFAULT '';
    """,
    # 13: buyers' reports that fetched outputs did not match the node's signed
    # commitment (scheduler/output_fetch.py): one per lease and buyer, shown on the node.
    """
    CREATE TABLE output_mismatches (
        lease_id TEXT NOT NULL,
        reporter TEXT NOT NULL,
        node_id TEXT NOT NULL,
        reported_ns INTEGER NOT NULL,
        detail TEXT NOT NULL,
        PRIMARY KEY (lease_id, reporter)
    );
    CREATE INDEX output_mismatches_node ON output_mismatches(node_id);
    """,
)


def protect_state_dir(directory: Path) -> None:
    """Create the scheduler's state directory 0700, or tighten one we own to 0700.

    A shared directory (sticky, like /tmp) or one owned by someone else is left as
    it is, with a warning: tightening /tmp would break the host.
    """
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        return
    info = directory.stat()
    if not info.st_mode & 0o077:
        return
    if info.st_mode & stat.S_ISVTX or info.st_uid != os.geteuid():
        log.warning(
            "the scheduler's state directory is shared or not ours; keep the database in a "
            "directory of its own (0700)",
            extra={"directory": str(directory), "mode": f"{stat.S_IMODE(info.st_mode):04o}"},
        )
        return
    directory.chmod(0o700)


def protect_files(db_path: Path) -> None:
    """The database and its WAL files readable by the scheduler's user only (0600)."""
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def in_transaction(conn: sqlite3.Connection, fn: Callable[[Conn], T]) -> T:
    """``fn(conn)`` inside one immediate transaction: committed, or rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(SqliteConn(conn))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class DatabaseError(Exception):
    """The database cannot be opened or migrated; the message names it."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (PostgreSQL down or cut off): nothing was stored."""


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Run pending migrations, each in its own transaction; returns the new version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    _check_version(version, migrations)
    for number in range(version + 1, len(migrations) + 1):
        # executescript commits first, so wrap the step ourselves to keep it atomic.
        conn.executescript(
            f"BEGIN;\n{migrations[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;"
        )
        log.info("database migrated", extra={"schema_version": number})
    return len(migrations)


def _check_version(version: int, migrations: tuple[str, ...]) -> None:
    if version > len(migrations):
        raise DatabaseError(
            f"database schema version {version} is newer than this scheduler knows "
            f"({len(migrations)}); upgrade gpu-scheduler"
        )


# Any replica may start first: migrations hold this advisory lock, so two starting
# together run each step once (the second waits, then finds nothing to do).
MIGRATION_LOCK = 0x6770_7573_6368_0001


def migrate_postgres(raw: Any, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """The same steps as ``migrate``, in PostgreSQL's types (storage.postgres_ddl),
    each in its own transaction, under one advisory lock held for the whole run."""
    raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with raw.transaction():
            raw.execute(f"CREATE TABLE IF NOT EXISTS {PG_VERSION_TABLE} (version BIGINT NOT NULL)")
            row = raw.execute(f"SELECT version FROM {PG_VERSION_TABLE}").fetchone()  # noqa: S608
            if row is None:
                raw.execute(f"INSERT INTO {PG_VERSION_TABLE} VALUES (0)")  # noqa: S608
            version = int(row[0]) if row else 0
        _check_version(version, migrations)
        for number in range(version + 1, len(migrations) + 1):
            with raw.transaction():
                for statement in split_script(migrations[number - 1]):
                    raw.execute(postgres_ddl(statement))
                raw.execute(f"UPDATE {PG_VERSION_TABLE} SET version = %s", (number,))  # noqa: S608
            log.info("database migrated", extra={"schema_version": number})
    finally:
        raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return len(migrations)


CHECKPOINT_EVERY = 1.0  # seconds between passive WAL checkpoints


class Checkpointer:
    """Passive WAL checkpoints on their own connection and thread, every ``every`` s.

    PASSIVE never waits for the writer: it copies what it can while commits keep
    appending to the WAL, and SQLite restarts the WAL from its start once a
    checkpoint has caught up, so the file stays small.
    """

    def __init__(self, path: Path, every: float = CHECKPOINT_EVERY) -> None:
        self.path = path
        self.every = every
        self.checkpoints = 0
        self.ran = threading.Event()  # set after each checkpoint (tests wait on it)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._conn.close()

    def checkpoint_now(self) -> tuple[int, int, int]:
        """One passive checkpoint: (busy, frames in the WAL, frames checkpointed)."""
        with self._lock:
            busy, frames, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        self.ran.set()
        return int(busy), int(frames), int(done)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.checkpoint_now()
            except sqlite3.Error as exc:  # retried next round; the WAL only grows meanwhile
                log.warning(
                    "WAL checkpoint failed", extra={"database": str(self.path), "error": str(exc)}
                )


class Database:
    """The SQLite backend (the default); ``open_database`` picks PostgreSQL by URL."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self.checkpointer: Checkpointer | None = None

    def _open(self) -> None:
        try:
            protect_state_dir(self.path.parent)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            protect_files(self.path)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            # Checkpoints are the Checkpointer's, off the commit path.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseError(f"{self.path}: cannot open the database: {exc}") from None
        self._conn = conn
        self.checkpointer = Checkpointer(self.path)
        self.checkpointer.start()

    async def open(self) -> None:
        await self.run(lambda: self._open())

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def call(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn(conn)`` on the database thread, inside one transaction."""

        def txn() -> T:
            conn = self._conn
            if conn is None:
                raise DatabaseError(f"{self.path}: database is not open")
            return in_transaction(conn, fn)

        return await self.run(txn)

    async def read(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn(conn)``, which only reads, on one snapshot: for a read whose answer
        is a hint that the write acting on it checks again (placement's view of what
        is pending and what GPUs are held: the offer re-checks both under its lock).
        SQLite: a transaction like ``call``'s. PostgreSQL: REPEATABLE READ, READ ONLY,
        so it takes no predicate locks: it never makes a writer retry (``call``'s
        SERIALIZABLE reads of a whole table conflicted with every write to it)."""
        return await self.call(fn)

    async def call_locked(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn(conn)`` in one transaction that holds its invariants itself, by
        explicit locks and guarded writes, never by the isolation level: every row it
        reads to decide a write is locked first (``FOR UPDATE``, an advisory lock) or
        protected by a constraint (``INSERT .. ON CONFLICT``, ``UPDATE .. WHERE
        guard``, ``CHECK``). SQLite: a transaction like ``call``'s (one writer).
        PostgreSQL: READ COMMITTED, so it never fails serialization: the hottest writes
        (a Submit, an offer) were run again when SSI saw them meet other writers on the
        leases table's index pages (docs/scaling.md). Each statement sees what was
        committed before it started, a lock's waiter included."""
        return await self.call(fn)

    async def close(self) -> None:
        if self._executor._shutdown:  # closed already (a server stopped twice)
            return

        def _close() -> None:
            if self.checkpointer is not None:
                self.checkpointer.stop()
                self.checkpointer = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self.run(_close)
        self._executor.shutdown(wait=True)


# Serialization failures are retried this often (with jittered backoff) before the
# caller sees the error; two replicas racing for one row lose a round or two at most.
MAX_RETRIES = 30


# libpq socket settings for every connection: a PostgreSQL that stops answering (a
# partition, a blackholed route) fails calls within seconds instead of hanging them,
# so a cut-off replica notices and moves its agents (replicas.py). A URL's own
# ?tcp_user_timeout=... etc. wins.
PG_SOCKET_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 6000,
}


class PostgresDatabase(Database):
    """PostgreSQL through a psycopg pool: ``pool_size`` connections, as many threads.

    Every ``call`` is one SERIALIZABLE transaction, retried when it loses a race
    (storage.RetryableError), so what SQLite's single writer guarantees holds across
    replicas. A connection failure raises DatabaseUnavailable: nothing was stored.
    """

    dialect = "postgresql"

    def __init__(
        self, target: Target, *, pool_size: int = 4, connect_timeout: float = 10.0
    ) -> None:
        self.target = target
        self.display = target.display
        self.path = Path()  # no file; state (TLS, secrets key) stays in database.path's directory
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="pg")
        given = target.conninfo
        self._socket: dict[str, Any] = {
            k: v for k, v in PG_SOCKET_DEFAULTS.items() if f"{k}=" not in given
        }
        self._pool: Any = None
        self.checkpointer = None
        self.retries = 0  # serialization failures retried, for tests and benchmarks

    def _configure(self, raw: Any) -> None:
        import psycopg

        register_pg_types(raw)
        # Applies to every BEGIN that raw.transaction() issues on this connection.
        raw.isolation_level = psycopg.IsolationLevel.SERIALIZABLE

    def _open(self) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        try:
            with self.connect() as raw:
                migrate_postgres(raw)
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.display}: cannot open the database: {exc}") from None
        self._pool = ConnectionPool(
            self.target.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={
                "autocommit": True,
                "connect_timeout": int(self.connect_timeout),
                **self._socket,
            },
            configure=self._configure,
            timeout=self.connect_timeout,
            open=False,
            name="gpu-scheduler",
        )
        try:
            self._pool.open(wait=True, timeout=self.connect_timeout)
        except PoolTimeout as exc:
            raise DatabaseError(f"{self.display}: cannot open the database: {exc}") from None

    def connect(self) -> Any:
        """A dedicated connection outside the pool (LISTEN, advisory locks), autocommit."""
        import psycopg

        return psycopg.connect(
            self.target.conninfo,
            autocommit=True,
            connect_timeout=int(self.connect_timeout),
            **self._socket,
        )

    async def call(self, fn: Callable[[Conn], T]) -> T:
        return await self.run(lambda: self.call_sync(fn))

    async def read(self, fn: Callable[[Conn], T]) -> T:
        return await self.run(lambda: self.call_sync(fn, read_only=True))

    async def call_locked(self, fn: Callable[[Conn], T]) -> T:
        return await self.run(lambda: self.call_sync(fn, locked=True))

    def call_sync(
        self, fn: Callable[[Conn], T], *, read_only: bool = False, locked: bool = False
    ) -> T:
        """``fn(conn)`` in one SERIALIZABLE transaction on this thread, retried on conflict;
        ``read_only``: on one REPEATABLE READ, READ ONLY snapshot (Database.read), which
        never fails serialization; ``locked``: READ COMMITTED (Database.call_locked),
        retried only on a deadlock."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise DatabaseError(f"{self.display}: database is not open")
        level = psycopg.IsolationLevel.SERIALIZABLE
        if read_only:
            level = psycopg.IsolationLevel.REPEATABLE_READ
        elif locked:
            level = psycopg.IsolationLevel.READ_COMMITTED
        for attempt in range(MAX_RETRIES + 1):
            try:
                with self._pool.connection() as raw:
                    if level == psycopg.IsolationLevel.SERIALIZABLE:
                        with raw.transaction():
                            return fn(PgConn(raw))
                    # Said in BEGIN itself (psycopg writes the connection's level and
                    # access mode into it): a SET TRANSACTION after was a round trip more
                    # in every placement pass.
                    raw.isolation_level = level
                    raw.read_only = True if read_only else None
                    try:
                        with raw.transaction():
                            return fn(PgConn(raw))
                    finally:
                        try:
                            raw.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
                            raw.read_only = None
                        except psycopg.Error:
                            raw.close()  # broken: never back in the pool read-only
            except RetryableError:
                if attempt == MAX_RETRIES:
                    raise
                self.retries += 1
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))  # noqa: S311
            except (psycopg.OperationalError, PoolTimeout) as exc:
                raise DatabaseUnavailable(f"{self.display}: {exc}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._executor._shutdown:
            return

        def _close() -> None:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

        await self.run(_close)
        self._executor.shutdown(wait=True)


def open_database(
    url: str | Path | Target,
    *,
    password_file: Path | None = None,
    pool_size: int = 4,
) -> Database:
    """The backend ``url`` names (a path or sqlite:///... -> SQLite; postgresql://...)."""
    target = url if isinstance(url, Target) else parse_target(url, password_file=password_file)
    if target.dialect == "postgresql":
        return PostgresDatabase(target, pool_size=pool_size)
    assert target.path is not None
    return Database(target.path)
