"""The storage layer (scheduler/storage.py, scheduler/db.py) on SQLite and PostgreSQL.

URL parsing and the dialect rewrites are plain functions. On the throwaway cluster
(tests/pgcluster.py): the two schemas match after the same migrations, passwords come
from a file and never show, and two store instances on one database (what two
replicas are) racing for the same rows keep every invariant SQLite's single writer
keeps: a usage record stored and settled once, escrow never overdrawn, a lease
offered to one node, a GPU held by one lease.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from agent.identity import load_or_create
from gpuagent.usage import SignedUsageRecord, UsageRecord, sign_record
from gpuagent.v1 import leases_pb2
from scheduler import ledger
from scheduler.db import (
    MIGRATIONS,
    Database,
    DatabaseError,
    PostgresDatabase,
    migrate,
    open_database,
)
from scheduler.leases_store import IdempotencyConflict, LeaseRefused, LeaseStore, NewLease
from scheduler.storage import (
    PASSWORD_ENV,
    Conn,
    SqliteConn,
    StorageError,
    parse_target,
    postgres_ddl,
    postgres_sql,
    schema_of,
    split_script,
    sqlite_sql,
)
from scheduler.usage_ingest import store_records
from tests.pgcluster import Cluster, dbname

NOW = 1_700_000_000 * 10**9
SEC = 10**9
POLICY = ledger.LedgerPolicy(final_record_grace_ns=600 * SEC)

# -- targets ----------------------------------------------------------------------------


def test_a_path_or_sqlite_url_is_sqlite(tmp_path: Path) -> None:
    assert parse_target(tmp_path / "s.db").path == tmp_path / "s.db"
    assert parse_target(str(tmp_path / "s.db")).dialect == "sqlite"
    target = parse_target(f"sqlite://{tmp_path}/s.db")
    assert (target.dialect, target.path) == ("sqlite", tmp_path / "s.db")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("sqlite://host/x.db", "three slashes"),
        ("sqlite:///", "no file path"),
        ("mysql://db/x", "unknown scheme"),
        ("postgresql://db.example", "no database name"),
        ("postgresql:///sched", "no host"),
        ("postgresql://u:hunter2@db/sched", "password in the URL is refused"),
    ],
)
def test_malformed_urls_are_refused_by_name(url: str, says: str) -> None:
    with pytest.raises(StorageError, match=says) as caught:
        parse_target(url, environ={})
    assert "hunter2" not in str(caught.value)


def test_the_password_comes_from_a_file_or_the_environment_and_never_shows(
    tmp_path: Path,
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret-from-file\n")
    target = parse_target("postgresql://sched@db:5433/gs", password_file=pw, environ={})
    assert "password='s3cret-from-file'" in target.conninfo
    assert "host='db'" in target.conninfo and "port='5433'" in target.conninfo
    assert "s3cret" not in target.display and "s3cret" not in repr(target)
    env = parse_target("postgresql://sched@db/gs", environ={PASSWORD_ENV: "from-env"})
    assert "password='from-env'" in env.conninfo and "from-env" not in repr(env)
    with pytest.raises(StorageError, match="password_file"):
        parse_target("postgresql://sched@db/gs", password_file=tmp_path / "missing")


def test_config_validates_the_url_shape(tmp_path: Path) -> None:
    from scheduler.config import SchedulerConfig

    with pytest.raises(ValueError, match="no database name"):
        SchedulerConfig.model_validate({"database": {"url": "postgresql://db"}})
    config = SchedulerConfig.model_validate({"database": {"url": "postgresql://u@db/gs"}})
    assert config.database.is_postgres


# -- dialect rewrites -------------------------------------------------------------------


def test_postgres_spelling_of_placeholders_percent_and_or_ignore() -> None:
    assert postgres_sql("SELECT a FROM t WHERE b = ? AND c LIKE 'x%?'") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%?'"
    )
    assert postgres_sql("INSERT OR IGNORE INTO t (a) VALUES (?)") == (
        "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    )
    assert sqlite_sql("SELECT 1 FROM t WHERE a = ? FOR UPDATE SKIP LOCKED") == (
        "SELECT 1 FROM t WHERE a = ?"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT OR REPLACE INTO t VALUES (?)",
        "REPLACE INTO t VALUES (?)",
        "UPDATE c SET e = MAX(e, ?)",
        "SELECT GREATEST(a, b) FROM t",
        "SELECT json_extract(a, '$.x') FROM t",
        "SELECT a::text FROM t",
    ],
)
def test_statements_outside_the_portable_subset_are_refused_on_both(sql: str) -> None:
    for rewrite in (postgres_sql, sqlite_sql):
        with pytest.raises(StorageError, match="not portable SQL"):
            rewrite(sql)


def test_ddl_types_and_the_implicit_rowid() -> None:
    (statement,) = split_script(
        "CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT, b BLOB, r REAL, n INTEGER);"
    )
    assert postgres_ddl(statement) == (
        "CREATE TABLE x ( rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,"
        "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, b BYTEA,"
        " r DOUBLE PRECISION, n BIGINT)"
    )


# -- on the cluster ---------------------------------------------------------------------


def test_the_two_schemas_do_not_drift(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Same migrations, same tables, columns (type class, NOT NULL, key) and indexes."""
    lite = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    migrate(lite)
    url = pg_cluster.new_database()
    db = open_database(url)
    try:
        asyncio.run(db.open())
        assert isinstance(db, PostgresDatabase)
        pg = db.call_sync(schema_of)
    finally:
        asyncio.run(db.close())
    assert pg == schema_of(SqliteConn(lite))
    assert len(pg) >= 15  # every table of every migration, not an empty match


