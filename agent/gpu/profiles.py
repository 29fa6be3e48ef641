"""Device profiles for the fake NVML module and the simulated backend.

Each profile points at its row of the one SKU table (``gpuagent.attest.skus``),
which holds the product name the driver reports, the memory total and the TDP
(the default enforced power limit), with their sources. A profile adds only what
a fake device needs beyond that: compute capability, architecture, clocks from
``nvidia-smi -q -d CLOCK`` max clocks, PCIe link, PCI device id, NVLink, MIG, and
``unsupported``, the NVML functions the board answers with
``NVML_ERROR_NOT_SUPPORTED`` (GeForce boards have no serial number or ECC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuagent.attest.skus import SKUS, SkuSpec

MIB = 1024**2


@dataclass(frozen=True)
class MigProfile:
    name: str  # "1g.10gb"
    memory_bytes: int


@dataclass(frozen=True)
class SkuProfile:
    key: str
    sku: SkuSpec
    compute_capability: tuple[int, int]
    architecture: int  # NVML_DEVICE_ARCH_*
    idle_power_watts: float
    max_sm_clock_mhz: int
    max_memory_clock_mhz: int
    pcie_generation: int
    pcie_width: int
    pci_device_id: int  # (device << 16) | vendor, as NVML's pciDeviceId
    nvlink_links: int = 0
    ecc: bool = False
    mig_profile: MigProfile | None = None  # the smallest slice, used to fill a MIG GPU
    mig_max_devices: int = 0
    unsupported: frozenset[str] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        """What ``nvmlDeviceGetName`` answers: the SKU's first reported name."""
        return self.sku.reported_names[0]

    @property
    def memory_total_bytes(self) -> int:
        return self.sku.reported_memory_mib * MIB

    @property
    def power_limit_watts(self) -> float:
        return self.sku.tdp_watts


_GEFORCE_UNSUPPORTED = frozenset(
    {
        "nvmlDeviceGetSerial",
        "nvmlDeviceGetEccMode",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetRetiredPages",
        "nvmlDeviceGetRetiredPagesPendingStatus",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetNvLinkState",
    }
)

# Data-centre boards retire rows by remapping (Ampere+), not by page retirement.
_DATACENTER_UNSUPPORTED = frozenset(
    {"nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus"}
)

PROFILES: dict[str, SkuProfile] = {
    p.key: p
    for p in (
        SkuProfile(
            key="h100-sxm-80gb",
            sku=SKUS["h100-sxm"],
            compute_capability=(9, 0),
            architecture=9,  # NVML_DEVICE_ARCH_HOPPER
            idle_power_watts=70.0,
            max_sm_clock_mhz=1980,
            max_memory_clock_mhz=2619,
            pcie_generation=5,
            pcie_width=16,
            pci_device_id=0x233010DE,
            nvlink_links=18,
            ecc=True,
            mig_profile=MigProfile("1g.10gb", 9856 * MIB),
            mig_max_devices=7,
            unsupported=_DATACENTER_UNSUPPORTED,
        ),
        SkuProfile(
            key="a100-sxm-80gb",
            sku=SKUS["a100-sxm-80gb"],
            compute_capability=(8, 0),
            architecture=7,  # NVML_DEVICE_ARCH_AMPERE
            idle_power_watts=60.0,
            max_sm_clock_mhz=1410,
            max_memory_clock_mhz=1593,
            pcie_generation=4,
            pcie_width=16,
            pci_device_id=0x20B210DE,
            nvlink_links=12,
            ecc=True,
            mig_profile=MigProfile("1g.10gb", 9728 * MIB),
            mig_max_devices=7,
            unsupported=_DATACENTER_UNSUPPORTED,
        ),
        SkuProfile(
            key="rtx-4090",
            sku=SKUS["rtx-4090"],
            compute_capability=(8, 9),
            architecture=8,  # NVML_DEVICE_ARCH_ADA
            idle_power_watts=20.0,
            max_sm_clock_mhz=3120,
            max_memory_clock_mhz=10501,
            pcie_generation=4,
            pcie_width=16,
            pci_device_id=0x268410DE,
            unsupported=_GEFORCE_UNSUPPORTED,
        ),
        SkuProfile(
            key="rtx-3080",
            sku=SKUS["rtx-3080"],
            compute_capability=(8, 6),
            architecture=7,  # NVML_DEVICE_ARCH_AMPERE
            idle_power_watts=18.0,
            max_sm_clock_mhz=2100,
            max_memory_clock_mhz=9501,
            pcie_generation=4,
            pcie_width=16,
            pci_device_id=0x220610DE,
            # Many GA102 boards under older drivers report no energy counter either.
            unsupported=_GEFORCE_UNSUPPORTED | {"nvmlDeviceGetTotalEnergyConsumption"},
        ),
        SkuProfile(
            key="h200-sxm-141gb",
            sku=SKUS["h200-sxm"],
            compute_capability=(9, 0),
            architecture=9,  # NVML_DEVICE_ARCH_HOPPER
            idle_power_watts=75.0,
            max_sm_clock_mhz=1980,
            max_memory_clock_mhz=3201,
            pcie_generation=5,
            pcie_width=16,
            pci_device_id=0x233510DE,  # nvidia-smi -q on an H200 (NVIDIA/mig-parted#120)
            nvlink_links=18,
            ecc=True,
            mig_profile=MigProfile("1g.18gb", 16640 * MIB),
            mig_max_devices=7,
            unsupported=_DATACENTER_UNSUPPORTED,
        ),
        SkuProfile(
            key="b200",
            sku=SKUS["b200"],
            compute_capability=(10, 0),
            architecture=10,  # NVML_DEVICE_ARCH_BLACKWELL
            idle_power_watts=140.0,
            max_sm_clock_mhz=1965,
            max_memory_clock_mhz=3996,
            pcie_generation=5,
            pcie_width=16,
            pci_device_id=0x290110DE,  # device 0x2901 (NVIDIA/gpu-operator#1242)
            nvlink_links=18,
            ecc=True,
            mig_profile=MigProfile("1g.23gb", 22528 * MIB),
            mig_max_devices=7,
            unsupported=_DATACENTER_UNSUPPORTED,
        ),
        SkuProfile(
            key="l4",
            sku=SKUS["l4"],
            compute_capability=(8, 9),
            architecture=8,  # NVML_DEVICE_ARCH_ADA
            idle_power_watts=16.0,
            max_sm_clock_mhz=2040,
            max_memory_clock_mhz=6251,
            pcie_generation=4,
            pcie_width=16,
            pci_device_id=0x27B810DE,
            ecc=True,
            # No MIG and no NVLink on the L4.
            unsupported=_DATACENTER_UNSUPPORTED
            | {"nvmlDeviceGetMigMode", "nvmlDeviceGetNvLinkState"},
        ),
        SkuProfile(
            key="rtx-5090",
            sku=SKUS["rtx-5090"],
            compute_capability=(12, 0),
            architecture=10,  # NVML_DEVICE_ARCH_BLACKWELL
            idle_power_watts=30.0,
            max_sm_clock_mhz=3090,
            max_memory_clock_mhz=14001,
            pcie_generation=5,
            pcie_width=16,
            pci_device_id=0x2B8510DE,
            unsupported=_GEFORCE_UNSUPPORTED,
        ),
    )
}


def get_profile(key: str) -> SkuProfile:
    try:
        return PROFILES[key]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown GPU profile {key!r}; known profiles: {known}") from None
