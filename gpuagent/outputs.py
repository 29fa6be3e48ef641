"""What a lease's output archive commits to: the digest both the agent and the buyer compute.

The digest is a Merkle root over fixed-size chunks of the archive (the attestation
tree's hashing: leaves and inner nodes domain-separated, an odd node promoted), so
a buyer can check each chunk of a resumed download against a proof as well as the
whole file against the root. The node signs ``output_commitment_signing_bytes``;
the coordinator stores the commitment and the CLI verifies the bytes it fetched.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO

from gpuagent.attest.merkle import HASH_BYTES, MerkleTree, leaf_hash

# 1 MiB leaves: a 100 GiB archive is ~100k leaves (3.2 MB of hashes), and a resumed
# download rechecks at most one chunk.
CHUNK_BYTES = 1 << 20
OUTPUT_COMMITMENT_DOMAIN = b"gpuagent.v1.output-commitment\x00"
# The tunnel "port" that carries a lease's output archive (relay ``/_outputs/<lease>``
# -> agent): no declared port can have this name (leaserules allows [a-z0-9-] only).
OUTPUTS_STREAM = "@outputs"
# The root of an empty archive (no leaves): SHA-256 of the domain tag, so it is
# well defined and never equal to a real tree's root.
EMPTY_ROOT = hashlib.sha256(OUTPUT_COMMITMENT_DOMAIN + b"empty").digest()


class ArchiveDigest:
    """Streaming Merkle root over ``CHUNK_BYTES`` chunks: feed bytes in any pieces."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self._leaves: list[bytes] = []
        self._pending = bytearray()

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._pending += data
        while len(self._pending) >= self.chunk_bytes:
            chunk = bytes(self._pending[: self.chunk_bytes])
            del self._pending[: self.chunk_bytes]
            self._leaves.append(leaf_hash(len(self._leaves), chunk))

    def leaves(self) -> list[bytes]:
        """Every leaf hash, the last partial chunk included (call after the last update)."""
        leaves = list(self._leaves)
        if self._pending:
            leaves.append(leaf_hash(len(leaves), bytes(self._pending)))
        return leaves

    def root(self) -> bytes:
        leaves = self.leaves()
        return MerkleTree(leaves).root if leaves else EMPTY_ROOT


def archive_root(stream: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> tuple[bytes, int]:
    """(Merkle root, size) of everything readable from ``stream``."""
    digest = ArchiveDigest(chunk_bytes)
    while block := stream.read(chunk_bytes):
        digest.update(block)
    return digest.root(), digest.size


def file_root(path: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[bytes, int]:
    with path.open("rb") as stream:
        return archive_root(stream, chunk_bytes)


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def output_commitment_signing_bytes(
    lease_id: str, node_id: str, digest: bytes, size: int, chunk_bytes: int
) -> bytes:
    """What the node signs for a lease's outputs: tag || lease, node, digest, size, chunk."""
    if len(digest) != HASH_BYTES:
        raise ValueError(f"output digest must be {HASH_BYTES} bytes, got {len(digest)}")
    return (
        OUTPUT_COMMITMENT_DOMAIN
        + b"".join(_field(part) for part in (lease_id.encode(), node_id.encode(), digest))
        + struct.pack(">QI", size, chunk_bytes)
    )
