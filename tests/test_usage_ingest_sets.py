"""Set-based usage ingest (scheduler/usage_ingest.py, issue #18) against the per-record
ingest it replaced, kept here as the reference (``_reference_store_records``, the old
code verbatim but for its name).

The property test feeds the same random reports (several leases, duplicates,
conflicting copies, intervals overlapping inside one report and against stored
ones, final records, an escrow that runs out, released leases, redundant-run copies,
seq gaps filled later, seqs 0 and 2**63) to both on two fresh databases of one
backend and asserts the same IngestResult, the same log lines and the same
database, every table, row for row (PostgreSQL's internal ``rowid`` aside). Then:
the statement count is a constant per report, not per record; and two replicas
ingesting the same reports at once store and settle each record once.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.ingest_bench import CountingConn
from gpuagent.usage import (
    SignedUsageRecord,
    UsageRecord,
    UsageRecordError,
    canonical_bytes,
    validate_record,
)
from gpuagent.v1 import leases_pb2
from scheduler import ledger
from scheduler.db import PostgresDatabase, in_transaction, migrate
from scheduler.leases_store import LeaseRow, LeaseStore
from scheduler.storage import Conn, parse_target, schema_of
from scheduler.usage_ingest import I64_MAX, IngestResult, store_records
from tests.pgcluster import Cluster

T = TypeVar("T")
SEC = 10**9
MIN = 60 * SEC
T0 = 1_700_000_000 * SEC
NODE, OTHER = "node-a", "node-b"
POLICY = ledger.LedgerPolicy()  # clock skew allowance 60 s


# -- two databases of one backend ------------------------------------------------------


class Store:
    """One scheduler database, driven synchronously: ``call(fn)`` is one transaction."""

    def call(self, fn: Callable[[Conn], T]) -> T:
        raise NotImplementedError

    def reset(self) -> None:
        """Empty every table (identities restarted), schema kept."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteStore(Store):
    def __init__(self) -> None:
        self.raw: sqlite3.Connection | None = None
        self.reset()

    def reset(self) -> None:
        if self.raw is not None:
            self.raw.close()
        self.raw = sqlite3.connect(":memory:", isolation_level=None)
        self.raw.execute("PRAGMA foreign_keys=ON")
        migrate(self.raw)

    def call(self, fn: Callable[[Conn], T]) -> T:
        assert self.raw is not None
        return in_transaction(self.raw, fn)

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()


class PgStore(Store):
    """A database of its own on the session's cluster, SERIALIZABLE and retried as
    the scheduler runs it (PostgresDatabase.call_sync)."""

    def __init__(self, cluster: Cluster, url: str | None = None) -> None:
        self.cluster = cluster
        self.owner = url is None
        self.url = url or cluster.new_database()
        self.db = PostgresDatabase(parse_target(self.url))
        asyncio.run(self.db.open())

    def call(self, fn: Callable[[Conn], T]) -> T:
        return self.db.call_sync(fn)

    def reset(self) -> None:
        tables = ", ".join(self.call(lambda c: sorted(schema_of(c))))
        self.call(lambda c: c.execute(f"TRUNCATE {tables} RESTART IDENTITY"))

    def close(self) -> None:
        asyncio.run(self.db.close())
        if self.owner:
            self.cluster.drop_database(self.url)


@dataclass
class Backend:
    name: str
    make: Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", SqliteStore)
        return
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    yield Backend("postgresql", lambda: PgStore(cluster))


@pytest.fixture
def pair(backend: Backend) -> Iterator[tuple[Store, Store]]:
    """(for the reference ingest, for the set-based one)."""
    old, new = backend.make(), backend.make()
    yield old, new
    old.close()
    new.close()


