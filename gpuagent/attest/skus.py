"""Reference table of GPU SKUs and the acceptance band: the one place the timing rules live.

Peak figures are *dense* (no 2:4 sparsity) tensor-core throughput with fp32 accumulation,
which is what the attestation matmul runs; datasheets quote the sparse figure first, so
those are halved here.  GeForce cards run fp16 with fp32 accumulation at half the rate
of fp16 accumulation, hence their lower figures.  Sources:

* [H100]  NVIDIA H100 Tensor Core GPU datasheet,
  https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
  (SXM: FP16/BF16 Tensor 1,979 TFLOPS sparse, FP32 67 TFLOPS, 80 GB HBM3 3.35 TB/s, 700 W;
  PCIe: 1,513 TFLOPS sparse, FP32 51 TFLOPS, 80 GB HBM2e 2 TB/s, 350 W).
* [H200]  NVIDIA H200 Tensor Core GPU datasheet,
  https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200
  (SXM: FP16/BF16 Tensor 1,979 TFLOPS sparse, FP32 67 TFLOPS, 141 GB HBM3e 4.8 TB/s, up to
  700 W; NVL: 1,671 TFLOPS sparse, FP32 60 TFLOPS, 141 GB 4.8 TB/s, up to 600 W).
* [B200]  NVIDIA HGX B200 / DGX B200 datasheet, https://www.nvidia.com/en-us/data-center/hgx/
  (8 GPUs: FP16/BF16 Tensor 36 PFLOPS sparse, FP32 600 TFLOPS, 1,440 GB HBM3e, 64 TB/s; per
  GPU 1,000 W, so per GPU 2.25 PFLOPS dense, 75 TFLOPS, 180 GB, 8 TB/s).
* [GB200] NVIDIA GB200 NVL72 datasheet, https://www.nvidia.com/en-us/data-center/gb200-nvl72/
  (per GB200 superchip = 1 Grace + 2 Blackwell GPUs: FP16/BF16 Tensor 10 PFLOPS sparse,
  FP32 180 TFLOPS, up to 372 GB HBM3e 16 TB/s; halved here for one GPU. NVIDIA publishes
  no per-GPU TDP: 1,200 W is the GPU share of the superchip's configurable 2,700 W).
* [A100]  NVIDIA A100 Tensor Core GPU datasheet,
  https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  (FP16/BF16 Tensor 312 TFLOPS dense, FP32 19.5 TFLOPS; 40 GB HBM2 1,555 GB/s,
  80 GB HBM2e 2,039 GB/s; SXM 400 W).
* [L40S]  NVIDIA L40S datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413
  (FP16/BF16 Tensor 362.05 TFLOPS dense, FP32 91.6 TFLOPS, 48 GB GDDR6 864 GB/s, 350 W).
* [L40]   NVIDIA L40 datasheet, https://www.nvidia.com/en-us/data-center/l40/
  (FP16/BF16 Tensor with FP32 accumulate 181.05 TFLOPS dense, FP32 90.5 TFLOPS,
  48 GB GDDR6 864 GB/s, 300 W).
* [L4]    NVIDIA L4 datasheet, https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet
  (FP16/BF16 Tensor 242 TFLOPS sparse, FP32 30.3 TFLOPS, 24 GB GDDR6 300 GB/s, 72 W).
* [A10]   NVIDIA A10 datasheet, https://www.nvidia.com/en-us/data-center/products/a10-gpu/
  (FP16/BF16 Tensor 125 TFLOPS dense, FP32 31.2 TFLOPS, 24 GB GDDR6 600 GB/s, 150 W).
* [A10G]  AWS EC2 G5 instances, https://aws.amazon.com/ec2/instance-types/g5/ (24 GB GDDR6,
  600 GB/s) and nvidia-smi on g5 (300 W cap). NVIDIA publishes no A10G datasheet: the
  tensor rate is GA102's 1,024 dense FP16 flop/clk/SM (as on the A10) x 80 SMs x 1.71 GHz
  boost = 140 TFLOPS; FP32 35 TFLOPS. To be confirmed by ``make gpu-check`` on a g5.
* [RTX6KA] NVIDIA RTX 6000 Ada Generation datasheet,
  https://www.nvidia.com/en-us/design-visualization/rtx-6000/ and the Ada whitepaper v2.1
  appendix (FP16 Tensor with FP32 accumulate 364.2 TFLOPS dense, FP32 91.1 TFLOPS,
  48 GB GDDR6 960 GB/s, 300 W).
* [A6000] NVIDIA RTX A6000 datasheet, https://www.nvidia.com/en-us/design-visualization/rtx-a6000/
  and the GA102 whitepaper (FP16 Tensor with FP32 accumulate 154.8 TFLOPS dense,
  FP32 38.7 TFLOPS, 48 GB GDDR6 768 GB/s, 300 W).
* [Ada]   NVIDIA Ada GPU Architecture whitepaper v2.1, appendix A: GeForce RTX 4090
  (FP16 Tensor with FP32 accumulate 165.2 TFLOPS dense, FP32 82.6 TFLOPS,
  24 GB GDDR6X 1,008 GB/s, 450 W) and RTX 4080 (97.5 TFLOPS dense, FP32 48.7 TFLOPS,
  16 GB GDDR6X 716.8 GB/s, 320 W).
* [RTXBW] NVIDIA RTX Blackwell GPU Architecture whitepaper v1.0, appendix: GeForce RTX 5090
  (FP16 Tensor with FP32 accumulate 209.5 TFLOPS dense, FP32 104.8 TFLOPS, 32 GB GDDR7
  1,792 GB/s, 575 W) and RTX 5080 (112.6 TFLOPS dense, FP32 56.3 TFLOPS, 16 GB GDDR7
  960 GB/s, 360 W).
* [GA102] NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3080 10 GB
  (FP16 Tensor with FP32 accumulate 59.5 TFLOPS dense, FP32 29.8 TFLOPS,
  10 GB GDDR6X 760 GB/s, 320 W).
* [MI300X] AMD Instinct MI300X data sheet,
  https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf
  (FP16/BF16 matrix 1,307.4 TFLOPS dense, FP32 vector 81.7 TFLOPS, 192 GB HBM3 5.3 TB/s,
  750 W).
* [MI250X] AMD Instinct MI250X data sheet,
  https://www.amd.com/content/dam/amd/en/documents/instinct-business-docs/product-briefs/instinct-mi250x-brochure.pdf
  (per OAM: FP16/BF16 matrix 383 TFLOPS, FP32 vector 47.9 TFLOPS, 128 GB HBM2e 3.2 TB/s,
  560 W). The OAM holds two GCDs and amdsmi reports each GCD as its own GPU, so the row is
  one GCD: half of each figure.
* [MI210] AMD Instinct MI210 data sheet,
  https://www.amd.com/content/dam/amd/en/documents/instinct-business-docs/product-briefs/instinct-mi210-brochure.pdf
  (FP16/BF16 matrix 181 TFLOPS, FP32 vector 22.6 TFLOPS, 64 GB HBM2e 1.6 TB/s, 300 W).

``reported_names`` are product names as the driver reports them (``nvmlDeviceGetName`` /
``nvidia-smi``, amdsmi's ``market_name``), ``reported_memory_mib`` the total it reports (a
little under the marketing size where ECC or the driver reserves some). Sources for the
reported values: nvidia-smi output in public bug reports (H100, A100, L40S, L4, A10: modal
-labs/modal-client#2797; A10G: NVIDIA/TensorRT-LLM#7818; B200: NVIDIA/TensorRT-LLM#10278;
H200: NVIDIA/mig-parted#120), amdsmi ``market_name`` in gpustack/gpustack#4123 ("AMD
Instinct MI308X OAM": the " OAM" suffix) and rocminfo in ROCm issues ("AMD Instinct
MI300X"). Rows whose memory total is not yet seen on a real board (GB200, H200 NVL, RTX 50
series) are derived from the marketing size; ``make gpu-check`` prints the reported value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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


Vendor = Literal["nvidia", "amd"]


@dataclass(frozen=True)
class SkuSpec:
    sku_id: str
    name: str
    reported_names: tuple[str, ...]
    reported_memory_mib: int
    memory_bytes: int
    fp16_tensor_tflops: float  # dense, fp32 accumulate
    bf16_tensor_tflops: float
    fp32_tflops: float
    memory_bandwidth_bytes_per_second: float
    source: str
    band: AcceptanceBand = DEFAULT_BAND
    tdp_watts: float = 0.0
    vendor: Vendor = "nvidia"
    # A regex (full match, case-insensitive) for names the driver reports beyond the listed
    # ones, e.g. amdsmi's optional " OAM" suffix; empty: exactly ``reported_names``.
    name_pattern: str = ""

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

    def matches_name(self, reported: str) -> bool:
        """Whether the driver's product name (NVML name, amdsmi market_name) is this SKU."""
        name = " ".join(reported.split()).lower()
        if name in {n.lower() for n in self.reported_names}:
            return True
        return bool(self.name_pattern) and re.fullmatch(self.name_pattern, name, re.I) is not None


