"""VRAM proof-of-space: hold seed-derived blocks, answer hashes of randomly chosen ones.

The prover fills ``count`` blocks of ``block_bytes`` with generator output under the tag
``b"S"`` (block ``i`` = line ``i``); the verifier then names random block indices and
compares SHA-256 of each block with its own regeneration (cheap: one line per block).

Limits, stated plainly: the generator is cheap by design, so a prover short of memory
can regenerate a requested block instead of storing it.  The proof therefore binds only
together with a response deadline well under the regeneration time of the requested
blocks; it is one weak axis next to the matmul (whose A, B and C chunks must be
resident) and the NVML memory total.  A memory-hard fill (each block derived from the
previous one) would make regeneration expensive and is the natural next step.
This module holds the host (numpy) implementation used by the simulated backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from gpuagent.attest.generator import lines, matrix_key

SPACE_TAG = b"S"


def space_block(nonce: bytes, index: int, block_bytes: int) -> bytes:
    """Block ``index``: generator entries of line ``index`` offset to bytes 0..4."""
    entries = lines(matrix_key(nonce, SPACE_TAG), [index], 0, block_bytes)
    return (entries + np.int8(2)).astype(np.uint8).tobytes()


class SpaceFill:
    """The prover's filled memory (host arrays here; GPU backends would hold device arrays)."""

    def __init__(self, nonce: bytes, total_bytes: int, block_bytes: int = 1 << 20) -> None:
        if block_bytes <= 0 or block_bytes % 4 or total_bytes < block_bytes:
            raise ValueError("block_bytes must be a positive multiple of 4 and at most total_bytes")
        self.count = total_bytes // block_bytes
        self.block_bytes = block_bytes
        key = matrix_key(nonce, SPACE_TAG)
        self._blocks: NDArray[np.uint8] = np.empty((self.count, block_bytes), dtype=np.uint8)
        step = max(1, (64 << 20) // block_bytes)
        for lo in range(0, self.count, step):
            hi = min(self.count, lo + step)
            self._blocks[lo:hi] = (lines(key, np.arange(lo, hi), 0, block_bytes) + 2).astype(
                np.uint8
            )

    def answer(self, indices: Sequence[int]) -> list[bytes]:
        return [hashlib.sha256(self._blocks[i].tobytes()).digest() for i in indices]


def check_space(
    nonce: bytes, block_bytes: int, indices: Sequence[int], answers: Sequence[bytes]
) -> list[int]:
    """Indices whose answer is wrong (empty when the proof holds)."""
    if len(answers) != len(indices):
        return list(indices)
    return [
        i
        for i, got in zip(indices, answers, strict=True)
        if hashlib.sha256(space_block(nonce, i, block_bytes)).digest() != got
    ]
