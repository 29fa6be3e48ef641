"""A small pynvml-shaped stand-in for the metrics tests.

It implements only the calls ``NvmlGpuSource`` makes, with fault injection:
unsupported calls, calls that raise, and calls that hang until released.
(Helper A's ``agent.gpu.fakenvml`` is the full fake; this one keeps the metrics
tests independent of it.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_UNKNOWN = 999
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util: int = 40
    mem_util: int = 20
    total: int = 80 * 1024**3
    used: int = 10 * 1024**3
    temp: int = 55
    power_mw: int = 350_000
    energy_mj: int = 1_000_000
    replays: int = 0
    ecc: tuple[int, int] = (0, 0)
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)
    violation_ns: int = 0
    unsupported: set[str] = field(default_factory=set)  # this GPU's NotSupported calls


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)  # method names raising NotSupported
    failing: set[str] = field(default_factory=set)  # method names raising an unknown error
    hang: threading.Event | None = None  # when set: every call blocks until it is set
    calls: int = 0

    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST

    @classmethod
    def with_gpus(cls, n: int) -> FakeNvml:
        return cls(
            gpus=[FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000") for i in range(n)]
        )

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if not name.startswith("nvml"):
            return attr

        def call(*args: Any) -> Any:
            # Faults happen when the function is called, as with the real bindings.
            object.__setattr__(self, "calls", object.__getattribute__(self, "calls") + 1)
            release = object.__getattribute__(self, "hang")
            if release is not None:
                release.wait()
            per_gpu = args[0].unsupported if args and isinstance(args[0], FakeGpu) else set()
            if name in object.__getattribute__(self, "unsupported") or name in per_gpu:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if name in object.__getattribute__(self, "failing"):
                raise NVMLError(NVML_ERROR_UNKNOWN)
            return attr(*args)

        return call

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        return h.name.encode()  # older bindings return bytes

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(busId=f"00000000:{self.gpus.index(h) + 0x18:02X}:00.0")

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        return SimpleNamespace(gpu=h.util, memory=h.mem_util)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, kind: int) -> int:
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        return h.temp

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return h.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        return h.energy_mj

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeGpu) -> int:
        return h.replays

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, etype: int, counter: int) -> int:
        return h.ecc[etype]

    def nvmlDeviceGetRemappedRows(self, h: FakeGpu) -> tuple[int, int, int, int]:
        return h.remapped

    def nvmlDeviceGetViolationStatus(self, h: FakeGpu, policy: int) -> Any:
        return SimpleNamespace(violationTime=h.violation_ns * (policy + 1))


def populated_telemetry(nvml: FakeNvml | None = None, timeout: float = 2.0) -> Any:
    """A registry with one of everything recorded, so every metric family has samples."""
    from agent.metrics.agent_metrics import Attestation
    from agent.metrics.gpu_collector import GpuHealth
    from agent.metrics.gpu_sample import XidCounter
    from agent.metrics.nvml_source import NvmlGpuSource
    from agent.metrics.registry import build_telemetry

    nvml = nvml if nvml is not None else FakeNvml.with_gpus(2)
    nvml.gpus[0].remapped = (1, 0, 0, 0)
    nvml.gpus[1].unsupported = {"nvmlDeviceGetRemappedRows"}  # as on pre-Ampere cards
    xids = XidCounter()
    xids.record(nvml.gpus[1].uuid, 79, 1_700_000_000.0)
    leases = {nvml.gpus[0].uuid: "lease-a"}
    health = {nvml.gpus[1].uuid: GpuHealth("unhealthy", True, "xid 79")}
    telemetry = build_telemetry(
        gpu_source=NvmlGpuSource(nvml, xids),
        scrape_timeout=timeout,
        gpu_leases=lambda: leases,
        gpu_health=lambda: health,
        lease_states=lambda: {"running": 1},
    )
    agent = telemetry.agent
    agent.lease_started("started", 3.5)
    agent.image_pulled(2.0, 1_000_000)
    agent.health_check("lease-a", "http", False)
    agent.restarted("lease-a", "liveness")
    agent.set_connected(True)
    agent.reconnected()
    agent.heartbeat_sent()
    agent.heartbeat_failed()
    agent.set_usage_backlog(3, 1_700_000_000.0)
    agent.usage_metered(10.0)
    agent.set_attestation(
        0, nvml.gpus[0].uuid, Attestation(True, 0.97, 1_700_000_000.0, 1_700_086_400.0)
    )
    return telemetry


def populated_scheduler_metrics() -> Any:
    from scheduler.metrics import SchedulerMetrics

    metrics = SchedulerMetrics(nodes=lambda: {"online": 2}, leases=lambda: {"running": 1})
    metrics.placement(0.002)
    metrics.usage_records(5, 1)
    metrics.heartbeat()
    metrics.attestation("passed")
    from scheduler.price_history import ModelPrices

    prices = {"NVIDIA GeForce RTX 4090": ModelPrices(1_500_000, 1_250_000)}
    metrics.prices = lambda: prices
    from scheduler.relay.metrics import RelayMetrics

    relay = RelayMetrics(metrics.registry)  # the embedded relay shares the registry
    relay.request("lease-1", 200, 0.003)
    relay.request("lease-1", 401)
    relay.carried("lease-1", 100, 2000)
    relay.active.labels("lease-1").inc()
    relay.tunnels.set(1)
    return metrics
