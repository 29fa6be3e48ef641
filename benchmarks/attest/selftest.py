"""Local self-test: run the whole protocol against a local verifier and rate the figures.

Used by ``python -m benchmarks attest`` and ``gpu-agent attest``.  The protocol round trip
runs with the timing band relaxed (so a CPU run still shows that commitment, reveal and
openings verify); the band verdict is reported separately against the declared SKU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuagent.attest.messages import GpuIdentity
from gpuagent.attest.prover import Prover
from gpuagent.attest.skus import AcceptanceBand, SkuSpec, identity_problem, matmul_flops, task_size
from gpuagent.attest.verifier import AttestationRejected, Verifier

from .backends import Backend
from .bandwidth import measure_bandwidth
from .matmul import run_matmul

CPU_DEFAULT_SIZE = 1024
SELFTEST_UUID = "GPU-selftest"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SelfTestReport:
    sku: SkuSpec
    backend: str
    device: str
    n: int
    inner: int
    dtype: str
    seconds: float
    tflops: float
    exact: bool
    band_seconds: tuple[float, float]
    band_verdict: str
    bandwidth_bytes_per_second: float
    protocol_verdict: str
    protocol_seconds: float
    verify_seconds: float
    identity_note: str

    @property
    def passed(self) -> bool:
        return self.exact and self.protocol_verdict == "ok" and self.band_verdict == "within band"


def run_selftest(
    backend: Backend,
    sku: SkuSpec,
    *,
    size: int | None = None,
    inner: int | None = None,
    dtype: str = "fp16",
    bandwidth_bytes: int = 64 * 1024**2,
    progress: Progress = lambda _msg: None,
) -> SelfTestReport:
    if size is None:
        n, k = (CPU_DEFAULT_SIZE, CPU_DEFAULT_SIZE) if backend.simulated else task_size(sku, dtype)
    else:
        n, k = size, size
    k = inner if inner is not None else k
    k = max(4, k - k % 4)

    progress(f"matmul {n}x{k} @ {k}x{n} {dtype} on {backend.device_name()}")
    result, _ = run_matmul(backend, n, k, dtype, sku)
    # The matmul alone is judged against the band without the host-overhead allowance:
    # that allowance is for the whole commit and would swamp small self-test sizes.
    at_peak = matmul_flops(n, k) / sku.peak_flops(dtype)
    fastest, slowest = at_peak / sku.band.high, at_peak / sku.band.low
    if result.seconds < fastest:
        band = "too fast for the SKU"
    elif result.seconds > slowest:
        band = "too slow for the SKU"
    else:
        band = "within band"

    progress(f"bandwidth probe {bandwidth_bytes >> 20} MiB")
    bw = measure_bandwidth(backend, sku, bandwidth_bytes)

    progress("protocol round trip: challenge, commit, reveal, open")
    key = Ed25519PrivateKey.generate()
    relaxed = replace(sku, band=AcceptanceBand(low=1e-12, high=float("inf"), fixed_overhead_s=1e9))
    verifier = Verifier(skus={sku.sku_id: relaxed})
    identity = GpuIdentity(
        SELFTEST_UUID, sku.reported_names[0], memory_total_bytes=sku.reported_memory_mib * 1024**2
    )
    prover = Prover(key.sign, backend, lambda _uuid: identity)
    started = time.perf_counter()
    challenge = verifier.issue(key.public_key(), [(SELFTEST_UUID, sku.sku_id)], sizes=(n, k))
    verifier.prepare(challenge.challenge_id)
    try:
        commitment = prover.commit(challenge, challenge.tasks[0])
        t0 = time.perf_counter()
        reveal = verifier.check_commitment(commitment)
        verify_s = time.perf_counter() - t0
        openings = prover.open(reveal)
        t0 = time.perf_counter()
        verdict = verifier.check_openings(openings).reason
        verify_s += time.perf_counter() - t0
    except AttestationRejected as exc:
        verdict, verify_s = f"{exc.reason.value}: {exc.message}", 0.0
    protocol_s = time.perf_counter() - started

    real_name = backend.device_name()
    if backend.simulated:
        note = "simulated backend: NVML identity not checked"
    else:
        problem = identity_problem(sku, real_name, sku.reported_memory_mib * 1024**2)
        note = "device name matches the SKU" if problem is None else problem
    return SelfTestReport(
        sku, backend.name, real_name, n, k, dtype, result.seconds, result.tflops, result.exact,
        (fastest, slowest), band, bw.bytes_per_second, verdict, protocol_s, verify_s, note,
    )  # fmt: skip


def format_report(r: SelfTestReport) -> list[str]:
    peak = r.sku.peak_flops(r.dtype) / 1e12
    bw_peak = r.sku.memory_bandwidth_bytes_per_second
    return [
        f"SKU        {r.sku.name} ({r.sku.sku_id}), source {r.sku.source}",
        f"backend    {r.backend} on {r.device}",
        f"matmul     n={r.n} inner={r.inner} {r.dtype}: {matmul_flops(r.n, r.inner):.3g} flop "
        f"in {r.seconds:.3f}s",
        f"throughput {r.tflops:.3f} TFLOPS vs peak {peak:.1f} TFLOPS "
        f"({r.tflops / peak:.2%} of peak; band {r.sku.band.low:.2f}-{r.sku.band.high:.2f}x)",
        f"timing     {r.band_verdict} "
        f"(matmul alone may take {r.band_seconds[0]:.4g}s .. {r.band_seconds[1]:.4g}s)",
        f"exactness  {'bit-exact vs CPU reference' if r.exact else 'MISMATCH vs CPU reference'}",
        f"bandwidth  {r.bandwidth_bytes_per_second / 1e9:.1f} GB/s "
        f"vs peak {bw_peak / 1e9:.0f} GB/s "
        f"({r.bandwidth_bytes_per_second / bw_peak:.2%})",
        f"protocol   {r.protocol_verdict} (round trip {r.protocol_seconds:.3f}s, "
        f"verifier {r.verify_seconds * 1e3:.2f} ms)",
        f"identity   {r.identity_note}",
    ]
