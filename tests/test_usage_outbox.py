"""The sqlite usage outbox: seqs, atomic cursors, acks, back-pressure."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.usage.outbox import SCHEMA_VERSION, LeaseCursor, Outbox, OutboxError
from gpuagent.usage import Unmeasured, UsageRecord, verify_record

KEY = Ed25519PrivateKey.generate()
S = 10**9


def draft(lease_id: str = "lease-1", index: int = 0, **changes: int) -> UsageRecord:
    start = 1_700_000_000 * S + index * 60 * S
    fields: dict[str, object] = {
        "node_id": "node-test",
        "seq": 0,
        "lease_id": lease_id,
        "start_unix_ns": start,
        "end_unix_ns": start + 60 * S,
        "duration_ns": 60 * S,
        "gpu_count": 1,
        "gpu_ns": 60 * S,
        "cpu_usec": 1000,
        "energy_mj": 5,
    }
    fields.update(changes)
    return UsageRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    box = Outbox(tmp_path / "outbox.sqlite3", alert_records=5)
    yield box  # type: ignore[misc]
    box.close()


def test_database_is_wal_with_full_sync(outbox: Outbox) -> None:
    """The durability settings the design relies on are in force on the file."""
    db = sqlite3.connect(outbox.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_append_assigns_consecutive_seqs_and_signs(outbox: Outbox) -> None:
    """Seqs start at 1 and rise by one per record; each stored signature verifies."""
    first = outbox.append_many([draft(index=0), draft(index=1)], KEY.sign)
    second = outbox.append_many([draft(index=2)], KEY.sign)
    assert [s.record.seq for s in first + second] == [1, 2, 3]
    pending = outbox.pending(100)
    assert [p.record.seq for p in pending] == [1, 2, 3]
    assert all(verify_record(p.record, p.signature, KEY.public_key()) for p in pending)
    assert pending == first + second


def test_seqs_are_never_reused_after_prune_or_reopen(tmp_path: Path) -> None:
    """After acking (and pruning) everything and reopening, numbering continues."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        box.append_many([draft(index=i) for i in range(3)], KEY.sign)
        assert box.ack(3) == 3
        assert box.pending(10) == []
    with Outbox(path) as box:
        [signed] = box.append_many([draft(index=3)], KEY.sign)
        assert signed.record.seq == 4
        assert box.stats().acked_seq == 3