def test_a_newer_schema_is_refused_on_postgres(pg_cluster: Cluster) -> None:
    url = pg_cluster.new_database()
    with psycopg.connect(parse_target(url).conninfo, autocommit=True) as raw:
        raw.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS) + 1,))
    db = open_database(url)
    with pytest.raises(DatabaseError, match="newer than this scheduler knows"):
        asyncio.run(db.open())


def test_password_over_tcp_from_a_file(pg_cluster: Cluster, tmp_path: Path) -> None:
    url = pg_cluster.tcp_url(dbname(pg_cluster.new_database()))
    good = tmp_path / "good"
    good.write_text(pg_cluster.password + "\n")
    db = open_database(url, password_file=good)

    async def roundtrip() -> int:
        await db.open()
        try:
            return await db.call(lambda c: int(c.execute("SELECT 41 + ?", (1,)).fetchone()[0]))
        finally:
            await db.close()

    assert asyncio.run(roundtrip()) == 42
    bad = tmp_path / "bad"
    bad.write_text("wrong-password-xyz\n")
    with pytest.raises(DatabaseError, match="password authentication failed") as caught:
        asyncio.run(open_database(url, password_file=bad).open())
    assert "wrong-password-xyz" not in str(caught.value)


def test_two_replicas_migrating_at_once_run_each_step_once(pg_cluster: Cluster) -> None:
    url = pg_cluster.new_database()

    async def both() -> None:
        a, b = open_database(url), open_database(url)
        await asyncio.gather(a.open(), b.open())
        await asyncio.gather(a.close(), b.close())

    asyncio.run(both())
    with psycopg.connect(parse_target(url).conninfo, autocommit=True) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]


# -- two replicas racing ------------------------------------------------------------------


@pytest_asyncio.fixture
async def replicas(pg_cluster: Cluster) -> AsyncIterator[tuple[Database, Database]]:
    """Two databases (pools) on one PostgreSQL database: what two replicas share."""
    url = pg_cluster.new_database()
    a, b = open_database(url, pool_size=4), open_database(url, pool_size=4)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()
    pg_cluster.drop_database(url)


def _stores(
    dbs: tuple[Database, Database], policy: ledger.LedgerPolicy = POLICY
) -> list[LeaseStore]:
    stores = []
    for db in dbs:
        store = LeaseStore(db, clock=lambda: NOW / SEC)
        ledger.LeaseHooks(policy, lambda: NOW).register(store)
        stores.append(store)
    return stores


async def _node(db: Database, node_id: str) -> None:
    await db.call(
        lambda c: c.execute(
            "INSERT INTO nodes (node_id, public_key, first_seen_ns) VALUES (?, ?, ?)",
            (node_id, b"k", NOW),
        )
    )


def _new(lease_id: str, *, price: int = 1_000_000, gpus: int = 1) -> NewLease:
    spec = leases_pb2.LeaseSpec(
        image="busybox", gpu_count=gpus, price_micro_per_gpu_hour=price, max_duration_seconds=3600
    )
    return NewLease(lease_id=lease_id, buyer="alice", spec=spec)


