"""Attestation verdicts: the record kept per GPU per challenge, and its table.

Every verdict is stored with its figures (append-only: the history is the audit
trail); placement reads only the latest per GPU, which is also kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpuagent.v1 import nodes_pb2

from .db import Database
from .storage import Conn


@dataclass(frozen=True)
class AttestationRecord:
    node_id: str
    gpu_uuid: str
    challenge_id: str  # empty when judged without a challenge (unknown_sku, simulated)
    sku: str
    passed: bool
    reason: str  # "ok" or the reject reason
    message: str
    measured_tflops: float
    elapsed_ns: int  # challenge sent -> commit received, coordinator clock; 0 if none
    created_ns: int
    expires_ns: int  # a passed verdict counts until then

    def valid(self, now_ns: int) -> bool:
        return self.passed and now_ns < self.expires_ns

    def to_proto(self) -> nodes_pb2.GpuAttestation:
        return nodes_pb2.GpuAttestation(
            gpu_uuid=self.gpu_uuid,
            challenge_id=self.challenge_id,
            sku=self.sku,
            passed=self.passed,
            reason=self.reason,
            message=self.message,
            measured_tflops=self.measured_tflops,
            elapsed_ns=self.elapsed_ns,
            attested_at_unix_nanos=self.created_ns,
            expires_at_unix_nanos=self.expires_ns,
        )


_COLUMNS = (
    "node_id, gpu_uuid, challenge_id, sku, passed, reason, message, measured_tflops,"
    " elapsed_ns, created_ns, expires_ns"
)


def _record(row: tuple[object, ...]) -> AttestationRecord:
    return AttestationRecord(
        node_id=str(row[0]),
        gpu_uuid=str(row[1]),
        challenge_id=str(row[2]),
        sku=str(row[3]),
        passed=bool(row[4]),
        reason=str(row[5]),
        message=str(row[6]),
        measured_tflops=float(row[7]),  # type: ignore[arg-type]
        elapsed_ns=int(row[8]),  # type: ignore[call-overload]
        created_ns=int(row[9]),  # type: ignore[call-overload]
        expires_ns=int(row[10]),  # type: ignore[call-overload]
    )


async def insert(db: Database, record: AttestationRecord) -> None:
    def write(conn: Conn) -> None:
        conn.execute(
            f"INSERT INTO attestations ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant column list
            (
                record.node_id,
                record.gpu_uuid,
                record.challenge_id,
                record.sku,
                int(record.passed),
                record.reason,
                record.message,
                record.measured_tflops,
                record.elapsed_ns,
                record.created_ns,
                record.expires_ns,
            ),
        )

    await db.call(write)


async def latest(db: Database) -> list[AttestationRecord]:
    """The newest record per (node, GPU)."""

    def read(conn: Conn) -> list[AttestationRecord]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM attestations AS a WHERE id = ("  # noqa: S608 - constant
            " SELECT b.id FROM attestations AS b WHERE b.node_id = a.node_id"
            " AND b.gpu_uuid = a.gpu_uuid ORDER BY b.created_ns DESC, b.id DESC LIMIT 1)"
        ).fetchall()
        return [_record(r) for r in rows]

    return await db.call(read)


async def history(db: Database, node_id: str, limit: int = 100) -> list[AttestationRecord]:
    """A node's records, newest first."""

    def read(conn: Conn) -> list[AttestationRecord]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM attestations WHERE node_id = ?"  # noqa: S608 - constant
            " ORDER BY created_ns DESC, id DESC LIMIT ?",
            (node_id, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    return await db.call(read)
