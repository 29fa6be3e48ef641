"""Memory-bandwidth probe: a device-to-device copy, timed, beside the SKU's datasheet figure.

A second, independent axis of the fingerprint: a card can be fast at tensor math and
still not be the SKU it claims (an L40S has H100-class math on some shapes but a
quarter of the bandwidth).  The figure is self-reported in the commitment, so the
coordinator treats it as a consistency signal, not as proof.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpuagent.attest.skus import SkuSpec

from .backends import Backend

DEFAULT_PROBE_BYTES = 256 * 1024**2
DEFAULT_REPEATS = 10


@dataclass(frozen=True)
class BandwidthResult:
    bytes_per_second: float
    ratio_of_peak: float | None  # None when no SKU to compare with


def measure_bandwidth(
    backend: Backend,
    sku: SkuSpec | None = None,
    nbytes: int = DEFAULT_PROBE_BYTES,
    repeats: int = DEFAULT_REPEATS,
) -> BandwidthResult:
    if nbytes <= 0 or repeats <= 0:
        raise ValueError(f"probe size and repeats must be positive, got {nbytes} and {repeats}")
    rate = backend.copy_bandwidth(nbytes, repeats)
    ratio = rate / sku.memory_bandwidth_bytes_per_second if sku is not None else None
    return BandwidthResult(rate, ratio)
