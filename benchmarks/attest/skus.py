"""Reference table of GPU SKUs and the acceptance band: the one place the timing rules live.

Peak figures are *dense* (no 2:4 sparsity) tensor-core throughput with fp32 accumulation,
which is what the attestation matmul runs; datasheets quote the sparse figure first, so
those are halved here.  GeForce cards run fp16 with fp32 accumulation at half the rate
of fp16 accumulation, hence their lower figures.  Sources:

* [H100]  NVIDIA H100 Tensor Core GPU datasheet,
  https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
  (SXM: FP16/BF16 Tensor 1,979 TFLOPS sparse, FP32 67 TFLOPS, 80 GB HBM3 3.35 TB/s;
  PCIe: 1,513 TFLOPS sparse, FP32 51 TFLOPS, 80 GB HBM2e 2 TB/s).
* [A100]  NVIDIA A100 Tensor Core GPU datasheet,
  https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  (FP16/BF16 Tensor 312 TFLOPS dense, FP32 19.5 TFLOPS; 40 GB HBM2 1,555 GB/s,
  80 GB HBM2e 2,039 GB/s).
* [L40S]  NVIDIA L40S datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413
  (FP16/BF16 Tensor 362.05 TFLOPS dense, FP32 91.6 TFLOPS, 48 GB GDDR6 864 GB/s).
* [Ada]   NVIDIA Ada GPU Architecture whitepaper v2.1, appendix A, GeForce RTX 4090
  (FP16 Tensor with FP32 accumulate 165.2 TFLOPS dense, FP32 82.6 TFLOPS,
  24 GB GDDR6X 1,008 GB/s).
* [GA102] NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3080 10 GB
  (FP16 Tensor with FP32 accumulate 59.5 TFLOPS dense, FP32 29.8 TFLOPS,
  10 GB GDDR6X 760 GB/s).

NVML names and memory totals are what ``nvmlDeviceGetName`` / ``nvmlDeviceGetMemoryInfo``
report on these boards (memory is a little under the marketing size where ECC or the
driver reserves some).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
TERA = 1e12


@dataclass(frozen=True)
class AcceptanceBand:
    """Which measured times are consistent with a declared SKU.

    The commit must arrive no sooner than ``flops / (high * peak)`` (faster than the
    datasheet allows means the work was not done as claimed) and no later than
    ``flops / (low * peak) + overhead`` plus the verifier's network allowance.  The
    overhead covers what is not tensor-core work: a fixed cost (launch, allocation,
    transfer) and hashing C's rows on the host at ``host_hash_bytes_per_second``.
    """

    low: float = 0.6
    high: float = 1.15
    fixed_overhead_s: float = 0.3
    host_hash_bytes_per_second: float = 2.0e9

    def overhead_s(self, n: int) -> float:
        return self.fixed_overhead_s + 4 * n * n / self.host_hash_bytes_per_second


DEFAULT_BAND = AcceptanceBand()


@dataclass(frozen=True)
class SkuSpec:
    sku_id: str
    name: str
    nvml_names: tuple[str, ...]
    nvml_memory_mib: int
    memory_bytes: int
    fp16_tensor_tflops: float  # dense, fp32 accumulate
    bf16_tensor_tflops: float
    fp32_tflops: float
    memory_bandwidth_bytes_per_second: float
    source: str
    band: AcceptanceBand = DEFAULT_BAND

    def peak_flops(self, dtype: str) -> float:
        if dtype == "fp16":
            return self.fp16_tensor_tflops * TERA
        if dtype == "bf16":
            return self.bf16_tensor_tflops * TERA
        raise ValueError(f"unsupported dtype {dtype!r}: use fp16 or bf16")

    def time_bounds(self, n: int, inner: int, dtype: str) -> tuple[float, float]:
        """(fastest, slowest) plausible seconds from challenge to commit, network excluded."""
        at_peak = matmul_flops(n, inner) / self.peak_flops(dtype)
        return at_peak / self.band.high, at_peak / self.band.low + self.band.overhead_s(n)


def matmul_flops(n: int, inner: int) -> float:
    return 2.0 * n * n * inner


_GB = 1000**3
SKUS: dict[str, SkuSpec] = {
    spec.sku_id: spec
    for spec in (
        SkuSpec("h100-sxm", "NVIDIA H100 SXM5 80GB", ("NVIDIA H100 80GB HBM3",), 81559,
                80 * _GB, 989.4, 989.4, 67.0, 3.35e12, "[H100]"),
        SkuSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", ("NVIDIA H100 PCIe",), 81559,
                80 * _GB, 756.5, 756.5, 51.0, 2.0e12, "[H100]"),
        SkuSpec("a100-sxm-40gb", "NVIDIA A100 SXM4 40GB", ("NVIDIA A100-SXM4-40GB",), 40960,
                40 * _GB, 312.0, 312.0, 19.5, 1.555e12, "[A100]"),
        SkuSpec("a100-sxm-80gb", "NVIDIA A100 SXM4 80GB", ("NVIDIA A100-SXM4-80GB",), 81920,
                80 * _GB, 312.0, 312.0, 19.5, 2.039e12, "[A100]"),
        SkuSpec("l40s", "NVIDIA L40S", ("NVIDIA L40S",), 46068,
                48 * _GB, 362.05, 362.05, 91.6, 864e9, "[L40S]"),
        SkuSpec("rtx-4090", "NVIDIA GeForce RTX 4090", ("NVIDIA GeForce RTX 4090",), 24564,
                24 * _GB, 165.2, 165.2, 82.6, 1008e9, "[Ada]"),
        SkuSpec("rtx-3080", "NVIDIA GeForce RTX 3080 10GB", ("NVIDIA GeForce RTX 3080",), 10240,
                10 * _GB, 59.5, 59.5, 29.8, 760e9, "[GA102]"),
    )
}  # fmt: skip

# Names the simulated GPU profiles in agent config use.
ALIASES = {"h100-sxm-80gb": "h100-sxm", "h100-pcie-80gb": "h100-pcie"}

# Memory reported by NVML may differ from the table by this fraction (driver versions).
MEMORY_TOLERANCE = 0.025
DEFAULT_N = 16384
INNER_ALIGN = 4096
DEFAULT_TARGET_SECONDS = 2.0


def get_sku(sku_id: str) -> SkuSpec:
    key = ALIASES.get(sku_id.lower(), sku_id.lower())
    try:
        return SKUS[key]
    except KeyError:
        known = ", ".join(sorted(SKUS))
        raise KeyError(f"unknown SKU {sku_id!r}; known: {known}") from None


def task_size(
    sku: SkuSpec, dtype: str = "fp16", target_seconds: float = DEFAULT_TARGET_SECONDS
) -> tuple[int, int]:
    """(n, inner) so that the matmul takes ``target_seconds`` at the SKU's peak.

    n stays at 16384 (C is 1 GiB of fp32, small next to any listed card's memory) and the
    inner size carries the work; only a card too fast for the exactness bound gets a
    larger n.
    """
    # Imported here: generator brings numpy, and the agent reads SKUs without it.
    from .generator import MAX_INNER

    n = DEFAULT_N
    while True:
        inner = int(target_seconds * sku.peak_flops(dtype) / (2.0 * n * n))
        inner = max(INNER_ALIGN, inner - inner % INNER_ALIGN)
        if inner <= MAX_INNER:
            return n, inner
        n *= 2


def identity_problem(sku: SkuSpec, nvml_name: str, memory_total_bytes: int) -> str | None:
    """Why an NVML identity does not fit the declared SKU, or None when it does."""
    if " ".join(nvml_name.split()).lower() not in {m.lower() for m in sku.nvml_names}:
        return f"NVML name {nvml_name!r} is not a {sku.name} (expected {', '.join(sku.nvml_names)})"
    expected = sku.nvml_memory_mib * MIB
    if abs(memory_total_bytes - expected) > MEMORY_TOLERANCE * expected:
        return (
            f"NVML memory {memory_total_bytes / MIB:.0f} MiB does not match {sku.name} "
            f"({sku.nvml_memory_mib} MiB)"
        )
    return None