def dump(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (PostgreSQL's rowid aside: an identity value that an
    INSERT .. ON CONFLICT draws even when it inserts nothing)."""
    out = {}
    for table, info in schema_of(conn).items():
        columns = list(info["columns"])  # type: ignore[index]
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()  # noqa: S608
        out[table] = sorted((tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                             for r in rows), key=repr)  # fmt: skip
    return out


# -- the scenario: leases in every state settlement distinguishes ----------------------


@dataclass(frozen=True)
class Lease:
    lease_id: str
    buyer: str = "alice"
    gpus: int = 1
    price: int = 1_000_000
    accepted: int | None = None
    max_s: int = 7200
    node: str | None = NODE
    state: str = "running"
    placed: int | None = T0 - 10 * MIN
    ended: int | None = None
    escrow: str = "held"  # held | released (released at setup) | none (no row)
    verify_paid: int | str | None = "-"  # "-": not a copy; None: held; 0: lost; 1: paid


LEASES = (
    Lease("l-run", gpus=2, price=2_000_000, accepted=1_234_567),
    Lease("l-small", price=999_999, max_s=300),  # escrow runs out after ~5 GPU-minutes
    Lease("l-tight", placed=T0 + 40 * MIN),  # offered late: a short window
    Lease("l-rel", buyer="bob", price=3_000_000, max_s=360, state="succeeded",
          ended=T0 + 50 * MIN, escrow="released"),  # late records come from bob's balance
    Lease("l-bob", buyer="bob", max_s=1080),  # holds 0.3 of bob's 0.4 after l-rel's release
    Lease("l-end", price=1_500_000, accepted=1_400_001, state="succeeded",
          ended=T0 + 45 * MIN),  # held until its final record, which releases it
    Lease("l-noesc", buyer="carol", price=1_800_000, placed=None, escrow="none"),
    Lease("l-noacct", buyer="erin", escrow="none"),  # erin has no account at all
    Lease("l-vheld", state="succeeded", ended=T0 + 45 * MIN, verify_paid=None),
    Lease("l-vlost", state="succeeded", ended=T0 + 45 * MIN, verify_paid=0),
    Lease("l-vpaid", verify_paid=1),
    Lease("l-free", price=0),
    Lease("l-other", node=OTHER),
    Lease("l-unplaced", node=None, state="pending", placed=None),
)  # fmt: skip
LEASE_IDS = [lease.lease_id for lease in LEASES] + ["l-nope"]


def setup(conn: Conn) -> None:
    for node in (NODE, OTHER):
        conn.execute(
            "INSERT INTO nodes (node_id, public_key, first_seen_ns) VALUES (?, ?, ?)",
            (node, b"k", T0),
        )
    for buyer, micros in (("alice", 10**9), ("bob", 400_000), ("carol", 250_000)):
        ledger.deposit(conn, buyer, micros, T0, POLICY)
    for lease in LEASES:
        spec = leases_pb2.LeaseSpec(gpu_count=lease.gpus, max_duration_seconds=lease.max_s)
        started = None if lease.placed is None else lease.placed + SEC
        conn.execute(
            "INSERT INTO leases (lease_id, buyer, spec, gpu_count, price_micros_per_gpu_hour,"
            " accepted_price_micros_per_gpu_hour, max_duration_s, node_id, state, created_ns,"
            " updated_ns, placed_ns, started_ns, ended_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?)",
            (lease.lease_id, lease.buyer, spec.SerializeToString(), lease.gpus, lease.price,
             lease.accepted, lease.max_s, lease.node, lease.state, T0 - 20 * MIN, T0,
             lease.placed, started, lease.ended),
        )  # fmt: skip
        if lease.verify_paid != "-":
            conn.execute(
                "INSERT INTO verify_copies (copy_id, parent_id, role, paid) VALUES (?, ?, ?, ?)",
                (lease.lease_id, "parent", "copy", lease.verify_paid),
            )
        row = LeaseStore._get(conn, lease.lease_id)
        assert row is not None
        if lease.escrow != "none":
            ledger.reserve(conn, row, T0, POLICY)
        if lease.escrow == "released":
            ledger.release(conn, lease.lease_id, T0, "setup")
        elif lease.ended is not None:
            ledger.lease_ended(conn, row, lease.ended)


def make_record(
    seq: int,
    lease_id: str,
    start: int,
    length: int,
    *,
    gpus: int = 1,
    final: bool = False,
    variant: str = "ok",
) -> SignedUsageRecord:
    """A record of [T0 + start, T0 + start + length) minutes; ``variant`` spoils it."""
    duration = length * MIN
    fields: dict[str, Any] = {"energy_mj": 1000 + seq % 97}
    node = NODE
    if variant == "gpus":
        gpus = 3  # more than any lease holds
    elif variant == "long":
        duration *= 12  # a duration the wall-clock interval does not show: the window
    elif variant == "huge":
        fields["energy_mj"] = 2**63
    elif variant == "node":
        node = OTHER  # a record naming another node than the session's
    gpu_ns = gpus * duration + (1 if variant == "gpu_ns" else 0)
    record = UsageRecord(
        node_id=node,
        seq=seq,
        lease_id=lease_id,
        start_unix_ns=T0 + start * MIN,
        end_unix_ns=T0 + (start + length) * MIN,
        duration_ns=duration,
        gpu_count=gpus,
        gpu_ns=gpu_ns,
        final=final,
        **fields,
    )
    return SignedUsageRecord(record, b"sig-%d" % (seq % 2**64))


SPECIAL_SEQS = (0, 2**63, 2**64 - 1, I64_MAX, I64_MAX - 1)
VARIANTS = ("ok",) * 12 + ("final",) * 2 + ("gpus", "gpu_ns", "huge", "long", "node")
# Most records go to the leases whose settlement has several paths, so that a lease
# sees enough records per scenario to overlap, run out, end and follow its final one.
BUSY = ("l-run", "l-small", "l-tight", "l-rel", "l-end", "l-noesc", "l-vlost")
GPUS = {lease.lease_id: lease.gpus for lease in LEASES}


@st.composite
def scenarios(draw: st.DrawFn, ties: bool) -> list[list[SignedUsageRecord]]:
    """Reports for one node: seqs from a small pool (duplicates, conflicting copies,
    gaps filled later), intervals on a coarse grid (overlaps), some final records.

    Without ``ties`` a lease has one final seq at most and no empty intervals: with
    several matches, the old queries' ``LIMIT 1`` named one in an order only SQLite
    defines (its index order; the set-based ingest follows that order)."""
    finals: dict[str, int] = {}
    made: list[SignedUsageRecord] = []
    reports = []
    for _ in range(draw(st.integers(1, 4))):
        report = []
        for _ in range(draw(st.integers(0, 30))):
            if made and draw(st.integers(0, 9)) == 0:
                report.append(made[draw(st.integers(0, len(made) - 1))])  # an exact re-send
                continue
            if draw(st.integers(0, 19)):
                seq = draw(st.integers(1, 40))
            else:
                seq = draw(st.sampled_from(SPECIAL_SEQS))
            lease_id = draw(st.sampled_from(BUSY if draw(st.integers(0, 3)) else LEASE_IDS))
            variant = draw(st.sampled_from(VARIANTS))
            if variant == "final" and (ties or lease_id not in finals):
                finals[lease_id] = seq
            record = make_record(
                seq,
                lease_id,
                draw(st.integers(0, 40)),
                draw(st.integers(0 if ties else 1, 6)),
                gpus=draw(st.integers(1, GPUS.get(lease_id, 1))),
                final=finals.get(lease_id) == seq or (ties and variant == "final"),
                variant=variant,
            )
            made.append(record)
            report.append(record)
        reports.append(report)
    return reports


class LogLines(logging.Handler):
    """The scheduler's warnings and errors, with the fields that identify them."""

    KEYS = ("node_id", "seq", "lease_id", "unbilled_micros")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[tuple[object, ...]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = tuple(getattr(record, k, None) for k in self.KEYS)
        self.lines.append((record.levelno, record.getMessage(), *fields))


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("scheduler")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


Ingest = Callable[[Conn, str, Sequence[SignedUsageRecord], int, ledger.LedgerPolicy], IngestResult]


def run_both(
    old: Store, new: Store, reports: list[list[SignedUsageRecord]], lines: LogLines
) -> list[IngestResult]:
    """Ingest ``reports`` with the reference into ``old`` and set-based into ``new``;
    assert the same results, log lines and databases after every report."""
    old.reset()
    new.reset()
    for store in (old, new):
        store.call(setup)
    results = []
    for number, report in enumerate(reports):
        now = T0 + (60 + 10 * number) * MIN
        outcome = []
        for store, ingest in ((old, _reference_store_records), (new, store_records)):
            lines.lines.clear()
            result = store.call(
                lambda c, i=ingest, r=report, t=now: i(c, NODE, r, t, POLICY)  # type: ignore[misc]
            )
            outcome.append((result, list(lines.lines), store.call(dump)))
        (want, want_lines, want_db), (got, got_lines, got_db) = outcome
        assert got == want, f"report {number}"
        assert got_lines == want_lines, f"report {number}"
        for table in want_db:
            assert got_db[table] == want_db[table], f"report {number}, table {table}"
        results.append(got)
    return results


# -- tests -----------------------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_set_based_ingest_matches_the_per_record_reference(
    data: st.DataObject, backend: Backend, pair: tuple[Store, Store], log_lines: LogLines
) -> None:
    reports = data.draw(scenarios(ties=backend.name == "sqlite"))
    run_both(*pair, reports, log_lines)


def test_every_path_in_one_scenario(pair: tuple[Store, Store], log_lines: LogLines) -> None:
    """One hand-made scenario that takes every path the property test may take, with
    the paths checked to have been taken (so the comparison is known to cover them)."""
    r = make_record
    reports = [
        [
            r(1, "l-run", 0, 2, gpus=2),
            r(2, "l-run", 1, 2, gpus=2),  # overlaps seq 1, in the same report
            r(3, "l-run", 2, 2, gpus=2),  # adjoins seq 1
            r(1, "l-run", 0, 2, gpus=2),  # an exact re-send in the same report
            r(4, "l-small", 0, 3),
            r(5, "l-small", 3, 3),  # the escrow runs out here: partly unbilled
            r(6, "l-small", 6, 3),  # wholly unbilled
            r(8, "l-end", 10, 5, final=True),  # releases l-end's escrow
            r(7, "l-end", 0, 5),  # lower seq, after the release: from alice's balance
            r(9, "l-end", 20, 5),  # follows the final record
            r(10, "l-rel", 0, 10),  # released lease: bob's balance, until it runs out
            r(11, "l-noesc", 0, 30),  # no escrow row: created, carol's balance
            r(12, "l-noacct", 0, 5),  # no escrow, no account: unbilled
            r(13, "l-vheld", 0, 5, final=True),  # a held copy: billed, not paid, kept
            r(14, "l-vlost", 0, 5, final=True),  # a lost copy: billed, not paid, released
            r(15, "l-vpaid", 0, 5),
            r(16, "l-free", 0, 5),
            r(17, "l-other", 0, 5),
            r(18, "l-nope", 0, 5),
            r(19, "l-unplaced", 0, 5),
            r(20, "l-tight", 0, 30, variant="long"),  # more than the window
            r(21, "l-run", 10, 1, variant="gpus"),
            r(22, "l-run", 11, 1, variant="gpu_ns"),
            r(23, "l-run", 12, 1, variant="huge"),
            r(0, "l-run", 13, 1),
            r(2**63, "l-run", 14, 1),
            r(26, "l-run", 15, 1),  # a gap at 24 and 25
        ],
        [
            r(3, "l-run", 30, 1, gpus=2),  # a different record under a used seq
            r(24, "l-run", 3, 1, gpus=2),  # overlaps stored seq 3
            r(25, "l-run", 4, 2, gpus=2),  # fills the gap: the ack jumps to 26
            r(27, "l-run", 6, 2, gpus=2),
            r(28, "l-run", 7, 2, gpus=2),  # overlaps seq 27 of this report
        ],
    ]
    first, second = run_both(*pair, reports, log_lines)
    assert (first.acked_through_seq, second.acked_through_seq) == (23, 28)
    assert (second.duplicates, second.conflicting) == (1, 1)
    assert first.duplicates == 1
    reasons = dict(first.rejected) | dict(second.rejected)
    assert "overlaps seq 1" in reasons[2] and "overlaps seq 3" in reasons[24]
    assert "overlaps seq 27" in reasons[28]
    assert "follows the lease's final record seq 8" in reasons[9]
    assert "more than the" in reasons[20]
    assert {0, 2**63} <= set(reasons)
    _, new = pair
    entries = new.call(
        lambda c: c.execute(
            "SELECT kind, lease_id, reason, ref FROM ledger_entries WHERE ts_ns > ?"
            " ORDER BY entry_id",
            (T0,),
        ).fetchall()
    )
    kinds = {(k, lease, why) for k, lease, why, _ in entries}
    assert ("release", "l-end", "final usage record") in kinds
    assert ("reserve", "l-end", "usage after release") in kinds  # seq 7, after seq 8
    assert ("reserve", "l-rel", "usage after release") in kinds
    assert ("reserve", "l-noesc", "usage after release") in kinds
    assert ("release", "l-vlost", "final usage record") in kinds
    assert not any(lease in ("l-vheld", "l-vlost", "l-free") for k, lease, _, _ in entries
                   if k == "settle")  # fmt: skip
    unbilled = dict(
        new.call(lambda c: c.execute("SELECT lease_id, unbilled_micros FROM escrow").fetchall())
    )
    assert unbilled["l-small"] > 0 and unbilled["l-rel"] > 0 and unbilled["l-noacct"] > 0
    assert new.call(lambda c: ledger.account(c, "bob")).balance_micros == 0


Counting = CountingConn  # one statement-counting Conn (benchmarks/ingest_bench.py)


def _count(store: Store, ingest: Ingest, report: list[SignedUsageRecord], now: int) -> int:
    def run(conn: Conn) -> int:
        counting = Counting(conn)
        ingest(counting, NODE, report, now, POLICY)
        return counting.statements

    return store.call(run)


def test_a_report_costs_a_constant_number_of_statements(pair: tuple[Store, Store]) -> None:
    """100 records of one lease: a handful of statements, where the reference ran
    about fifteen per record; the same for the next 100 (with history stored), for a
    re-send of them all, and for 100 records spread over ten leases."""
    old, new = pair
    for store in pair:
        store.call(setup)
    first = [make_record(s, "l-run", s, 1, gpus=2) for s in range(1, 101)]
    second = [make_record(s, "l-run", s, 1, gpus=2) for s in range(101, 201)]
    spread = [make_record(200 + s, LEASES[s % 10].lease_id, 200 + s, 1) for s in range(1, 101)]
    now = T0 + 400 * MIN
    reference = _count(old, _reference_store_records, first, now)
    counts = [_count(new, store_records, report, now) for report in (first, second, second)]
    counts.append(_count(new, store_records, spread, now))
    assert reference > 1000
    assert max(counts) <= 25, counts
    assert counts[0] <= 16, counts  # one lease, held escrow: the common case


def test_two_replicas_ingesting_the_same_reports_store_and_settle_each_once(
    pg_cluster: Cluster,
) -> None:
    """Four threads on two pools (two replicas) ingest overlapping slices of the same
    records at once: SERIALIZABLE plus the retry make it as if one ran after another;
    every (node, seq) is stored once, settled once, the escrow never overdrawn."""
    first = PgStore(pg_cluster)
    second = PgStore(pg_cluster, first.url)  # a second pool on the same database
    try:
        first.call(setup)
        records = [make_record(s, "l-run", s, 1, gpus=2) for s in range(1, 61)]
        records += [make_record(60 + s, "l-small", s, 1) for s in range(1, 21)]
        slices = [records[i : i + 20] for i in range(0, 80, 10)]  # each record twice
        now = T0 + 400 * MIN
        errors: list[BaseException] = []

        def ingest(store: Store, batches: list[list[SignedUsageRecord]]) -> None:
            try:
                for batch in batches:
                    store.call(lambda c, b=batch: store_records(c, NODE, b, now, POLICY))  # type: ignore[misc]
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=ingest, args=(store, slices[k::2]))
            for store in (first, second)
            for k in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

        def totals(conn: Conn) -> tuple[int, ...]:
            def one(sql: str, *params: object) -> int:
                return int(conn.execute(sql, params).fetchone()[0])

            return (
                one("SELECT COUNT(*) FROM usage_records WHERE status = 'accepted'"),
                one("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'settle' AND ts_ns = ?", now),
                one("SELECT COUNT(*) FROM usage_records WHERE cost_micros > 0"),
                one("SELECT COALESCE(SUM(cost_micros), 0) FROM usage_records"),
                one("SELECT SUM(settled_micros) FROM escrow WHERE lease_id LIKE 'l-%'"),
                ledger.earnings(conn, NODE),
                one("SELECT unbilled_micros FROM escrow WHERE lease_id = 'l-small'"),
                one("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", NODE),
            )  # fmt: skip

        accepted, settles, charged, costs, settled, earned, unbilled, acked = first.call(totals)
        # l-small's escrow covers 5 minutes and a bit: its later records charge nothing.
        assert (accepted, settles, charged, acked) == (80, 66, 66, 80)
        run = ledger.cost_micros(1_234_567, 60 * 2 * MIN)
        small = ledger.reservation_micros(999_999, 1, 300)  # the cap: the rest is unbilled
        assert costs == settled == earned == run + small
        assert unbilled == ledger.cost_micros(999_999, 20 * MIN) - small
        print(f"serialization retries: {first.db.retries + second.db.retries}")
    finally:
        second.close()
        first.close()