def test_cursor_moves_in_the_same_transaction_as_the_records(outbox: Outbox) -> None:
    """A failure mid-append stores neither records nor the cursor move."""
    cursor = LeaseCursor("lease-1", 5 * S, 1_700_000_060 * S, {"cpu_usec": 10})
    calls = 0

    def flaky_sign(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("HSM went away")
        return KEY.sign(data)

    with pytest.raises(OSError, match="HSM"):
        outbox.append_many([draft(index=0), draft(index=1)], flaky_sign, [cursor])
    assert outbox.pending(10) == []
    assert outbox.cursor("lease-1") is None
    assert outbox.stats().last_seq == 0
    outbox.append_many([draft(index=0)], KEY.sign, [cursor])
    assert outbox.cursor("lease-1") == cursor
    assert outbox.pending(10)[0].record.seq == 1


def test_invalid_records_are_refused_before_storing(outbox: Outbox) -> None:
    """A record that fails validation (negative value) raises and stores nothing."""
    with pytest.raises(ValueError, match="cpu_usec"):
        outbox.append_many([draft(index=0), draft(index=1, cpu_usec=-1)], KEY.sign)
    assert outbox.stats().pending == 0


def test_ack_prunes_and_is_idempotent(outbox: Outbox) -> None:
    """Ack prunes up to the seq, never moves backwards, and repeats are harmless."""
    outbox.append_many([draft(index=i) for i in range(4)], KEY.sign)
    assert outbox.ack(2) == 2
    assert outbox.ack(2) == 0
    assert outbox.ack(1) == 0
    assert [p.record.seq for p in outbox.pending(10)] == [3, 4]
    assert outbox.stats().acked_seq == 2


def test_ack_beyond_last_seq_moves_numbering_past_it(outbox: Outbox) -> None:
    """If the coordinator already holds seqs we never assigned, new records skip them
    (otherwise it would take them for duplicates and drop them)."""
    outbox.append_many([draft(index=0)], KEY.sign)
    outbox.ack(10)
    [signed] = outbox.append_many([draft(index=1)], KEY.sign)
    assert signed.record.seq == 11


def test_pending_pages_in_seq_order(outbox: Outbox) -> None:
    """pending(limit, after_seq) walks the backlog in ascending batches."""
    outbox.append_many([draft(index=i) for i in range(7)], KEY.sign)
    first = outbox.pending(3)
    second = outbox.pending(3, after_seq=first[-1].record.seq)
    third = outbox.pending(3, after_seq=second[-1].record.seq)
    assert [p.record.seq for p in first + second + third] == list(range(1, 8))


def test_backlog_alert_raises_but_never_drops(outbox: Outbox) -> None:
    """Past the alert bound, appends still succeed and every record is kept."""
    outbox.append_many([draft(index=i) for i in range(5)], KEY.sign)
    assert not outbox.stats().backlog_alert
    outbox.append_many([draft(index=i) for i in range(5, 20)], KEY.sign)
    stats = outbox.stats()
    assert stats.backlog_alert
    assert stats.pending == 20
    assert len(outbox.pending(100)) == 20
    outbox.ack(18)
    assert not outbox.stats().backlog_alert


def test_stats_report_oldest_pending_age(tmp_path: Path) -> None:
    """The age of the oldest unacked record comes from when it was appended."""
    clock = iter([1_000 * S, 1_005 * S])
    with Outbox(tmp_path / "o.sqlite3", clock_wall_ns=lambda: next(clock)) as box:
        assert box.stats().oldest_pending_age_s() is None
        box.append_many([draft()], KEY.sign)
        box.append_many([draft(index=1)], KEY.sign)
        assert box.stats().oldest_pending_age_s(now_unix_ns=1_010 * S) == 10.0


def test_totals_survive_pruning(outbox: Outbox) -> None:
    """Per-lease totals count acked (pruned) records too, and split pending/acked."""
    outbox.append_many([draft(index=i) for i in range(3)], KEY.sign)
    outbox.append_many([draft("lease-2", index=0, cpu_usec=7)], KEY.sign)
    outbox.append_many([draft(index=3, final=True)], KEY.sign)  # type: ignore[arg-type]
    outbox.ack(2)
    by_lease = {t.lease_id: t for t in outbox.totals()}
    one = by_lease["lease-1"]
    assert (one.records, one.pending, one.acked) == (4, 2, 2)
    assert one.cpu_usec == 4000 and one.duration_ns == 240 * S and one.final
    assert one.first_start_unix_ns == 1_700_000_000 * S
    assert one.last_end_unix_ns == (1_700_000_000 + 240) * S
    assert by_lease["lease-2"].cpu_usec == 7 and not by_lease["lease-2"].final
    assert [t.lease_id for t in outbox.totals("lease-2")] == ["lease-2"]


def test_open_cursors_exclude_closed_leases(outbox: Outbox) -> None:
    """A restarted agent re-adopts only leases whose final record is not written."""
    outbox.append_many(
        [draft()],
        KEY.sign,
        [LeaseCursor("a", 1, 2, {}), LeaseCursor("b", 3, 4, {}, closed=True)],
    )
    assert [c.lease_id for c in outbox.open_cursors()] == ["a"]
    assert outbox.cursor("b") == LeaseCursor("b", 3, 4, {}, closed=True)


def test_concurrent_appends_from_threads_get_unique_seqs(outbox: Outbox) -> None:
    """Appends from several threads never share or skip a seq."""

    def worker(n: int) -> None:
        for i in range(20):
            outbox.append_many([draft(f"lease-{n}", index=i)], KEY.sign)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [p.record.seq for p in outbox.pending(1000)]
    assert seqs == list(range(1, 81))


def test_unusable_file_gives_a_clear_error(tmp_path: Path) -> None:
    """A file that is not a database is reported with its path, not a traceback."""
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match=r"o\.sqlite3: cannot open"):
        Outbox(path)


def test_schema_from_another_version_is_refused(tmp_path: Path) -> None:
    """An outbox written by an incompatible version is not silently reinterpreted."""
    path = tmp_path / "o.sqlite3"
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="schema 99"):
        Outbox(path)


def test_schema_1_outbox_is_upgraded_in_place(tmp_path: Path) -> None:
    """An outbox from before the totals kept unmeasured bits opens, keeps its
    totals, and records the bits from then on."""
    path = tmp_path / "o.sqlite3"
    first = UsageRecord(
        node_id="n", seq=0, lease_id="L", start_unix_ns=0, end_unix_ns=S, duration_ns=S,
        gpu_count=1, gpu_ns=S, net_rx_bytes=10,
    )  # fmt: skip
    with Outbox(path) as box:
        box.append_many([first], KEY.sign)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE lease_totals DROP COLUMN unmeasured")
    db.execute("UPDATE meta SET value = 1 WHERE key = 'schema'")
    db.commit()
    db.close()
    later = UsageRecord(
        node_id="n", seq=0, lease_id="L", start_unix_ns=S, end_unix_ns=2 * S, duration_ns=S,
        gpu_count=1, gpu_ns=S, unmeasured=int(Unmeasured.NETWORK),
    )  # fmt: skip
    with Outbox(path) as box:
        [totals] = box.totals()
        assert (totals.records, totals.net_rx_bytes, totals.unmeasured) == (1, 10, 0)
        box.append_many([later], KEY.sign)
        [totals] = box.totals()
        assert (totals.records, totals.unmeasured) == (2, int(Unmeasured.NETWORK))
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SCHEMA_VERSION,)
    db.close()