@pytest.mark.asyncio
async def test_escrow_is_never_overdrawn_by_two_replicas(
    replicas: tuple[Database, Database],
) -> None:
    a, b = replicas
    await a.call(lambda c: ledger.deposit(c, "alice", 3_000_000, NOW, POLICY))
    stores = _stores(replicas)

    async def submit(i: int) -> bool:
        try:
            await stores[i % 2].submit(_new(f"l{i}"))  # each reserves 1_000_000
        except LeaseRefused:
            return False
        return True

    accepted = await asyncio.gather(*(submit(i) for i in range(12)))
    assert sum(accepted) == 3
    account = await b.call(lambda c: ledger.account(c, "alice"))
    assert account.balance_micros == 0
    held = await a.call(
        lambda c: c.execute("SELECT COUNT(*), SUM(reserved_micros) FROM escrow").fetchone()
    )
    assert tuple(held) == (3, 3_000_000)
    # READ COMMITTED (Database.call_locked): the Submits queue on the account's row
    # lock; none was run again, as SERIALIZABLE ran the losers of each race.
    assert isinstance(a, PostgresDatabase) and isinstance(b, PostgresDatabase)
    assert a.retries == b.retries == 0


@pytest.mark.asyncio
async def test_a_new_buyers_first_submits_on_two_replicas_credit_once_and_never_overdraw(
    replicas: tuple[Database, Database],
) -> None:
    """The account is created by the first Submit (the slow path: created, read
    locked, refused or paid): racing on two replicas it is created once, credited once,
    and pays exactly as many leases as the credit covers; the rest say why."""
    a, b = replicas
    stores = _stores(replicas, ledger.LedgerPolicy(default_credit_micros=2_500_000))
    refusals: list[str] = []

    async def submit(i: int) -> bool:
        try:
            await stores[i % 2].submit(_new(f"l{i}"))  # each reserves 1_000_000
        except LeaseRefused as exc:
            refusals.append(str(exc))
            return False
        return True

    accepted = await asyncio.gather(*(submit(i) for i in range(10)))
    assert sum(accepted) == 2
    assert len(refusals) == 8
    assert all(r.startswith("insufficient balance: buyer 'alice' has 0.5") for r in refusals)
    account = await b.call(lambda c: ledger.account(c, "alice"))
    assert (account.balance_micros, account.deposited_micros) == (500_000, 2_500_000)
    kinds = await a.call(
        lambda c: c.execute(
            "SELECT kind, COUNT(*), SUM(amount_micros) FROM ledger_entries GROUP BY kind"
            " ORDER BY kind"
        ).fetchall()
    )
    assert [tuple(k) for k in kinds] == [("deposit", 1, 2_500_000), ("reserve", 2, 2_000_000)]


@pytest.mark.asyncio
async def test_a_lease_is_offered_to_one_node_when_both_replicas_place_it(
    replicas: tuple[Database, Database],
) -> None:
    for node in ("n-a", "n-b"):
        await _node(replicas[0], node)
    await replicas[0].call(lambda c: ledger.deposit(c, "alice", 100_000_000, NOW, POLICY))
    a, b = _stores(replicas)
    for i in range(10):
        await a.submit(_new(f"l{i}"))
    results = await asyncio.gather(
        *(
            store.offer(f"l{i}", node, [f"gpu-{node}-{i}"], 0, "race")
            for i in range(10)
            for store, node in ((a, "n-a"), (b, "n-b"))
        )
    )
    won = [r for r in results if r is not None]
    assert sorted(r.lease_id for r in won) == [f"l{i}" for i in range(10)]
    attempts = await replicas[1].call(
        lambda c: c.execute(
            "SELECT lease_id, COUNT(*) FROM placement_attempts GROUP BY lease_id"
        ).fetchall()
    )
    assert all(n == 1 for _, n in attempts) and len(attempts) == 10


@pytest.mark.asyncio
async def test_a_gpu_is_never_offered_to_two_leases_by_two_replicas(
    replicas: tuple[Database, Database],
) -> None:
    await _node(replicas[0], "n-a")
    await replicas[0].call(lambda c: ledger.deposit(c, "alice", 100_000_000, NOW, POLICY))
    a, b = _stores(replicas)
    for i in range(8):
        await a.submit(_new(f"l{i}"))
    # Every lease wants GPU-0 of the same node; each replica places half of them.
    results = await asyncio.gather(
        *((a if i % 2 else b).offer(f"l{i}", "n-a", ["GPU-0"], 0, "race") for i in range(8))
    )
    assert sum(r is not None for r in results) == 1
    holders = await replicas[1].call(
        lambda c: c.execute(
            "SELECT COUNT(*) FROM leases WHERE node_id = ? AND gpu_uuids_json = ?",
            ("n-a", '["GPU-0"]'),
        ).fetchone()[0]
    )
    assert holders == 1


