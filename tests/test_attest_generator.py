"""The seeded generator: reproducible, specified, exact, identical on every backend path."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.attest.backends import BackendError, NumpyBackend, get_backend
from gpuagent.attest.generator import (
    MAX_INNER,
    check_inner,
    expected_entries,
    lines,
    lines_generic,
    matrix_key,
    mix32_int64,
)

ZERO_NONCE = bytes(32)


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.stack(parts, axis=-1)


def test_pinned_test_vector() -> None:
    """Entries for the all-zero nonce never change: reimplementations check against these."""
    assert lines(matrix_key(ZERO_NONCE, b"A"), [0], 0, 16).tolist() == [
        [-2, -1, 2, 2, 1, 2, -1, 1, -1, 2, -2, -2, -2, -1, -1, 0]
    ]
    digest = hashlib.sha256(lines(matrix_key(ZERO_NONCE, b"B"), range(8), 0, 256).tobytes())
    assert digest.hexdigest()[:16] == PINNED_B_DIGEST


PINNED_B_DIGEST = "a254024f122c9ddc"


def test_mix32_matches_the_specification() -> None:
    """mix32 on int64 is Wellons' lowbias32 computed with plain Python integers mod 2**32."""

    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    got = mix32_int64(np.array(values, dtype=np.int64)).tolist()
    assert got == [reference(v) for v in values]


@settings(max_examples=40, deadline=None)
@given(
    nonce=st.binary(min_size=32, max_size=32),
    rows=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
    start_words=st.integers(0, 10_000),
    words=st.integers(1, 16),
)
def test_generic_int64_path_equals_numpy_fast_path(
    nonce: bytes, rows: list[int], start_words: int, words: int
) -> None:
    """The int64 code torch and CuPy run produces exactly the numpy uint32 entries."""
    key = matrix_key(nonce, b"A")
    fast = lines(key, rows, 4 * start_words, 4 * words)
    generic = lines_generic(
        key,
        np.array(rows, dtype=np.int64),
        np.arange(start_words, start_words + words, dtype=np.int64),
        _stack,
    )
    assert np.array_equal(fast, generic)


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, 64), length=st.integers(0, 64))
def test_any_block_of_a_line_is_a_slice_of_the_whole_line(start: int, length: int) -> None:
    """Counter-based generation: K-chunks on a GPU join up to the line the verifier regenerates."""
    key = matrix_key(b"n" * 32, b"B")
    whole = lines(key, [3, 9], 0, 512)
    part = lines(key, [3, 9], 4 * start, 4 * length)
    assert np.array_equal(part, whole[:, 4 * start : 4 * (start + length)])


def test_entries_are_small_and_all_values_occur() -> None:
    """Entries lie in -2..2 and each value appears with roughly equal frequency."""
    e = lines(matrix_key(ZERO_NONCE, b"A"), range(64), 0, 4096)
    counts = np.bincount(e.ravel() + 2, minlength=5)
    assert e.min() == -2 and e.max() == 2
    assert counts.min() / counts.max() > 0.95


def test_nonce_and_matrix_tag_change_the_matrix() -> None:
    """A different nonce or the other matrix gives unrelated entries (about 1/5 agree by chance)."""
    a = lines(matrix_key(ZERO_NONCE, b"A"), range(16), 0, 1024)
    assert (a == lines(matrix_key(b"\x01" + bytes(31), b"A"), range(16), 0, 1024)).mean() < 0.3
    assert (a == lines(matrix_key(ZERO_NONCE, b"B"), range(16), 0, 1024)).mean() < 0.3


def test_expected_entries_equal_the_full_product() -> None:
    """The verifier's per-entry recomputation equals the backend's full C."""
    c, _ = NumpyBackend().matmul(ZERO_NONCE, 40, 128, "fp16")
    rows, cols = [0, 7, 39], [1, 2, 38]
    assert np.array_equal(expected_entries(ZERO_NONCE, 128, rows, cols), c[np.ix_(rows, cols)])


def test_fp32_accumulation_is_exact_at_the_bound() -> None:
    """At the largest allowed inner size, an all-(-2)x(-2) sum is 2**24: still exact in fp32."""
    assert MAX_INNER * 4 == 2**24
    assert float(np.float32(2**24)) == 2**24
    assert float(np.float32(2**24 + 1)) != 2**24 + 1  # one past the bound would round
    check_inner(MAX_INNER)
    with pytest.raises(ValueError, match="no longer be exact"):
        check_inner(MAX_INNER + 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        check_inner(6)


def test_auto_backend_falls_back_to_numpy_and_named_gpu_backends_explain() -> None:
    """Without torch/CuPy, auto gives numpy; naming a missing GPU backend says why not."""
    assert get_backend("auto").simulated
    for name in ("torch", "cupy"):
        try:
            backend = get_backend(name)
        except BackendError as exc:
            assert name in str(exc) or "CUDA" in str(exc)
        else:  # a machine with a GPU stack: it must agree with the CPU reference
            c, _ = backend.matmul(ZERO_NONCE, 64, 4096, "fp16")
            ref, _ = NumpyBackend().matmul(ZERO_NONCE, 64, 4096, "fp16")
            assert np.array_equal(c, ref)
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("opencl")
