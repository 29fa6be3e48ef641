"""Merkle commitment over C's rows: every row opens, nothing else does."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuagent.attest.merkle import MerkleTree, row_bytes, verify_proof


def _matrix(rows: int) -> np.ndarray:
    return np.arange(rows * 3, dtype=np.int32).reshape(rows, 3) - 5


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70))
def test_every_row_opens_against_the_root(rows: int) -> None:
    """For any row count (odd levels included) each row's proof verifies."""
    m = _matrix(rows)
    tree = MerkleTree.from_rows(m)
    for i in range(rows):
        assert verify_proof(tree.root, rows, i, row_bytes(m[i]), tree.proof(i))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 40), data=st.data())
def test_a_row_cannot_be_opened_at_another_index_or_altered(rows: int, data: st.DataObject) -> None:
    """Swapping rows or changing one entry fails (n itself comes from the challenge)."""
    m = _matrix(rows)
    tree = MerkleTree.from_rows(m)
    i = data.draw(st.integers(0, rows - 1))
    j = data.draw(st.integers(0, rows - 1).filter(lambda x: x != i))
    proof = tree.proof(i)
    assert not verify_proof(tree.root, rows, i, row_bytes(m[j]), proof)
    assert not verify_proof(tree.root, rows, j, row_bytes(m[i]), proof)
    altered = m[i].copy()
    altered[0] += 1
    assert not verify_proof(tree.root, rows, i, row_bytes(altered), proof)


def test_truncated_or_padded_proofs_fail() -> None:
    """A proof with a sibling missing or an extra one appended is rejected."""
    m = _matrix(9)
    tree = MerkleTree.from_rows(m)
    proof = tree.proof(4)
    assert not verify_proof(tree.root, 9, 4, row_bytes(m[4]), proof[:-1])
    assert not verify_proof(tree.root, 9, 4, row_bytes(m[4]), (*proof, b"\x00" * 32))
    assert not verify_proof(tree.root, 9, 9, row_bytes(m[4]), proof)


def test_rows_are_encoded_as_little_endian_int32() -> None:
    """The canonical row encoding is fixed so every prover hashes the same bytes."""
    assert row_bytes(np.array([1, -1], dtype=np.int32)) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