def matmul_flops(n: int, inner: int) -> float:
    return 2.0 * n * n * inner


_GB = 1000**3
_B = DEFAULT_BAND
# id, name, reported names, reported MiB, memory, fp16, bf16, fp32 TFLOPS, bandwidth, source,
# band, TDP W[, vendor, name pattern]
SKUS: dict[str, SkuSpec] = {
    spec.sku_id: spec
    for spec in (
        SkuSpec("h100-sxm", "NVIDIA H100 SXM5 80GB", ("NVIDIA H100 80GB HBM3",), 81559,
                80 * _GB, 989.4, 989.4, 67.0, 3.35e12, "[H100]", _B, 700),
        SkuSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", ("NVIDIA H100 PCIe",), 81559,
                80 * _GB, 756.5, 756.5, 51.0, 2.0e12, "[H100]", _B, 350),
        SkuSpec("h200-sxm", "NVIDIA H200 SXM 141GB", ("NVIDIA H200",), 143771,
                141 * _GB, 989.5, 989.5, 67.0, 4.8e12, "[H200]", _B, 700),
        SkuSpec("h200-nvl", "NVIDIA H200 NVL 141GB", ("NVIDIA H200 NVL",), 143771,
                141 * _GB, 835.5, 835.5, 60.0, 4.8e12, "[H200]", _B, 600),
        SkuSpec("b200", "NVIDIA B200 180GB", ("NVIDIA B200",), 183359,
                180 * _GB, 2250.0, 2250.0, 75.0, 8.0e12, "[B200]", _B, 1000),
        SkuSpec("gb200", "NVIDIA GB200 (one Blackwell GPU)", ("NVIDIA GB200",), 189471,
                186 * _GB, 2500.0, 2500.0, 90.0, 8.0e12, "[GB200]", _B, 1200),
        SkuSpec("a100-sxm-40gb", "NVIDIA A100 SXM4 40GB", ("NVIDIA A100-SXM4-40GB",), 40960,
                40 * _GB, 312.0, 312.0, 19.5, 1.555e12, "[A100]", _B, 400),
        SkuSpec("a100-sxm-80gb", "NVIDIA A100 SXM4 80GB", ("NVIDIA A100-SXM4-80GB",), 81920,
                80 * _GB, 312.0, 312.0, 19.5, 2.039e12, "[A100]", _B, 400),
        SkuSpec("l40s", "NVIDIA L40S", ("NVIDIA L40S",), 46068,
                48 * _GB, 362.05, 362.05, 91.6, 864e9, "[L40S]", _B, 350),
        SkuSpec("l40", "NVIDIA L40", ("NVIDIA L40",), 46068,
                48 * _GB, 181.05, 181.05, 90.5, 864e9, "[L40]", _B, 300),
        SkuSpec("l4", "NVIDIA L4", ("NVIDIA L4",), 23034,
                24 * _GB, 121.0, 121.0, 30.3, 300e9, "[L4]", _B, 72),
        SkuSpec("a10", "NVIDIA A10", ("NVIDIA A10",), 23028,
                24 * _GB, 125.0, 125.0, 31.2, 600e9, "[A10]", _B, 150),
        SkuSpec("a10g", "NVIDIA A10G", ("NVIDIA A10G",), 23028,
                24 * _GB, 140.0, 140.0, 35.0, 600e9, "[A10G]", _B, 300),
        SkuSpec("rtx-6000-ada", "NVIDIA RTX 6000 Ada Generation",
                ("NVIDIA RTX 6000 Ada Generation",), 49140,
                48 * _GB, 364.2, 364.2, 91.1, 960e9, "[RTX6KA]", _B, 300),
        SkuSpec("rtx-a6000", "NVIDIA RTX A6000", ("NVIDIA RTX A6000",), 49140,
                48 * _GB, 154.8, 154.8, 38.7, 768e9, "[A6000]", _B, 300),
        SkuSpec("rtx-5090", "NVIDIA GeForce RTX 5090", ("NVIDIA GeForce RTX 5090",), 32607,
                32 * _GB, 209.5, 209.5, 104.8, 1792e9, "[RTXBW]", _B, 575),
        SkuSpec("rtx-5080", "NVIDIA GeForce RTX 5080", ("NVIDIA GeForce RTX 5080",), 16303,
                16 * _GB, 112.6, 112.6, 56.3, 960e9, "[RTXBW]", _B, 360),
        SkuSpec("rtx-4090", "NVIDIA GeForce RTX 4090", ("NVIDIA GeForce RTX 4090",), 24564,
                24 * _GB, 165.2, 165.2, 82.6, 1008e9, "[Ada]", _B, 450),
        SkuSpec("rtx-4080", "NVIDIA GeForce RTX 4080", ("NVIDIA GeForce RTX 4080",), 16376,
                16 * _GB, 97.5, 97.5, 48.7, 716.8e9, "[Ada]", _B, 320),
        SkuSpec("rtx-3080", "NVIDIA GeForce RTX 3080 10GB", ("NVIDIA GeForce RTX 3080",), 10240,
                10 * _GB, 59.5, 59.5, 29.8, 760e9, "[GA102]", _B, 320),
        SkuSpec("mi300x", "AMD Instinct MI300X", ("AMD Instinct MI300X",), 196592,
                192 * _GB, 1307.4, 1307.4, 81.7, 5.3e12, "[MI300X]", _B, 750,
                "amd", r"amd instinct mi300x( oam)?"),
        SkuSpec("mi250x", "AMD Instinct MI250X (one GCD)", ("AMD Instinct MI250X",), 65520,
                64 * _GB, 191.5, 191.5, 23.95, 1.6e12, "[MI250X]", _B, 280,
                "amd", r"amd instinct mi250x( oam)?(/mi250)?"),
        SkuSpec("mi210", "AMD Instinct MI210", ("AMD Instinct MI210",), 65520,
                64 * _GB, 181.0, 181.0, 22.6, 1.6e12, "[MI210]", _B, 300,
                "amd", r"amd instinct mi210"),
    )
}  # fmt: skip

# Memory reported by the driver may differ from the table by this fraction (driver versions).
MEMORY_TOLERANCE = 0.025
DEFAULT_N = 16384
INNER_ALIGN = 4096
DEFAULT_TARGET_SECONDS = 2.0


def get_sku(sku_id: str) -> SkuSpec:
    try:
        return SKUS[sku_id.lower()]
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


def sku_for_name(reported_name: str) -> SkuSpec | None:
    """The SKU whose reported product name this is, or None (names never match two SKUs)."""
    return next((sku for sku in SKUS.values() if sku.matches_name(reported_name)), None)


def identity_problem(sku: SkuSpec, reported_name: str, memory_total_bytes: int) -> str | None:
    """Why a driver-reported identity does not fit the declared SKU, or None when it does."""
    if not sku.matches_name(reported_name):
        return (
            f"reported name {reported_name!r} is not a {sku.name} "
            f"(expected {', '.join(sku.reported_names)})"
        )
    expected = sku.reported_memory_mib * MIB
    if abs(memory_total_bytes - expected) > MEMORY_TOLERANCE * expected:
        return (
            f"reported memory {memory_total_bytes / MIB:.0f} MiB does not match {sku.name} "
            f"({sku.reported_memory_mib} MiB)"
        )
    return None
