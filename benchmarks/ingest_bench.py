"""Usage ingest on the coordinator: records/s stored and settled, per-record vs set-based.

``store_records`` (scheduler/usage_ingest.py) used to run about fifteen statements
per record (issue #18); on PostgreSQL each is a round trip, so ingest ran ~15x
slower there than on SQLite. The set-based ingest runs a constant number per
report. This measures both, side by side in one run, on both backends:

- SQLite: the scheduler's own ``Database`` (WAL, synchronous=FULL) in a temporary
  directory;
- PostgreSQL: a throwaway cluster (tests/pgcluster.py) with fsync and
  synchronous_commit on, as in production, on its unix socket.

Each figure is one fresh database, one node, one running lease with a held
escrow, and reports of 1, 10 or 100 consecutive new records sent one after
another through ``Database.call`` (one transaction each, as the server does).
Signature checks (``verify_all``) are not included: they cost the same either way.
The per-record path is the reference kept in tests/test_usage_ingest_sets.py, so
it is measured only from a checkout with its tests.

Run alone with ``python -m benchmarks.ingest_bench [--smoke] [--sizes 1,10,100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gpuagent.usage import SignedUsageRecord, UsageRecord
from gpuagent.v1 import leases_pb2
from scheduler import ledger
from scheduler.db import Database, open_database
from scheduler.leases_store import LeaseStore
from scheduler.storage import Conn, Cursor
from scheduler.usage_ingest import IngestResult, store_records

from .registry import Figure, register

SEC = 10**9
T0 = 1_700_000_000 * SEC
NODE = "node-bench"
LEASE = "lease-bench"
POLICY = ledger.LedgerPolicy()
SIZES = (1, 10, 100)

Ingest = Callable[[Conn, str, Sequence[SignedUsageRecord], int, ledger.LedgerPolicy], IngestResult]


def _reference() -> Ingest | None:
    """The per-record ingest this replaced, from the tests (None without them)."""
    try:
        from tests.test_usage_ingest_sets import _reference_store_records
    except ImportError:  # an installed package without the checkout's tests/
        return None
    return _reference_store_records


def _setup(conn: Conn) -> None:
    conn.execute(
        "INSERT INTO nodes (node_id, public_key, first_seen_ns) VALUES (?, ?, ?)",
        (NODE, b"k", T0),
    )
    ledger.deposit(conn, "alice", 10**13, T0, POLICY)
    spec = leases_pb2.LeaseSpec(gpu_count=8, max_duration_seconds=10**7)
    conn.execute(
        "INSERT INTO leases (lease_id, buyer, spec, gpu_count, price_micros_per_gpu_hour,"
        " accepted_price_micros_per_gpu_hour, max_duration_s, node_id, state, created_ns,"
        " updated_ns, placed_ns, started_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (LEASE, "alice", spec.SerializeToString(), 8, 2_000_000, 1_234_567, 10**7, NODE,
         "running", T0, T0, T0 - 60 * SEC, T0),
    )  # fmt: skip
    lease = LeaseStore._get(conn, LEASE)
    assert lease is not None
    ledger.reserve(conn, lease, T0, POLICY)


def _record(seq: int) -> SignedUsageRecord:
    start = T0 + (seq - 1) * 60 * SEC
    record = UsageRecord(
        node_id=NODE,
        seq=seq,
        lease_id=LEASE,
        start_unix_ns=start,
        end_unix_ns=start + 60 * SEC,
        duration_ns=60 * SEC,
        gpu_count=8,
        gpu_ns=480 * SEC,
        gpu_util_permille=930,
        energy_mj=42_000_000,
        cpu_usec=59_000_000,
    )
    return SignedUsageRecord(record, bytes(64))  # store_records takes verified records


class CountingConn:
    """A Conn that counts statements (execute and executemany calls); the statement
    count test (tests/test_usage_ingest_sets.py) uses it too."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.statements = 0

    @property
    def dialect(self) -> Any:
        return self.conn.dialect

    @property
    def total_changes(self) -> int:
        return self.conn.total_changes

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self.statements += 1
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> None:
        self.statements += 1
        self.conn.executemany(sql, rows)


