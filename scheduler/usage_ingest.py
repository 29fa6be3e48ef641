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
"""

from __future__ import annotations

import asyncio
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
from .leases_store import LeaseRow, LeaseStore
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


def refusal(
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


def contiguous_seq(conn: Conn, node_id: str) -> int:
    """Advance and store the node's highest seq with every seq up to it stored."""
    row = conn.execute("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
    acked = int(row[0]) if row else 0
    while conn.execute(
        "SELECT 1 FROM usage_records WHERE node_id = ? AND seq = ?", (node_id, acked + 1)
    ).fetchone():
        acked += 1
    conn.execute("UPDATE nodes SET acked_usage_seq = ? WHERE node_id = ?", (acked, node_id))
    return acked


def store_records(
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
        reason, lease = refusal(conn, record, policy, now_ns)
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
