"""One storage layer for SQLite and PostgreSQL: the connection every store writes to.

The stores (leases_store, ledger, registry, usage_ingest, attestation_store,
auth/store, ...) are plain functions over a ``Conn`` inside the caller's
transaction. They write SQL once, in the common subset of SQLite and
PostgreSQL, with ``?`` placeholders; ``PgConn`` rewrites the few spellings that
differ (cached per statement) and ``SqliteConn`` passes SQL through. Driver:
psycopg 3 and its pool for PostgreSQL, the standard ``sqlite3`` for SQLite
(docs/scaling.md says why this and not SQLAlchemy).

Rules for portable SQL (a test runs every store on both backends):

1. Placeholders are ``?``. Never write a literal ``%s``; a ``%`` is fine anywhere.
2. ``INSERT OR IGNORE INTO`` is allowed (it becomes ``ON CONFLICT DO NOTHING``);
   ``INSERT OR REPLACE`` and ``REPLACE INTO`` are not: write
   ``INSERT .. ON CONFLICT (cols) DO UPDATE SET ..``.
3. In ``ON CONFLICT .. DO UPDATE SET``, qualify the existing row's columns with
   the table name (``micros = earnings.micros + excluded.micros``): PostgreSQL
   calls the bare name ambiguous.
4. No two-argument scalar ``MAX(a, b)`` / ``MIN(a, b)`` (SQLite only) and no
   ``GREATEST``/``LEAST`` (PostgreSQL only): write ``CASE WHEN a > b THEN a ELSE b END``.
5. ``rowid`` exists on every table on both (PostgreSQL gets an identity column
   of that name); use it only for ordering and paging, never write it.
6. Booleans are stored as INTEGER 0/1; pass ``int(flag)`` (bools are converted,
   but compare with ``= 1`` in SQL). No ``TRUE``/``FALSE`` literals.
7. ``SUM`` of integers comes back as an int on both (numeric is loaded as int
   when it is whole); avoid ``AVG`` (float on one, numeric on the other).
8. Row locks: append ``FOR UPDATE`` (or ``FOR UPDATE SKIP LOCKED``) to a SELECT
   that must own rows until commit. SQLite drops it (its one writer already
   serializes); PostgreSQL takes the lock.
   A lock on something that is not one row, or on a row that other work updates
   often (a node's row takes a heartbeat flush every second), is ``lock_key``: a
   transaction-scoped advisory lock, which no row update waits for or conflicts with.
9. No SQLite-only functions (``json_*``, ``strftime``, ``printf``, ``GLOB``,
   ``ifnull``: use ``COALESCE``), no PostgreSQL-only casts (``::``).
10. Migrations (scheduler/db.py MIGRATIONS) are written in SQLite's DDL with the
    types INTEGER, TEXT, BLOB, REAL; PostgreSQL gets BIGINT, TEXT, BYTEA and
    DOUBLE PRECISION, ``INTEGER PRIMARY KEY AUTOINCREMENT`` becomes an identity
    column. tests/test_storage.py fails when the two schemas differ.

Every PostgreSQL transaction runs SERIALIZABLE and is retried on a
serialization failure or deadlock, so a store function may run more than once:
it must change nothing but the database (compute Python-side effects from its
return value, after ``Database.call`` returns).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlsplit

Dialect = Literal["sqlite", "postgresql"]
PASSWORD_ENV = "GPU_SCHEDULER_DB_PASSWORD"  # noqa: S105 - a variable name

try:  # psycopg is needed only for PostgreSQL; SQLite works without it.
    import psycopg
    from psycopg import errors as pg_errors

    _PG_INTEGRITY: tuple[type[Exception], ...] = (psycopg.IntegrityError,)
    _PG_RETRY: tuple[type[Exception], ...] = (
        pg_errors.SerializationFailure,
        pg_errors.DeadlockDetected,
    )
except ImportError:  # pragma: no cover - the dev extra installs it
    psycopg = None  # type: ignore[assignment]
    _PG_INTEGRITY = ()
    _PG_RETRY = ()

# Catch these instead of sqlite3.IntegrityError: a constraint said no.
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError, *_PG_INTEGRITY)
# A transaction lost a race under SERIALIZABLE: run it again.
RetryableError: tuple[type[Exception], ...] = _PG_RETRY


class StorageError(ValueError):
    """A database URL is malformed or a statement is not portable; the message says which."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What a store may do with the connection: run statements, nothing else."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def total_changes(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


def lock_key(conn: Conn, space: int, key: str) -> None:
    """Hold a lock named ``(space, key)`` until the transaction ends (rule 8).

    PostgreSQL: ``pg_advisory_xact_lock`` on two 32-bit keys, ``space`` and a stable
    hash of ``key`` (a collision only makes two keys wait for each other). SQLite:
    nothing to do, its one writer already serializes."""
    if conn.dialect != "postgresql":
        return
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    conn.execute(
        "SELECT pg_advisory_xact_lock(?, ?)", (space, int.from_bytes(digest, "big", signed=True))
    )


# -- targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the database is: a SQLite file, or a PostgreSQL conninfo (with the password)."""

    dialect: Dialect
    path: Path | None = None  # sqlite
    conninfo: str = ""  # postgresql, password included: never log it
    display: str = ""  # for logs and errors: no password

    def __repr__(self) -> str:  # a Target in a traceback must not show the password
        return f"Target({self.display!r})"


def parse_target(
    url: str | Path, *, password_file: Path | None = None, environ: dict[str, str] | None = None
) -> Target:
    """``/path``, ``sqlite:///path`` or ``postgresql://user@host:port/db?...``.

    A PostgreSQL password comes from ``password_file`` (first line) or the
    ``GPU_SCHEDULER_DB_PASSWORD`` variable; one written into the URL is refused,
    so configs and process listings never carry it.
    """
    environ = dict(os.environ) if environ is None else environ
    if isinstance(url, Path):
        return Target("sqlite", path=url, display=str(url))
    text = url.strip()
    if not text:
        raise StorageError("database.url: empty")
    if text.startswith("sqlite:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"database.url {text!r}: sqlite:///path (three slashes) expected")
        if not parts.path or parts.path == "/":
            raise StorageError(f"database.url {text!r}: no file path")
        return Target("sqlite", path=Path(unquote(parts.path)), display=text)
    if text.startswith(("postgresql:", "postgres:")):
        parts = urlsplit(text)
        if parts.password is not None:
            raise StorageError(
                "database.url: a password in the URL is refused (it would be logged and "
                f"shown in process listings); use database.password_file or {PASSWORD_ENV}"
            )
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise StorageError(f"database.url {text!r}: no database name (postgresql://host/db)")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if not parts.hostname and "host" not in query:
            raise StorageError(
                f"database.url {text!r}: no host (postgresql://host/db, or ?host=/socket/dir)"
            )
        password = ""
        if password_file is not None:
            try:
                password = password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise StorageError(
                    f"database.password_file {password_file}: cannot read a password: {exc}"
                ) from None
        elif environ.get(PASSWORD_ENV):
            password = environ[PASSWORD_ENV]
        fields: dict[str, str] = {"dbname": dbname}
        if parts.hostname:
            fields["host"] = parts.hostname
        if parts.port:
            fields["port"] = str(parts.port)
        if parts.username:
            fields["user"] = unquote(parts.username)
        fields.update(query)
        display = text
        if password:
            fields["password"] = password
        conninfo = " ".join(f"{k}={_conninfo_quote(v)}" for k, v in fields.items())
        return Target("postgresql", conninfo=conninfo, display=display)
    if "://" in text:
        raise StorageError(
            f"database.url {text.split('://')[0]!r}: unknown scheme (sqlite:/// or postgresql://)"
        )
    return Target("sqlite", path=Path(text), display=text)


def _conninfo_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def postgres_url(dbname: str, *, host: str, user: str = "", port: int | None = None) -> str:
    """A ``postgresql://`` URL for a unix socket directory or a host (tests, tools)."""
    auth = f"{quote(user)}@" if user else ""
    if host.startswith("/"):
        return f"postgresql://{auth}/{quote(dbname)}?host={quote(host)}" + (
            f"&port={port}" if port else ""
        )
    return f"postgresql://{auth}{host}{f':{port}' if port else ''}/{quote(dbname)}"


# -- statement rewriting ---------------------------------------------------------------

_STRING = re.compile(r"'(?:[^']|'')*'")
_FOR_UPDATE = re.compile(r"\s+FOR\s+UPDATE(\s+SKIP\s+LOCKED|\s+NOWAIT)?\s*$", re.IGNORECASE)
_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_NOT_PORTABLE = (
    (re.compile(r"\bINSERT\s+OR\s+REPLACE\b|^\s*REPLACE\s+INTO\b", re.IGNORECASE), 2),
    (re.compile(r"\b(GREATEST|LEAST)\s*\(|\b(MAX|MIN)\s*\([^(),]+,", re.IGNORECASE), 4),
    (re.compile(r"\b(json_\w+|strftime|printf|ifnull|julianday)\s*\(", re.IGNORECASE), 9),
    (re.compile(r"::\w"), 9),
)


def _check_portable(sql: str) -> None:
    bare = _STRING.sub("''", sql)
    for pattern, rule in _NOT_PORTABLE:
        if pattern.search(bare):
            raise StorageError(
                f"not portable SQL (rule {rule} in scheduler/storage.py): {sql.strip()[:200]}"
            )


@functools.lru_cache(maxsize=4096)
def sqlite_sql(sql: str) -> str:
    """SQLite's spelling: row-lock clauses dropped (one writer serializes already)."""
    _check_portable(sql)
    return _FOR_UPDATE.sub("", sql)


@functools.lru_cache(maxsize=4096)
def postgres_sql(sql: str) -> str:
    """PostgreSQL's spelling of a portable statement."""
    _check_portable(sql)
    out = sql
    if _OR_IGNORE.match(out):
        out = _OR_IGNORE.sub("INSERT INTO", out, count=1).rstrip().rstrip(";")
        out += " ON CONFLICT DO NOTHING"
    # psycopg reads every % as a placeholder: double them, then turn ? outside
    # string literals into %s.
    pieces: list[str] = []
    last = 0
    for match in _STRING.finditer(out):
        pieces.append(out[last : match.start()].replace("%", "%%").replace("?", "%s"))
        pieces.append(match.group(0).replace("%", "%%"))
        last = match.end()
    pieces.append(out[last:].replace("%", "%%").replace("?", "%s"))
    return "".join(pieces)


_DDL_TYPES = (
    (
        re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", re.IGNORECASE),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
)
_CREATE_TABLE = re.compile(r"^(\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?\w+\s*\()", re.I)
_COMMENT = re.compile(r"--[^\n]*")


def split_script(script: str) -> list[str]:
    """The statements of a migration (comments dropped; none may hold a ';' in a literal)."""
    return [s.strip() for s in _COMMENT.sub("", script).split(";") if s.strip()]


def postgres_ddl(statement: str) -> str:
    """One SQLite DDL statement of a migration in PostgreSQL's types (rule 10)."""
    out = statement
    for pattern, replacement in _DDL_TYPES:
        out = pattern.sub(replacement, out)
    # SQLite gives every table a rowid; so does PostgreSQL here (rule 5).
    return _CREATE_TABLE.sub(r"\1 rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,", out)


# -- connections -----------------------------------------------------------------------


class SqliteConn:
    """A ``sqlite3.Connection`` behind the ``Conn`` interface."""

    dialect: Dialect = "sqlite"

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    @property
    def total_changes(self) -> int:
        return self.raw.total_changes

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.raw.execute(sqlite_sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.raw.executemany(sqlite_sql(sql), rows)


def _pg_param(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


class PgConn:
    """A psycopg connection behind the ``Conn`` interface, inside one transaction."""

    dialect: Dialect = "postgresql"

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._changes = 0

    @property
    def total_changes(self) -> int:
        return self._changes

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur = self.raw.execute(postgres_sql(sql), [_pg_param(p) for p in params])
        if cur.description is None and cur.rowcount > 0:  # a write: count like SQLite
            self._changes += cur.rowcount
        return cur  # type: ignore[no-any-return]

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(postgres_sql(sql), [[_pg_param(p) for p in row] for row in rows])
            self._changes += max(cur.rowcount, 0)


def register_pg_types(raw: Any) -> None:
    """Whole numerics (SUM of BIGINT) load as int, as SQLite gives them (rule 7)."""
    assert psycopg is not None

    class WholeNumericLoader(psycopg.adapt.Loader):
        def load(self, data: Any) -> Any:
            text = bytes(data).decode()
            if text.lstrip("-").isdigit():
                return int(text)
            return float(text)

    raw.adapters.register_loader("numeric", WholeNumericLoader)


# -- schema introspection (the drift test) ----------------------------------------------

_TYPE_CLASS = {
    "integer": "int",
    "bigint": "int",
    "text": "text",
    "blob": "blob",
    "bytea": "blob",
    "real": "real",
    "double precision": "real",
}


def schema_of(conn: Conn) -> dict[str, object]:
    """Tables -> columns (type class, not null, primary key) and index names, normalized
    so a SQLite and a PostgreSQL database migrated by the same steps compare equal."""
    tables: dict[str, object] = {}
    if conn.dialect == "sqlite":
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            ).fetchall()
        ]
        for name in names:
            cols = {}
            for _cid, col, ctype, notnull, _default, pk in conn.execute(
                f"PRAGMA table_info({name})"
            ).fetchall():
                cols[col] = (_TYPE_CLASS[ctype.lower()], bool(notnull or pk), bool(pk))
            indexes = sorted(
                r[1]
                for r in conn.execute(f"PRAGMA index_list({name})").fetchall()
                if r[3] == "c"  # created by CREATE INDEX, not by a constraint
            )
            tables[name] = {"columns": cols, "indexes": indexes}
        return tables
    names = [
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema ="
            " current_schema() AND table_type = 'BASE TABLE' AND table_name != ?"
            " ORDER BY table_name",
            (PG_VERSION_TABLE,),
        ).fetchall()
    ]
    for name in names:
        pk_cols = {
            r[0]
            for r in conn.execute(
                "SELECT k.column_name FROM information_schema.table_constraints c"
                " JOIN information_schema.key_column_usage k"
                " ON k.constraint_name = c.constraint_name AND k.table_name = c.table_name"
                " WHERE c.table_name = ? AND c.constraint_type = 'PRIMARY KEY'"
                " AND c.table_schema = current_schema()",
                (name,),
            ).fetchall()
        }
        cols = {}
        for col, ctype, nullable in conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = ? AND table_schema = current_schema() ORDER BY ordinal_position",
            (name,),
        ).fetchall():
            if col == "rowid":  # SQLite's implicit rowid, explicit here (rule 5)
                continue
            cols[col] = (_TYPE_CLASS[ctype], nullable == "NO", col in pk_cols)
        indexes = sorted(
            r[0]
            for r in conn.execute(
                "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
                " JOIN pg_class t ON t.oid = x.indrelid"
                " WHERE t.relname = ? AND NOT x.indisprimary AND NOT EXISTS"
                " (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
                (name,),
            ).fetchall()
        )
        tables[name] = {"columns": cols, "indexes": indexes}
    return tables


PG_VERSION_TABLE = "schema_version"