async def _measure(db: Database, ingest: Ingest, size: int, reports: int) -> tuple[float, float]:
    """(records/s, statements per report) for ``reports`` reports of ``size`` records."""
    await db.open()
    try:
        await db.call(_setup)
        now = T0 + 10**6 * SEC
        counts: list[int] = []

        def one(conn: Conn, batch: list[SignedUsageRecord]) -> None:
            counting = CountingConn(conn)
            result = ingest(counting, NODE, batch, now, POLICY)
            assert result.stored == len(batch), result
            counts.append(counting.statements)  # the last attempt's, after a retry

        seq = 1
        started = time.perf_counter()
        for _ in range(reports):
            batch = [_record(s) for s in range(seq, seq + size)]
            seq += size
            await db.call(lambda c, b=batch: one(c, b))  # type: ignore[misc]
        elapsed = time.perf_counter() - started
        (acked,) = await db.call(
            lambda c: c.execute(
                "SELECT acked_usage_seq FROM nodes WHERE node_id = ?", (NODE,)
            ).fetchone()
        )
        assert acked == seq - 1, (acked, seq)
        return size * reports / elapsed, counts[-1]
    finally:
        await db.close()


@contextlib.contextmanager
def _postgres() -> Iterator[Callable[[], str] | None]:
    """A factory of fresh database URLs on a durable throwaway cluster (None: no server)."""
    try:
        from tests.pgcluster import Cluster, find_bin_dir
    except ImportError:
        yield None
        return
    bin_dir = find_bin_dir()
    if bin_dir is None:
        yield None
        return
    cluster = Cluster(bin_dir, durable=True)
    cluster.start()
    try:
        yield cluster.new_database
    finally:
        cluster.stop()


def _reports(size: int, smoke: bool) -> int:
    """Reports per figure: enough records to average over, few enough for the old path."""
    records = {1: 300, 10: 1000, 100: 2000}.get(size, 1000) // (10 if smoke else 1)
    return max(3, records // size)


async def _run(sizes: Sequence[int], smoke: bool) -> list[Figure]:
    paths: list[tuple[str, Ingest]] = []
    reference = _reference()
    if reference is not None:
        paths.append(("per-record", reference))
    else:
        print("usage-ingest: tests/ not importable; the per-record path is not measured")
    paths.append(("set-based", store_records))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp, _postgres() as new_pg:
        backends: list[tuple[str, Callable[[int], Database]]] = [
            ("sqlite", lambda n: Database(Path(tmp) / f"s{n}" / "scheduler.db"))
        ]
        if new_pg is not None:
            backends.append(("postgresql", lambda n: open_database(new_pg())))
        else:
            print("usage-ingest: PostgreSQL server binaries not found; PostgreSQL skipped")
        made = 0
        for backend, make in backends:
            for size in sizes:
                rates = {}
                for name, ingest in paths:
                    made += 1
                    rate, statements = await _measure(
                        make(made), ingest, size, _reports(size, smoke)
                    )
                    rates[name] = rate
                    tag = f"{backend}, {size}/report, {name}"
                    figures.append(Figure(f"{tag}: records", rate, "rec/s"))
                    figures.append(Figure(f"{tag}: statements", statements, "/report"))
                if len(rates) == 2:
                    speedup = rates["set-based"] / rates["per-record"]
                    figures.append(Figure(f"{backend}, {size}/report: speedup", speedup, "x"))
    return figures


@register("usage-ingest")
def bench(smoke: bool) -> list[Figure]:
    return asyncio.run(_run(SIZES, smoke))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest_bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CI-sized inputs")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="records per report")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    for figure in asyncio.run(_run(sizes, args.smoke)):
        print(f"{figure.name:<48} {figure.value:>12.4g} {figure.unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