# -- the per-record ingest this replaced (scheduler/usage_ingest.py before issue #18) ---

log = logging.getLogger("scheduler.usage_ingest")
_COUNTERS = (
    "duration_ns",
    "gpu_ns",
    "peak_gpu_memory_bytes",
    "energy_mj",
    "cpu_usec",
    "peak_memory_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
)


def _reference_refusal(
    conn: Conn, record: UsageRecord, policy: ledger.LedgerPolicy, now_ns: int
) -> tuple[str, LeaseRow | None]:
    """Why an authentic record cannot be billed ("" if it can), and its lease."""
    try:
        validate_record(record)
    except UsageRecordError as exc:
        return f"invalid: {exc}", None
    for name in _COUNTERS:
        if getattr(record, name) > I64_MAX:
            return f"invalid: {name} {getattr(record, name)} exceeds the int64 range", None
    # The store's reader, inside this transaction, so the lease cannot change under us.
    lease = LeaseStore._get(conn, record.lease_id)
    if lease is None:
        return f"lease {record.lease_id!r} is unknown", None
    if lease.node_id != record.node_id:
        where = f"it is on {lease.node_id}" if lease.node_id else "it is not placed"
        return f"lease {record.lease_id!r} is not held by this node ({where})", lease
    if record.gpu_count > lease.gpu_count:
        return (
            f"gpu_count {record.gpu_count} exceeds the lease's {lease.gpu_count} GPUs",
            lease,
        )
    # Billing follows the node's monotonic clock, so "too much" is judged on durations
    # against this scheduler's own clock, never by comparing two machines' wall clocks:
    # a node whose wall clock stepped must still be billed exactly. The lease cannot
    # have run on the node before it was offered there, nor after its end was reported.
    if lease.placed_ns is not None:
        until = lease.ended_ns if lease.ended_ns is not None else now_ns
        window = until - lease.placed_ns + policy.clock_skew_allowance_ns
        billed = conn.execute(
            "SELECT COALESCE(SUM(duration_ns), 0) FROM usage_records WHERE lease_id = ?"
            " AND node_id = ? AND status = 'accepted'",
            (record.lease_id, record.node_id),
        ).fetchone()[0]
        if billed + record.duration_ns > window:
            state = f"ended at {lease.ended_ns}" if lease.ended_ns else "still running"
            return (
                f"bills {billed + record.duration_ns} ns in all, more than the {window} ns "
                f"the lease can have run here (offered at {lease.placed_ns}, {state})",
                lease,
            )
    final = conn.execute(
        "SELECT seq FROM usage_records WHERE lease_id = ? AND node_id = ? AND status = 'accepted'"
        " AND final = 1 AND seq < ? LIMIT 1",
        (record.lease_id, record.node_id, record.seq),
    ).fetchone()
    if final is not None:
        return f"follows the lease's final record seq {final[0]}", lease
    overlap = conn.execute(
        "SELECT seq, start_ns, end_ns FROM usage_records WHERE lease_id = ?"
        " AND status = 'accepted' AND start_ns < ? AND end_ns > ? ORDER BY start_ns LIMIT 1",
        (record.lease_id, record.end_unix_ns, record.start_unix_ns),
    ).fetchone()
    if overlap is not None:
        return (
            f"interval [{record.start_unix_ns}, {record.end_unix_ns}) overlaps seq {overlap[0]} "
            f"[{overlap[1]}, {overlap[2]}), already billed",
            lease,
        )
    return "", lease