@pytest.mark.asyncio
async def test_a_read_is_a_read_only_snapshot_that_no_writer_waits_for(
    replicas: tuple[Database, Database],
) -> None:
    """Database.read (placement's view of the leases) runs REPEATABLE READ, READ ONLY:
    no predicate locks to make a writer retry, and nothing written by mistake."""
    a, b = replicas
    level = await a.read(lambda c: c.execute("SHOW transaction_isolation").fetchone()[0])
    assert level == "repeatable read"
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await a.read(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
    assert (
        await a.call(lambda c: c.execute("SELECT COUNT(*) FROM meta WHERE key = 'k'").fetchone()[0])
        == 0
    )
    # A connection the read used goes back to the pool as it came: SERIALIZABLE again.
    levels = await asyncio.gather(
        *(a.call(lambda c: c.execute("SHOW transaction_isolation").fetchone()[0]) for _ in range(8))
    )
    assert set(levels) == {"serializable"}
    # Database.call_locked runs READ COMMITTED, read-write, and gives the connection
    # back SERIALIZABLE too.
    locked = await asyncio.gather(
        *(
            a.call_locked(
                lambda c: c.execute(
                    "SELECT current_setting('transaction_isolation'),"
                    " current_setting('transaction_read_only')"
                ).fetchone()
            )
            for _ in range(8)
        )
    )
    assert {tuple(r) for r in locked} == {("read committed", "off")}
    levels = await asyncio.gather(
        *(a.call(lambda c: c.execute("SHOW transaction_isolation").fetchone()[0]) for _ in range(8))
    )
    assert set(levels) == {"serializable"}
    await _node(b, "n-a")
    assert await a.read(lambda c: c.execute("SELECT node_id FROM nodes").fetchall()) == [("n-a",)]


@pytest.mark.asyncio
async def test_one_idempotency_key_submitted_on_two_replicas_at_once_is_one_lease(
    replicas: tuple[Database, Database],
) -> None:
    """Submit writes first (INSERT .. ON CONFLICT DO NOTHING) and reads only when the key
    is taken: the same request sent to both replicas at once is stored once, with one
    escrow, and every caller gets that lease; another request under the key is refused."""
    a, b = replicas
    await a.call(lambda c: ledger.deposit(c, "alice", 100_000_000, NOW, POLICY))
    stores = _stores(replicas)
    results = await asyncio.gather(*(stores[i % 2].submit(_new("same")) for i in range(8)))
    assert sum(created for _row, created in results) == 1
    assert {row.lease_id for row, _ in results} == {"same"}
    assert {row.created_ns for row, _ in results} == {results[0][0].created_ns}
    held = await b.call(lambda c: c.execute("SELECT COUNT(*) FROM escrow").fetchone()[0])
    events = await b.call(
        lambda c: c.execute(
            "SELECT seq, state FROM lease_events WHERE lease_id = 'same'"
        ).fetchall()
    )
    assert held == 1 and [tuple(e) for e in events] == [(1, "pending")]
    with pytest.raises(IdempotencyConflict):
        await stores[1].submit(_new("same", gpus=2))


@pytest.mark.asyncio
async def test_an_offer_does_not_wait_for_a_heartbeat_flush_of_its_node(
    replicas: tuple[Database, Database],
) -> None:
    """A heartbeat flush updates every heard-from node's row each second. An offer that
    locked the node's row waited for an open flush, then failed serialization and ran
    again; it takes the node's advisory lock instead, and neither waits for the other."""
    a, _b = replicas
    await _node(a, "n-a")
    await a.call(lambda c: ledger.deposit(c, "alice", 100_000_000, NOW, POLICY))
    store = _stores(replicas)[0]
    await store.submit(_new("l1"))
    assert isinstance(a, PostgresDatabase)
    with psycopg.connect(a.target.conninfo) as flush:  # a transaction, left open
        flush.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        flush.execute("UPDATE nodes SET last_seen_ns = %s WHERE node_id = 'n-a'", (NOW + SEC,))
        retries = a.retries
        offered = await asyncio.wait_for(store.offer("l1", "n-a", ["GPU-0"], 0, "t"), 10)
        assert offered is not None and offered.node_id == "n-a"
        flush.commit()  # and the flush commits after it
    assert a.retries == retries
    seen = await a.call(
        lambda c: c.execute("SELECT last_seen_ns FROM nodes WHERE node_id = 'n-a'").fetchone()[0]
    )
    assert seen == NOW + SEC


@pytest.mark.asyncio
async def test_usage_is_stored_and_settled_once_when_both_replicas_ingest_it(
    replicas: tuple[Database, Database], tmp_path: Path
) -> None:
    identity = load_or_create(tmp_path / "id")
    node = identity.node_id
    await _node(replicas[0], node)
    await replicas[0].call(lambda c: ledger.deposit(c, "alice", 100_000_000, NOW, POLICY))
    a, _ = _stores(replicas)
    await a.submit(_new("l1"))
    assert await a.offer("l1", node, ["GPU-0"], 1_000_000, "test") is not None
    await replicas[0].call(
        lambda c: c.execute("UPDATE leases SET state = 'running' WHERE lease_id = 'l1'")
    )
    records = []
    for seq in range(1, 21):
        start = NOW + (seq - 1) * 60 * SEC
        record = UsageRecord(
            node_id=node,
            seq=seq,
            lease_id="l1",
            start_unix_ns=start,
            end_unix_ns=start + 60 * SEC,
            duration_ns=60 * SEC,
            gpu_count=1,
            gpu_ns=60 * SEC,
        )
        records.append(SignedUsageRecord(record, sign_record(record, identity.sign)))
    later = NOW + 3600 * SEC
    # Both replicas get every batch (an agent that switched replicas mid-report).
    batches = [records[i : i + 5] for i in range(0, 20, 5)]
    await asyncio.gather(
        *(
            db.call(lambda c, batch=batch: store_records(c, node, batch, later, POLICY))
            for batch in batches
            for db in replicas
        )
    )

    def totals(conn: Conn) -> tuple[int, ...]:
        def one(sql: str, *params: object) -> int:
            return int(conn.execute(sql, params).fetchone()[0])

        return (
            one("SELECT COUNT(*) FROM usage_records"),
            one("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'settle'"),
            one("SELECT settled_micros FROM escrow WHERE lease_id = 'l1'"),
            ledger.earnings(conn, node),
            one("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", node),
        )

    cost = ledger.cost_micros(1_000_000, 20 * 60 * SEC)  # billed on the cumulative GPU-ns
    assert await replicas[1].call(totals) == (20, 20, cost, cost, 20)


def test_the_shipped_replica_configs_are_valid() -> None:
    """deploy/replicas: both replica configs load, name PostgreSQL and a password file
    (never a password), and the agent example lists both replicas."""
    import yaml

    from agent.config import CoordinatorConfig
    from scheduler.config import SchedulerConfig

    root = Path(__file__).resolve().parent.parent / "deploy" / "replicas"
    ids = set()
    for name in ("replica-a.yaml", "replica-b.yaml"):
        config = SchedulerConfig.model_validate(yaml.safe_load((root / name).read_text()))
        assert config.database.is_postgres and config.database.password_file is not None
        ids.add(config.replica.id)
    assert ids == {"sched-a", "sched-b"}
    agent = yaml.safe_load((root / "agent-two-replicas.yaml").read_text())
    assert len(CoordinatorConfig.model_validate(agent["coordinator"]).targets) == 2


@pytest.mark.parametrize(
    ("database", "says"),
    [
        ({"url": "postgresql://u:hunter2@db/x"}, "a password in the URL is refused"),
        (
            {"url": "postgresql://u@127.0.0.1:1/x", "password_file": "/nonexistent/pw"},
            "database.password_file /nonexistent/pw: cannot read a password",
        ),
        ({"url": "postgresql://u@127.0.0.1:1/x"}, "cannot open the database"),
    ],
)
def test_serve_refuses_a_bad_database_by_name(
    tmp_path: Path, database: dict[str, str], says: str
) -> None:
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"path": str(tmp_path / "s.db"), **database},
                "server": {"listen": "127.0.0.1:0", "insecure": True},
                "metrics": {"listen": None},
            }
        )
    )
    scheduler = Path(sys.executable).parent / "gpu-scheduler"
    done = subprocess.run(
        [str(scheduler), "-c", str(config), "serve"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert says in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
