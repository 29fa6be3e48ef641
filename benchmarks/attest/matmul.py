"""The attestation matmul as a benchmark: run it on a backend and rate it against a SKU."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gpuagent.attest.generator import expected_entries
from gpuagent.attest.skus import SkuSpec, matmul_flops

from .backends import Backend


@dataclass(frozen=True)
class MatmulResult:
    n: int
    inner: int
    dtype: str
    seconds: float
    tflops: float
    ratio_of_peak: float | None
    exact: bool  # spot-checked against the CPU reference generator


def run_matmul(
    backend: Backend,
    n: int,
    inner: int,
    dtype: str = "fp16",
    sku: SkuSpec | None = None,
    nonce: bytes | None = None,
    spot_checks: int = 16,
) -> tuple[MatmulResult, NDArray[np.int32]]:
    """Compute C once and check a few entries exactly against the reference generator."""
    nonce = secrets.token_bytes(32) if nonce is None else nonce
    c, seconds = backend.matmul(nonce, n, inner, dtype)
    picks = np.linspace(0, n - 1, num=min(spot_checks, n), dtype=np.int64)
    want = expected_entries(nonce, inner, picks.tolist(), picks.tolist())
    exact = bool(np.array_equal(c[np.ix_(picks, picks)], want))
    tflops = matmul_flops(n, inner) / max(seconds, 1e-12) / 1e12
    ratio = tflops * 1e12 / sku.peak_flops(dtype) if sku is not None else None
    return MatmulResult(n, inner, dtype, seconds, tflops, ratio, exact), c