def _reference_contiguous_seq(conn: Conn, node_id: str) -> int:
    """Advance and store the node's highest seq with every seq up to it stored."""
    row = conn.execute("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
    acked = int(row[0]) if row else 0
    while conn.execute(
        "SELECT 1 FROM usage_records WHERE node_id = ? AND seq = ?", (node_id, acked + 1)
    ).fetchone():
        acked += 1
    conn.execute("UPDATE nodes SET acked_usage_seq = ? WHERE node_id = ?", (acked, node_id))
    return acked


def _reference_store_records(
    conn: Conn,
    node_id: str,
    records: Sequence[SignedUsageRecord],
    now_ns: int,
    policy: ledger.LedgerPolicy,
) -> IngestResult:
    """Store verified records (one transaction) and settle the accepted ones."""
    result = IngestResult()
    for signed in records:
        record = signed.record
        if not 1 <= record.seq <= I64_MAX:
            # Outside what a node's counter can reach: never contiguous, nothing to keep.
            result.rejected.append((record.seq, f"invalid: seq {record.seq}"))
            continue
        body = canonical_bytes(record)
        existing = conn.execute(
            "SELECT canonical FROM usage_records WHERE node_id = ? AND seq = ?",
            (node_id, record.seq),
        ).fetchone()
        if existing is not None:
            result.duplicates += 1
            if bytes(existing[0]) != body:
                result.conflicting += 1
                log.error(
                    "node signed two different usage records with one seq; kept the first",
                    extra={"node_id": node_id, "seq": record.seq, "lease_id": record.lease_id},
                )
            continue
        reason, lease = _reference_refusal(conn, record, policy, now_ns)
        conn.execute(
            "INSERT INTO usage_records (node_id, seq, lease_id, status, reason, start_ns, end_ns,"
            " duration_ns, gpu_count, gpu_ns, final, canonical, signature, received_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                node_id,
                record.seq,
                record.lease_id,
                "rejected" if reason else "accepted",
                reason,
                record.start_unix_ns,
                record.end_unix_ns,
                min(record.duration_ns, I64_MAX),
                record.gpu_count,
                min(record.gpu_ns, I64_MAX),
                int(record.final),
                body,
                signed.signature,
                now_ns,
            ),
        )
        if reason:
            result.rejected.append((record.seq, reason))
            continue
        assert lease is not None
        result.stored += 1
        settlement = ledger.settle(
            conn, lease, node_id, record.gpu_ns, now_ns, ref=f"{node_id}:{record.seq}"
        )
        result.charged_micros += settlement.charged_micros
        conn.execute(
            "UPDATE usage_records SET cost_micros = ? WHERE node_id = ? AND seq = ?",
            (settlement.charged_micros, node_id, record.seq),
        )
        if record.final:
            ledger.final_record(conn, record.lease_id, now_ns)
    result.acked_through_seq = _reference_contiguous_seq(conn, node_id)
    return result
