"""Lease outputs at the coordinator: the node's signed commitment, checked and kept.

A lease that declared ``outputs`` ends with a LeaseUpdate carrying an
OutputCommitment (PROTOCOL.md "Lease outputs"). ``check`` holds it against the
node's registered key and the lease it arrived for; one that fails is refused (the
dispatcher logs it, tells the agent with a ProtocolError and stores the rest of the
update without it). A good one is stored once per lease (``store``, inside the
update's transaction) and is what ``get_commitment`` returns: what ``lease show``
prints, what the buyer's CLI checks fetched bytes against, what redundant runs compare.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpuagent.attest.merkle import HASH_BYTES
from gpuagent.outputs import CHUNK_BYTES, output_commitment_signing_bytes
from gpuagent.signing import verify_ed25519
from gpuagent.v1 import leases_pb2

from .db import Database
from .storage import Conn


class BadCommitment(ValueError):
    """An OutputCommitment the coordinator will not store; the message says why."""


def check(
    commitment: leases_pb2.OutputCommitment, *, lease_id: str, node_id: str, public_key: bytes
) -> None:
    """Raise BadCommitment unless ``commitment`` is ``node_id``'s signed word on ``lease_id``."""
    if commitment.lease_id != lease_id:
        raise BadCommitment(
            f"outputs.lease_id {commitment.lease_id[:140]!r} is not the update's lease {lease_id!r}"
        )
    if commitment.node_id != node_id:
        raise BadCommitment(
            f"outputs.node_id {commitment.node_id[:140]!r} is not the sending node {node_id!r}"
        )
    if len(commitment.digest) != HASH_BYTES:
        raise BadCommitment(f"outputs.digest must be {HASH_BYTES} bytes")
    # One leaf size for everyone: the buyer's CLI and the replicas compare roots over it.
    if commitment.chunk_bytes != CHUNK_BYTES:
        raise BadCommitment(f"outputs.chunk_bytes must be {CHUNK_BYTES}")
    message = output_commitment_signing_bytes(
        commitment.lease_id,
        commitment.node_id,
        commitment.digest,
        commitment.size,
        commitment.chunk_bytes,
    )
    if not verify_ed25519(public_key, commitment.signature, message):
        raise BadCommitment("outputs.signature does not verify against the node's key")


def store(conn: Conn, commitment: leases_pb2.OutputCommitment, now_ns: int) -> bool:
    """Keep a checked commitment (inside the caller's transaction); False: one was kept."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO lease_outputs"
        " (lease_id, node_id, digest, size, commitment, stored_ns) VALUES (?, ?, ?, ?, ?, ?)",
        (
            commitment.lease_id,
            commitment.node_id,
            commitment.digest,
            commitment.size,
            commitment.SerializeToString(),
            now_ns,
        ),
    )
    return cursor.rowcount == 1


def read(conn: Conn, lease_ids: Sequence[str]) -> dict[str, leases_pb2.OutputCommitment]:
    """The stored commitments of ``lease_ids`` (those that have one)."""
    found: dict[str, leases_pb2.OutputCommitment] = {}
    ids = list(dict.fromkeys(lease_ids))
    for start in range(0, len(ids), 500):
        batch = ids[start : start + 500]
        marks = ", ".join("?" for _ in batch)
        rows = conn.execute(
            f"SELECT lease_id, commitment FROM lease_outputs WHERE lease_id IN ({marks})",  # noqa: S608 - placeholders only
            batch,
        ).fetchall()
        for lease_id, blob in rows:
            commitment = leases_pb2.OutputCommitment()
            commitment.ParseFromString(bytes(blob))
            found[str(lease_id)] = commitment
    return found


async def get_commitment(db: Database, lease_id: str) -> leases_pb2.OutputCommitment | None:
    """The node's verified commitment for ``lease_id``, or None (none reported yet)."""
    return (await db.call(lambda conn: read(conn, [lease_id]))).get(lease_id)


async def get_commitments(
    db: Database, lease_ids: Sequence[str]
) -> dict[str, leases_pb2.OutputCommitment]:
    if not lease_ids:
        return {}
    return await db.call(lambda conn: read(conn, lease_ids))
