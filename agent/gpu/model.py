"""What the agent knows about its GPUs: static inventory, sampled telemetry, health.

Plain frozen dataclasses in base-ish units (bytes, watts, MHz, Celsius) so they
cross threads safely and serialise to JSON with ``dataclasses.asdict``. A field
is ``None`` when the GPU or driver cannot report it (NVML ``NotSupported``,
``FunctionNotFound``, ``NoPermission``); the field name is then listed in
``unsupported`` so "not supported" and "zero" are never confused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class HealthState(enum.StrEnum):
    HEALTHY = "healthy"
    # Usable, but something is off (throttling, a pending row remap): no cordon.
    DEGRADED = "degraded"
    # Not leasable: critical Xid, uncorrectable ECC, row-remap failure, lost GPU.
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class MigDevice:
    uuid: str
    profile: str  # e.g. "1g.10gb"
    memory_total_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None


@dataclass(frozen=True)
class NvLinkPeer:
    link: int
    peer_pci_bus_id: str
    peer_uuid: str | None  # None when the peer is not a GPU of this host (an NVSwitch)


@dataclass(frozen=True)
class GpuInfo:
    """Static facts about one GPU, read once at detection."""

    index: int
    uuid: str | None  # None only for a GPU already lost at detection
    name: str | None
    serial: str | None
    pci_bus_id: str | None
    memory_total_bytes: int | None
    compute_capability: str | None  # "9.0"
    architecture: str | None  # "hopper", "ampere", "ada", ...
    driver_version: str | None
    cuda_driver_version: str | None  # "12.4"
    power_limit_watts: float | None
    max_sm_clock_mhz: int | None
    max_memory_clock_mhz: int | None
    pcie_max_generation: int | None
    pcie_max_width: int | None
    mig_enabled: bool | None
    mig_devices: tuple[MigDevice, ...] = ()
    ecc_enabled: bool | None = None
    nvlink_peers: tuple[NvLinkPeer, ...] = ()
    simulated: bool = False
    lost: bool = False
    unsupported: tuple[str, ...] = ()
    # AMD (amdsmi) only; None on NVIDIA. The render node is what a lease container gets
    # (with /dev/kfd) for this GPU; partitions are AMD's counterpart of MIG (SPX/CPX, NPS1).
    rocm_version: str | None = None
    compute_partition: str | None = None
    memory_partition: str | None = None
    render_node: str | None = None

    @classmethod
    def lost_gpu(cls, index: int, uuid: str | None, *, simulated: bool = False) -> GpuInfo:
        """A GPU the library can no longer read: only where it was and who it was."""
        return cls(
            index=index,
            uuid=uuid,
            name=None,
            serial=None,
            pci_bus_id=None,
            memory_total_bytes=None,
            compute_capability=None,
            architecture=None,
            driver_version=None,
            cuda_driver_version=None,
            power_limit_watts=None,
            max_sm_clock_mhz=None,
            max_memory_clock_mhz=None,
            pcie_max_generation=None,
            pcie_max_width=None,
            mig_enabled=None,
            simulated=simulated,
            lost=True,
        )


@dataclass(frozen=True)
class GpuSample:
    """One GPU's telemetry at one instant. ``lost`` means NVML said GpuIsLost."""

    index: int
    uuid: str | None
    timestamp: float  # unix seconds
    lost: bool = False
    temperature_celsius: float | None = None
    power_watts: float | None = None
    # None on MIG-enabled GPUs: NVML has no whole-device utilization there.
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    throttle_reasons: tuple[str, ...] = ()
    # Volatile counters: since the driver loaded or the GPU was last reset.
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None
    # Page retirement predates row remapping (Volta and older).
    retired_pages_single_bit: int | None = None
    retired_pages_double_bit: int | None = None
    retired_pages_pending: bool | None = None
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class XidEvent:
    """An NVML critical event. Double-bit ECC events arrive as Xid 48."""

    index: int | None
    uuid: str | None
    code: int
    timestamp: float  # unix seconds, when the agent received it


@dataclass(frozen=True)
class GpuHealth:
    """The monitor's verdict on one GPU, as heartbeats and metrics report it."""

    index: int
    uuid: str | None
    state: HealthState
    reasons: tuple[str, ...] = ()
    cordoned: bool = False
    cordon_reason: str | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)
    sample: GpuSample | None = None

    @property
    def leasable(self) -> bool:
        return self.uuid is not None and not self.cordoned and self.state != HealthState.UNHEALTHY
