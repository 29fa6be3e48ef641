"""Device profiles for the fake ``amdsmi`` module.

Like the NVIDIA profiles, each points at its row of the one SKU table
(``gpuagent.attest.skus``) for the reported name, memory and TDP, and adds what
a fake device needs beyond that: PCI device id (rocminfo "Chip ID"), gfx target,
compute units, max clocks, PCIe link, partition modes, and the amdsmi calls the
board answers with ``AMDSMI_STATUS_NOT_SUPPORTED`` (MI200 has no compute or memory
partitions; MI300X has no edge temperature sensor and reports the current socket
power, MI200 only the average).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuagent.attest.skus import SKUS, SkuSpec


@dataclass(frozen=True)
class AmdProfile:
    key: str
    sku: SkuSpec
    device_id: int
    gfx_version: str  # amdsmi's target_graphics_version, e.g. "gfx942"
    compute_units: int
    max_gfx_clock_mhz: int
    max_memory_clock_mhz: int
    pcie_generation: int
    pcie_width: int
    idle_power_watts: float
    compute_partition: str = "SPX"
    memory_partition: str = "NPS1"
    current_power: bool = True
    edge_sensor: bool = True
    ecc: bool = True
    unsupported: frozenset[str] = field(default_factory=frozenset)

    @property
    def market_name(self) -> str:
        return self.sku.reported_names[0]


_NO_PARTITIONS = frozenset({"amdsmi_get_gpu_compute_partition", "amdsmi_get_gpu_memory_partition"})

AMD_PROFILES: dict[str, AmdProfile] = {
    p.key: p
    for p in (
        AmdProfile(
            key="mi300x",
            sku=SKUS["mi300x"],
            device_id=0x74A1,  # rocminfo Chip ID on an MI300X (ROCm issue 4414)
            gfx_version="gfx942",
            compute_units=304,
            max_gfx_clock_mhz=2100,
            max_memory_clock_mhz=1300,
            pcie_generation=5,
            pcie_width=16,
            idle_power_watts=140.0,
            edge_sensor=False,
        ),
        AmdProfile(
            key="mi250x",
            sku=SKUS["mi250x"],
            device_id=0x740C,
            gfx_version="gfx90a",
            compute_units=110,  # per GCD
            max_gfx_clock_mhz=1700,
            max_memory_clock_mhz=1600,
            pcie_generation=4,
            pcie_width=16,
            idle_power_watts=90.0,
            current_power=False,
            unsupported=_NO_PARTITIONS,
        ),
        AmdProfile(
            key="mi210",
            sku=SKUS["mi210"],
            device_id=0x740F,
            gfx_version="gfx90a",
            compute_units=104,
            max_gfx_clock_mhz=1700,
            max_memory_clock_mhz=1600,
            pcie_generation=4,
            pcie_width=16,
            idle_power_watts=40.0,
            current_power=False,
            unsupported=_NO_PARTITIONS,
        ),
    )
}
