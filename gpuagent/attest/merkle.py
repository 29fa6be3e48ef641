"""SHA-256 Merkle tree over the rows of C.

Leaf ``i`` = SHA-256(0x00 || uint32_be(i) || row bytes); inner node = SHA-256(0x01 || left ||
right).  The prefixes keep leaves and inner nodes apart (second-preimage attacks on
the tree shape) and the index in the leaf stops a row from being opened at another
position.  A level with an odd count promotes its last node unchanged rather than
duplicating it, so no two leaf lists share a root.  Proofs list siblings leaf to root,
skipping levels where the node was promoted; the verifier needs the leaf count to know
where that happened.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # numpy stays out of the import graph of the tree itself: output commitments
    # (gpuagent/outputs.py) hash file chunks with it, and the agent and the client CLI
    # must start without numpy (only the attestation prover and verifier need it).
    import numpy as np
    from numpy.typing import NDArray

HASH_BYTES = 32
# hashlib drops the GIL for inputs over 2 KiB, so leaf hashing scales across threads.
_HASH_THREADS = 8


def leaf_hash(index: int, row_bytes: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + struct.pack(">I", index) + row_bytes).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def row_bytes(row: NDArray[np.int32]) -> bytes:
    """Canonical encoding of one row of C: little-endian int32 (entries are exact integers)."""
    import numpy as np

    return np.ascontiguousarray(row, dtype="<i4").tobytes()


class MerkleTree:
    """All levels kept, so any row can be opened later in O(log n)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            above = [_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            if len(below) % 2:
                above.append(below[-1])
            self.levels.append(above)

    @classmethod
    def from_rows(cls, matrix: NDArray[np.int32]) -> MerkleTree:
        def hash_range(bounds: tuple[int, int]) -> list[bytes]:
            return [leaf_hash(i, row_bytes(matrix[i])) for i in range(*bounds)]

        rows = matrix.shape[0]
        step = max(1, -(-rows // (_HASH_THREADS * 4)))
        chunks = [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            leaves = [h for part in pool.map(hash_range, chunks) for h in part]
        return cls(leaves)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def leaf_count(self) -> int:
        return len(self.levels[0])

    def proof(self, index: int) -> tuple[bytes, ...]:
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"leaf {index} out of range 0..{self.leaf_count - 1}")
        siblings: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                siblings.append(level[sibling])
            index //= 2
        return tuple(siblings)


def verify_proof(
    root: bytes, leaf_count: int, index: int, row: bytes, proof: Sequence[bytes]
) -> bool:
    """True when ``row`` is leaf ``index`` of the tree with this root and leaf count."""
    if not 0 <= index < leaf_count:
        return False
    node = leaf_hash(index, row)
    width = leaf_count
    remaining = list(proof)
    while width > 1:
        sibling = index ^ 1
        if sibling < width:
            if not remaining or len(remaining[0]) != HASH_BYTES:
                return False
            other = remaining.pop(0)
            node = _node(node, other) if index % 2 == 0 else _node(other, node)
        index //= 2
        width = (width + 1) // 2
    return not remaining and node == root
