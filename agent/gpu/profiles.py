"""SKU profiles for the fake NVML module and the simulated backend.

Figures are what NVML reports on the real boards (names as ``nvidia-smi`` prints
them; memory as NVML's ``total``; clocks from ``nvidia-smi -q -d CLOCK`` max
clocks; power as the default enforced limit), cross-checked with NVIDIA's
datasheets. ``unsupported`` lists the NVML functions the board answers with
``NVML_ERROR_NOT_SUPPORTED``: GeForce boards have no serial number or ECC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024**2


@dataclass(frozen=True)
class MigProfile:
    name: str  # "1g.10gb"
    memory_bytes: int


@dataclass(frozen=True)
class SkuProfile:
    key: str
    name: str
    memory_total_bytes: int
    compute_capability: tuple[int, int]
    architecture: int  # NVML_DEVICE_ARCH_*
    power_limit_watts: float
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
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=81559 * MIB,
            compute_capability=(9, 0),
            architecture=9,  # NVML_DEVICE_ARCH_HOPPER
            power_limit_watts=700.0,
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
            name="NVIDIA A100-SXM4-80GB",
            memory_total_bytes=81920 * MIB,
            compute_capability=(8, 0),
            architecture=7,  # NVML_DEVICE_ARCH_AMPERE
            power_limit_watts=400.0,
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
            name="NVIDIA GeForce RTX 4090",
            memory_total_bytes=24564 * MIB,
            compute_capability=(8, 9),
            architecture=8,  # NVML_DEVICE_ARCH_ADA
            power_limit_watts=450.0,
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
            name="NVIDIA GeForce RTX 3080",
            memory_total_bytes=10240 * MIB,
            compute_capability=(8, 6),
            architecture=7,  # NVML_DEVICE_ARCH_AMPERE
            power_limit_watts=320.0,
            idle_power_watts=18.0,
            max_sm_clock_mhz=2100,
            max_memory_clock_mhz=9501,
            pcie_generation=4,
            pcie_width=16,
            pci_device_id=0x220610DE,
            # Many GA102 boards under older drivers report no energy counter either.
            unsupported=_GEFORCE_UNSUPPORTED | {"nvmlDeviceGetTotalEnergyConsumption"},
        ),
    )
}


def get_profile(key: str) -> SkuProfile:
    try:
        return PROFILES[key]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown GPU profile {key!r}; known profiles: {known}") from None
