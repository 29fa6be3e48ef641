"""The seeded matrix generator shared by prover and verifier.

Exact specification (a third party can reimplement it from this docstring):

* ``matrix_key(nonce, tag)``:
  ``d = SHA-256(b"gpuagent.attest.v1" || 0x00 || tag || 0x00 || nonce)``;
  the key is three little-endian uint32 words ``k0, k1, k2 = d[0:4], d[4:8], d[8:12]``.
  ``tag`` is ``b"A"`` for the left matrix and ``b"B"`` for the right one.
* ``mix32`` is Wellons' *lowbias32* bijection on uint32, all arithmetic mod 2**32::

      x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16

* Line ``i`` of a matrix has per-line keys ``s = mix32(mix32(i ^ k0) ^ k1)`` and
  ``u = mix32(s ^ k2)``; its word ``w`` is ``mix32(mix32(w ^ s) ^ u)``.  Two rounds keep
  lines from being XOR-shifted copies of each other (a single round would let
  ``w ^ s_i == w' ^ s_j`` make words of different lines coincide).
* Entry ``t`` of line ``i`` is byte ``t % 4`` (little-endian) of word ``t // 4``, mapped
  to ``((byte * 5) >> 8) - 2`` in ``{-2, -1, 0, 1, 2}`` (0 is drawn 52/256 of the time,
  the others 51/256: the bias is irrelevant, entries need to be unpredictable, not uniform).
* ``A`` (n x K) has line ``i`` = row ``i``; ``B`` (K x n) has line ``j`` = **column** ``j``,
  so any entry ``C[i, j] = A[i, :] . B[:, j]`` costs the verifier two lines (2K entries).

Counter-based generation means any block of any line can be produced independently,
which is what lets a GPU generate K-chunks on the device and the verifier regenerate
single lines.  The generic path below uses only ``^ >> << & * +`` on int64 arrays with
products kept below 2**48, so the same code runs unchanged on numpy, torch and CuPy
(torch has no usable uint32 arithmetic, and int64 products of two 32-bit values overflow).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

DOMAIN = b"gpuagent.attest.v1"
ENTRY_MIN = -2
ENTRY_MAX = 2
# Exactness bound: |C[i, j]| <= K * max|a| * max|b| = 4K, and every partial sum is
# bounded the same way; fp32 represents every integer up to 2**24 exactly, so with
# K <= 2**22 each fp32 accumulation step is exact whatever the summation order.
MAX_INNER = 2**24 // (max(abs(ENTRY_MIN), ENTRY_MAX) ** 2)
ENTRIES_PER_WORD = 4
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF
_VERIFY_CHUNK = 1 << 18
_BYTE_TO_ENTRY = ((np.arange(256, dtype=np.int16) * 5 >> 8) - 2).astype(np.int8)


@dataclass(frozen=True)
class MatrixKey:
    """The three key words of one matrix of one challenge."""

    k0: int
    k1: int
    k2: int


def matrix_key(nonce: bytes, tag: bytes) -> MatrixKey:
    """Key of matrix ``tag`` (``b"A"`` or ``b"B"``) for a challenge nonce."""
    digest = hashlib.sha256(DOMAIN + b"\x00" + tag + b"\x00" + nonce).digest()
    k0, k1, k2 = struct.unpack("<III", digest[:12])
    return MatrixKey(k0, k1, k2)


def check_inner(inner: int) -> None:
    """Reject inner sizes for which exactness or the word layout does not hold."""
    if inner <= 0 or inner % ENTRIES_PER_WORD:
        raise ValueError(f"inner size must be a positive multiple of 4, got {inner}")
    if inner > MAX_INNER:
        raise ValueError(
            f"inner size {inner} exceeds {MAX_INNER}: fp32 accumulation would no longer be exact"
        )


# --- numpy fast path (native uint32 wraparound) -------------------------------------


def _mix32_u32(x: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """mix32 in place on a fresh array: in the verifier's hot loop, temporaries cost most."""
    tmp = np.empty_like(x)
    for shift, mult in ((16, _M1), (15, _M2)):
        np.right_shift(x, np.uint32(shift), out=tmp)
        x ^= tmp
        x *= np.uint32(mult)
    np.right_shift(x, np.uint32(16), out=tmp)
    x ^= tmp
    return x


