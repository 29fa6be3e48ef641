"""Usage ingest: the coordinator's end of ``UsageReport`` -> ``UsageAck``.

Per record, in this order (PROTOCOL.md, "Usage ingest"):

1. rebuild the record with the session's node id and verify its Ed25519
   signature with the key the node registered. A record that does not verify
   is **not stored** and moves nothing: the session is authenticated, so a bad
   signature is corruption, a bug or an attack, and acknowledging it would let
   whoever produced it make the node prune records it never delivered. The
   node hears ``ProtocolError{BAD_SIGNATURE}`` and keeps the record;
2. a (node, seq) already stored is a duplicate: acknowledged, changed nothing
   (a different record under a used seq is logged as an error, first one wins);
3. an authentic record that cannot be billed (invalid fields, a lease the node
   does not hold, more GPUs than the lease, an interval overlapping one already
   billed, after the lease's final record or end) is stored as **rejected**
   with its reason: the node signed it, so it is evidence, and it counts for
   the contiguous ack so the agent stops re-sending what will never be accepted;
4. otherwise it is stored as accepted and its cost settled from the lease's
   escrow to the node, in the same transaction.

Then the node gets ``UsageAck`` with the highest contiguous seq stored (also
kept in ``nodes.acked_usage_seq`` for the next ``Welcome``).

The rules are per record, the work is per report (``store_records``): a constant
number of statements however many records a report carries, so that ingest on
PostgreSQL, where each statement is a round trip, keeps up (issue #18).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gpuagent.usage import (
    SignedUsageRecord,
    UsageRecord,
    UsageRecordError,
    canonical_bytes,
    validate_record,
    verify_record,
)
from gpuagent.usage_wire import record_from_pb
from gpuagent.v1 import common_pb2, coordinator_pb2, usage_pb2

from . import ledger
from .db import Database
from .leases_store import _COLUMNS as LEASE_COLUMNS
from .leases_store import LeaseRow
from .registry import Registry, Session
from .storage import Conn

log = logging.getLogger(__name__)

Clock = Callable[[], float]
I64_MAX = 2**63 - 1
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
# At most this many refusals are spelled out in one ProtocolError (all are logged).
_REASONS_IN_ERROR = 5


@dataclass
class IngestResult:
    acked_through_seq: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicting: int = 0
    charged_micros: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    forged: list[int] = field(default_factory=list)


# (stored, duplicates, rejected, forged) per report, e.g. for Prometheus counters.
CountsHook = Callable[[IngestResult], None]


def _static_refusal(record: UsageRecord, lease: LeaseRow | None) -> str:
    """Why a record cannot be billed whatever else is stored ("" if it may be)."""
    try:
        validate_record(record)
    except UsageRecordError as exc:
        return f"invalid: {exc}"
    for name in _COUNTERS:
        if getattr(record, name) > I64_MAX:
            return f"invalid: {name} {getattr(record, name)} exceeds the int64 range"
    if lease is None:
        return f"lease {record.lease_id!r} is unknown"
    if lease.node_id != record.node_id:
        where = f"it is on {lease.node_id}" if lease.node_id else "it is not placed"
        return f"lease {record.lease_id!r} is not held by this node ({where})"
    if record.gpu_count > lease.gpu_count:
        return f"gpu_count {record.gpu_count} exceeds the lease's {lease.gpu_count} GPUs"
    return ""


class _Intervals:
    """The accepted intervals of one lease that a report's records could overlap: the
    stored ones read up front, then the report's own as they are accepted.

    Kept sorted by (start, end). Accepted intervals never overlap one another (each
    was checked against the others), and then the ends are sorted too, so the first
    interval overlapping [start, end) is found by bisection: the first whose end is
    past ``start``, if it starts before ``end``. Should stored rows break that (a
    database edited by hand), every lookup scans the list instead.
    """

    def __init__(self, stored: list[tuple[int, int, tuple[int, int], int]]) -> None:
        # (start_ns, end_ns, order, seq); order: (0, rowid) stored, (1, n) this report's.
        self.items = sorted(stored)
        self.ends = [item[1] for item in self.items]
        self.sorted_ends = all(a <= b for a, b in itertools.pairwise(self.ends))
        self.added = 0

    def first_overlap(self, start: int, end: int) -> tuple[int, int, tuple[int, int], int] | None:
        """What the ``start_ns < end AND end_ns > start ORDER BY start_ns LIMIT 1`` query
        finds (ties by insertion order, as SQLite's index gives them)."""
        if not self.sorted_ends:
            hits = [item for item in self.items if item[0] < end and item[1] > start]
            return min(hits, key=lambda item: (item[0], item[2])) if hits else None
        i = bisect.bisect_right(self.ends, start)
        if i == len(self.items) or self.items[i][0] >= end:
            return None
        best = self.items[i]
        for item in self.items[i + 1 :]:
            if item[0] != best[0]:
                break
            if item[2] < best[2]:
                best = item
        return best

    def add(self, start: int, end: int, seq: int) -> None:
        self.added += 1
        item = (start, end, (1, self.added), seq)
        at = bisect.bisect_left(self.items, item)
        self.items.insert(at, item)
        self.ends.insert(at, end)


class _Billed:
    """What ``refusal`` asked of usage_records, for the leases of one report: per
    (lease, node) the accepted duration and the lowest accepted final seq, per lease
    the accepted intervals the report's records can overlap. Read in two queries,
    then kept up to date in memory as the report's records are accepted."""

    def __init__(self, conn: Conn, candidates: Sequence[UsageRecord]) -> None:
        self.duration: dict[tuple[str, str], int] = {}
        self.first_final: dict[tuple[str, str], int] = {}
        self.intervals: dict[str, _Intervals] = {}
        if not candidates:
            return
        leases = sorted({r.lease_id for r in candidates})
        nodes = sorted({r.node_id for r in candidates})
        for part in ledger.chunks(leases):
            for lease_id, node, duration, final in conn.execute(
                "SELECT lease_id, node_id, COALESCE(SUM(duration_ns), 0),"  # noqa: S608 - only ? marks
                " MIN(CASE WHEN final = 1 THEN seq END) FROM usage_records"
                f" WHERE status = 'accepted' AND lease_id IN ({ledger.marks(len(part))})"
                f" AND node_id IN ({ledger.marks(len(nodes))})"
                " GROUP BY lease_id, node_id",
                (*part, *nodes),
            ).fetchall():
                self.duration[(lease_id, node)] = int(duration)
                if final is not None:
                    self.first_final[(lease_id, node)] = int(final)
        # Stored intervals that can overlap any of the report's records: those within
        # the span of the lease's records in this report.
        spans: dict[str, tuple[int, int]] = {}
        for r in candidates:
            low, high = spans.get(r.lease_id, (r.start_unix_ns, r.end_unix_ns))
            spans[r.lease_id] = (min(low, r.start_unix_ns), max(high, r.end_unix_ns))
        stored: dict[str, list[tuple[int, int, tuple[int, int], int]]] = {k: [] for k in spans}
        for part in ledger.chunks(sorted(spans), ledger.IN_CHUNK // 3):
            where = " OR ".join("(lease_id = ? AND start_ns < ? AND end_ns > ?)" for _ in part)
            params: list[object] = []
            for lease_id in part:
                params += [lease_id, spans[lease_id][1], spans[lease_id][0]]
            for lease_id, rowid, seq, start, end in conn.execute(
                "SELECT lease_id, rowid, seq, start_ns, end_ns FROM usage_records"  # noqa: S608 - only ? marks
                f" WHERE status = 'accepted' AND ({where})",
                params,
            ).fetchall():
                stored[lease_id].append((int(start), int(end), (0, int(rowid)), int(seq)))
        self.intervals = {lease_id: _Intervals(rows) for lease_id, rows in stored.items()}

    def refusal(
        self, record: UsageRecord, lease: LeaseRow, policy: ledger.LedgerPolicy, now_ns: int
    ) -> str:
        """The checks against stored records, in ``refusal``'s order."""
        key = (record.lease_id, record.node_id)
        # Billing follows the node's monotonic clock, so "too much" is judged on durations
        # against this scheduler's own clock, never by comparing two machines' wall clocks:
        # a node whose wall clock stepped must still be billed exactly. The lease cannot
        # have run on the node before it was offered there, nor after its end was reported.
        if lease.placed_ns is not None:
            until = lease.ended_ns if lease.ended_ns is not None else now_ns
            window = until - lease.placed_ns + policy.clock_skew_allowance_ns
            billed = self.duration.get(key, 0)
            if billed + record.duration_ns > window:
                state = f"ended at {lease.ended_ns}" if lease.ended_ns else "still running"
                return (
                    f"bills {billed + record.duration_ns} ns in all, more than the {window} ns "
                    f"the lease can have run here (offered at {lease.placed_ns}, {state})"
                )
        final = self.first_final.get(key)
        if final is not None and final < record.seq:
            return f"follows the lease's final record seq {final}"
        overlap = self.intervals[record.lease_id].first_overlap(
            record.start_unix_ns, record.end_unix_ns
        )
        if overlap is not None:
            return (
                f"interval [{record.start_unix_ns}, {record.end_unix_ns}) overlaps seq "
                f"{overlap[3]} [{overlap[0]}, {overlap[1]}), already billed"
            )
        return ""

    def accept(self, node_id: str, record: UsageRecord) -> None:
        """The record is stored as accepted (under the session's ``node_id``)."""
        key = (record.lease_id, node_id)
        self.duration[key] = self.duration.get(key, 0) + min(record.duration_ns, I64_MAX)
        if record.final and record.seq < self.first_final.get(key, I64_MAX + 1):
            self.first_final[key] = record.seq
        self.intervals[record.lease_id].add(record.start_unix_ns, record.end_unix_ns, record.seq)


def _stored_canonical(conn: Conn, node_id: str, seqs: set[int]) -> dict[int, bytes]:
    """The canonical bytes of those of ``seqs`` the node has stored already."""
    found: dict[int, bytes] = {}
    for part in ledger.chunks(sorted(seqs)):
        for seq, body in conn.execute(
            "SELECT seq, canonical FROM usage_records"  # noqa: S608 - only ? marks
            f" WHERE node_id = ? AND seq IN ({ledger.marks(len(part))})",
            (node_id, *part),
        ).fetchall():
            found[int(seq)] = bytes(body)
    return found


def _leases(conn: Conn, lease_ids: set[str]) -> dict[str, LeaseRow]:
    """The lease rows (the store's reader, inside this transaction) of ``lease_ids``."""
    found: dict[str, LeaseRow] = {}
    for part in ledger.chunks(sorted(lease_ids)):
        for row in conn.execute(
            f"SELECT {LEASE_COLUMNS} FROM leases"  # noqa: S608 - constant columns
            f" WHERE lease_id IN ({ledger.marks(len(part))})",
            tuple(part),
        ).fetchall():
            lease = LeaseRow.from_db(row)
            found[lease.lease_id] = lease
    return found


# Seqs read per query while advancing the contiguous ack.
_ACK_PAGE = 1000


def contiguous_seq(conn: Conn, node_id: str) -> int:
    """Advance and store the node's highest seq with every seq up to it stored."""
    row = conn.execute("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
    acked = int(row[0]) if row else 0
    while True:
        seqs = conn.execute(
            "SELECT seq FROM usage_records WHERE node_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (node_id, acked, _ACK_PAGE),
        ).fetchall()
        for (seq,) in seqs:
            if seq != acked + 1:
                break
            acked = int(seq)
        else:
            if len(seqs) == _ACK_PAGE:
                continue  # the whole page was contiguous: there may be more
        break
    conn.execute("UPDATE nodes SET acked_usage_seq = ? WHERE node_id = ?", (acked, node_id))
    return acked


_INSERT = (
    "INSERT INTO usage_records (node_id, seq, lease_id, status, reason, start_ns, end_ns,"
    " duration_ns, gpu_count, gpu_ns, final, cost_micros, canonical, signature, received_ns)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def store_records(
    conn: Conn,
    node_id: str,
    records: Sequence[SignedUsageRecord],
    now_ns: int,
    policy: ledger.LedgerPolicy,
) -> IngestResult:
    """Store verified records (one transaction) and settle the accepted ones.

    Set-based: a constant number of statements per report, not per record. The rows
    the per-record rules look at (which seqs are stored, the leases, what each lease
    has billed, the ledger rows settlement changes) are read once, up front; the
    records are then judged and settled in report order against that copy, which
    each accepted record updates, so the outcome is the one record-at-a-time
    processing gives; and everything is written at the end, each table once
    (``executemany``). Nothing is kept between calls: a transaction retried after a
    serialization failure (PostgreSQL, storage.py) reads everything again.
    """
    result = IngestResult()
    in_range = [s for s in records if 1 <= s.record.seq <= I64_MAX]
    stored = _stored_canonical(conn, node_id, {s.record.seq for s in in_range})
    # The first copy of a seq not stored yet is stored; any later copy is its duplicate.
    fresh: dict[int, SignedUsageRecord] = {}
    for signed in in_range:
        if signed.record.seq not in stored:
            fresh.setdefault(signed.record.seq, signed)
    leases = _leases(conn, {s.record.lease_id for s in fresh.values()})
    static = {
        seq: _static_refusal(s.record, leases.get(s.record.lease_id)) for seq, s in fresh.items()
    }
    candidates = [s.record for seq, s in fresh.items() if not static[seq]]
    billed = _Billed(conn, candidates)
    batch = ledger.SettlementBatch(
        conn, now_ns, [leases[r.lease_id] for r in candidates], node_id=node_id
    )
    rows: list[tuple[object, ...]] = []
    for signed in records:
        record = signed.record
        if not 1 <= record.seq <= I64_MAX:
            # Outside what a node's counter can reach: never contiguous, nothing to keep.
            result.rejected.append((record.seq, f"invalid: seq {record.seq}"))
            continue
        body = canonical_bytes(record)
        existing = stored.get(record.seq)
        if existing is not None:
            result.duplicates += 1
            if existing != body:
                result.conflicting += 1
                log.error(
                    "node signed two different usage records with one seq; kept the first",
                    extra={"node_id": node_id, "seq": record.seq, "lease_id": record.lease_id},
                )
            continue
        assert fresh[record.seq] is signed
        stored[record.seq] = body
        lease = leases.get(record.lease_id)
        reason = static[record.seq]
        if not reason:
            assert lease is not None
            reason = billed.refusal(record, lease, policy, now_ns)
        cost = 0
        if reason:
            result.rejected.append((record.seq, reason))
        else:
            assert lease is not None
            billed.accept(node_id, record)
            result.stored += 1
            settlement = batch.settle(lease, node_id, record.gpu_ns, ref=f"{node_id}:{record.seq}")
            result.charged_micros += settlement.charged_micros
            cost = settlement.charged_micros
            if record.final:
                batch.final_record(record.lease_id)
        rows.append(
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
                cost,
                body,
                signed.signature,
                now_ns,
            )
        )
    if rows:
        conn.executemany(_INSERT, rows)
    batch.flush()
    result.acked_through_seq = contiguous_seq(conn, node_id)
    return result


def verify_all(
    node_id: str, public_key: bytes, records: Sequence[usage_pb2.UsageRecord]
) -> tuple[list[SignedUsageRecord], list[int]]:
    """(records whose signature verifies, seqs of those that do not). CPU-bound."""
    key = Ed25519PublicKey.from_public_bytes(public_key)
    good, forged = [], []
    for pb in records:
        signed = record_from_pb(node_id, pb)
        if verify_record(signed.record, signed.signature, key):
            good.append(signed)
        else:
            forged.append(pb.seq)
    return good, forged


class UsageIngest:
    """``coordinator.on("usage_report", ingest.handle)``."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        policy: ledger.LedgerPolicy,
        clock: Clock = time.time,
        on_counts: CountsHook | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.policy = policy
        self.clock = clock
        self.on_counts = on_counts

    async def ingest(self, node_id: str, report: usage_pb2.UsageReport) -> IngestResult:
        record = self.registry.nodes[node_id]
        good, forged = await asyncio.to_thread(
            verify_all, node_id, record.public_key, list(report.records)
        )
        now = round(self.clock() * 1e9)
        result = await self.db.call(
            lambda conn: store_records(conn, node_id, good, now, self.policy)
        )
        result.forged = forged
        record.acked_usage_seq = result.acked_through_seq
        if forged:
            log.error(
                "usage records with bad signatures: not stored, not acknowledged",
                extra={"node_id": node_id, "seqs": forged[:20], "count": len(forged)},
            )
        for seq, reason in result.rejected:
            log.warning(
                "usage record rejected: %s",
                reason,
                extra={"node_id": node_id, "seq": seq},
            )
        log.debug(
            "usage report stored",
            extra={
                "node_id": node_id,
                "stored": result.stored,
                "duplicates": result.duplicates,
                "rejected": len(result.rejected),
                "acked_through_seq": result.acked_through_seq,
                "charged_micros": result.charged_micros,
            },
        )
        if self.on_counts is not None:
            self.on_counts(result)
        return result

    async def handle(self, session: Session, report: usage_pb2.UsageReport) -> None:
        result = await self.ingest(session.node_id, report)
        Error = common_pb2.ProtocolError
        if result.forged:
            seqs = ", ".join(str(s) for s in result.forged[:_REASONS_IN_ERROR])
            more = len(result.forged) - _REASONS_IN_ERROR
            await session.send(
                coordinator_pb2.CoordinatorMessage(
                    error=Error(
                        code=Error.BAD_SIGNATURE,
                        message=f"usage records {seqs}{f' and {more} more' if more > 0 else ''} "
                        "do not verify with this node's key: not stored; kept unacknowledged",
                        in_reply_to="usage_report",
                    )
                )
            )
        if result.rejected:
            shown = "; ".join(f"seq {s}: {r}" for s, r in result.rejected[:_REASONS_IN_ERROR])
            more = len(result.rejected) - _REASONS_IN_ERROR
            await session.send(
                coordinator_pb2.CoordinatorMessage(
                    error=Error(
                        code=Error.REJECTED,
                        message=f"usage records refused for good (acknowledged, not billed): "
                        f"{shown}{f'; and {more} more' if more > 0 else ''}",
                        in_reply_to="usage_report",
                    )
                )
            )
        await session.send(
            coordinator_pb2.CoordinatorMessage(
                usage_ack=usage_pb2.UsageAck(
                    acked_through_seq=result.acked_through_seq, rejected=len(result.rejected)
                )
            )
        )
