"""The output archive's digest (gpuagent/outputs.py): one root however the bytes arrive."""

from __future__ import annotations

import io
import os

import pytest

from gpuagent.attest.merkle import MerkleTree, verify_proof
from gpuagent.outputs import (
    CHUNK_BYTES,
    EMPTY_ROOT,
    ArchiveDigest,
    archive_root,
    output_commitment_signing_bytes,
)


def test_root_is_the_same_for_any_feeding_and_changes_with_one_byte() -> None:
    data = bytearray(os.urandom(3 * 4096 + 17))
    root, size = archive_root(io.BytesIO(bytes(data)), chunk_bytes=4096)
    digest = ArchiveDigest(4096)
    for i in range(0, len(data), 1000):
        digest.update(bytes(data[i : i + 1000]))
    assert (digest.root(), digest.size) == (root, size) == (root, len(data))
    data[5000] ^= 1
    assert archive_root(io.BytesIO(bytes(data)), chunk_bytes=4096)[0] != root


def test_each_chunk_can_be_checked_against_the_root() -> None:
    data = os.urandom(5 * 4096 + 1)
    digest = ArchiveDigest(4096)
    digest.update(data)
    tree = MerkleTree(digest.leaves())
    assert tree.root == digest.root() and tree.leaf_count == 6
    chunk = data[2 * 4096 : 3 * 4096]
    assert verify_proof(tree.root, 6, 2, chunk, tree.proof(2))
    assert not verify_proof(tree.root, 6, 3, chunk, tree.proof(3))


def test_empty_archive_has_a_fixed_root_unlike_one_empty_chunk() -> None:
    assert archive_root(io.BytesIO(b""))[0] == EMPTY_ROOT
    assert archive_root(io.BytesIO(b"\x00"))[0] != EMPTY_ROOT
    assert ArchiveDigest().size == 0 and CHUNK_BYTES == 1 << 20


def test_signing_bytes_separate_every_field() -> None:
    root = bytes(32)
    base = output_commitment_signing_bytes("lease-a", "node-b", root, 10, CHUNK_BYTES)
    assert base != output_commitment_signing_bytes("lease-an", "ode-b", root, 10, CHUNK_BYTES)
    assert base != output_commitment_signing_bytes("lease-a", "node-b", root, 11, CHUNK_BYTES)
    with pytest.raises(ValueError, match="32 bytes"):
        output_commitment_signing_bytes("lease-a", "node-b", b"short", 10, CHUNK_BYTES)