def lines(
    key: MatrixKey, line_indices: Sequence[int] | NDArray[Any], start: int, length: int
) -> NDArray[np.int8]:
    """Entries ``[start, start + length)`` of the given lines, shape (lines, length), int8.

    ``start`` and ``length`` must be multiples of 4 (whole words).
    """
    if start % ENTRIES_PER_WORD or length % ENTRIES_PER_WORD or start < 0 or length < 0:
        raise ValueError(f"start {start} and length {length} must be non-negative multiples of 4")
    idx = np.asarray(line_indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() > _MASK32):
        raise ValueError("line indices must fit in uint32")
    with np.errstate(over="ignore"):
        i = idx.astype(np.uint32)
        s = _mix32_u32(_mix32_u32(i ^ np.uint32(key.k0)) ^ np.uint32(key.k1))
        u = _mix32_u32(s ^ np.uint32(key.k2))
        w = np.arange(start // 4, (start + length) // 4, dtype=np.uint32)
        words = _mix32_u32(_mix32_u32(w[None, :] ^ s[:, None]) ^ u[:, None])
    raw = words.astype("<u4", copy=False).view(np.uint8).reshape(len(idx), length)
    # ((b * 5) >> 8) - 2 via a 256-entry table: one gather instead of four array passes.
    return _BYTE_TO_ENTRY[raw]


# --- generic path: int64 arrays of any array library ----------------------------------


def _mul32(x: Any, c: int) -> Any:
    # x * c mod 2**32 with every intermediate below 2**48, so int64 never overflows.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32_int64(x: Any) -> Any:
    """``mix32`` on int64 arrays holding uint32 values (numpy, torch or CuPy)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def lines_generic(
    key: MatrixKey,
    line_indices: Any,
    word_indices: Any,
    stack_last: Callable[[list[Any]], Any],
) -> Any:
    """Same entries as :func:`lines`, as int64 in -2..2, for int64 index arrays of any library.

    ``line_indices`` has shape (L,), ``word_indices`` shape (W,); the result has shape
    (L, 4W).  ``stack_last`` stacks a list of equally shaped arrays along a new last axis.
    """
    s = mix32_int64(mix32_int64(line_indices ^ key.k0) ^ key.k1)
    u = mix32_int64(s ^ key.k2)
    words = mix32_int64(mix32_int64(word_indices[None, :] ^ s[:, None]) ^ u[:, None])
    parts = [(((words >> (8 * j)) & 0xFF) * 5 >> 8) - 2 for j in range(ENTRIES_PER_WORD)]
    stacked = stack_last(parts)
    return stacked.reshape(stacked.shape[0], -1)


def expected_entries(
    nonce: bytes, inner: int, rows: Sequence[int], cols: Sequence[int]
) -> NDArray[np.int64]:
    """``C[rows][:, cols]`` recomputed from the seed: cost (len(rows) + len(cols)) * inner.

    Chunked over K so memory stays bounded for GPU-sized inner dimensions, and computed
    with float32 BLAS, exact for the same reason the prover's fp32 accumulation is.
    """
    check_inner(inner)
    key_a, key_b = matrix_key(nonce, b"A"), matrix_key(nonce, b"B")
    out = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for start in range(0, inner, _VERIFY_CHUNK):
        length = min(_VERIFY_CHUNK, inner - start)
        a = lines(key_a, rows, start, length).astype(np.float32)
        b = lines(key_b, cols, start, length).astype(np.float32)
        out += (a @ b.T).astype(np.int64)
    return out
