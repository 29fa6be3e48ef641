"""What the sampler reads, as small interfaces the daemon adapts its parts to.

The lease manager provides ``MeteredLease`` objects, the GPU backend a
``GpuUsageSource``; ``SnapshotGpuUsage`` adapts the metrics collector's
``GpuSource`` (NVML or simulated) so the same readings feed both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.metrics.gpu_sample import GpuSource

from .cgroup import CgroupReader, ContainerCounters


class MeteredLease(Protocol):
    """A running lease as the sampler sees it."""

    @property
    def lease_id(self) -> str: ...

    @property
    def container_id(self) -> str: ...

    @property
    def pid(self) -> int | None:
        """The container's init pid (network counters live in its namespace)."""

    @property
    def gpu_uuids(self) -> Sequence[str]: ...

    @property
    def started_monotonic(self) -> float:
        """``time.monotonic()`` seconds when the lease started running."""


@dataclass(frozen=True)
class StaticLease:
    """A plain ``MeteredLease``, for adapters and tests."""

    lease_id: str
    container_id: str = ""
    pid: int | None = None
    gpu_uuids: Sequence[str] = ()
    started_monotonic: float = 0.0


LeaseSource = Callable[[], Iterable[MeteredLease]]


@dataclass(frozen=True)
class GpuUsage:
    """One GPU at one instant; ``None`` where NVML cannot say."""

    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    energy_mj: int | None = None  # NVML's total energy counter (mJ since the driver loaded)
    power_watts: float | None = None


class GpuUsageSource(Protocol):
    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        """Readings for ``uuids`` (a missing uuid: unreadable). Blocking."""


class NoGpus:
    """For hosts without GPUs: every GPU is unreadable."""

    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        return {}


class SnapshotGpuUsage:
    """``GpuUsageSource`` over the metrics ``GpuSource``: one snapshot per read."""

    def __init__(self, source: GpuSource) -> None:
        self._source = source

    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        wanted = set(uuids)
        if not wanted:
            return {}
        out: dict[str, GpuUsage] = {}
        for gpu in self._source.read().gpus:
            if gpu.uuid not in wanted:
                continue
            util = gpu.utilization_ratio
            energy = gpu.energy_joules_total
            out[gpu.uuid] = GpuUsage(
                utilization_percent=None if util is None else util * 100.0,
                memory_used_bytes=gpu.memory_used_bytes,
                energy_mj=None if energy is None else round(energy * 1000),
                power_watts=gpu.power_watts,
            )
        return out


class ContainerReader(Protocol):
    def read(self) -> ContainerCounters:
        """Cumulative counters of the lease's container. Blocking."""


ReaderFactory = Callable[[MeteredLease], ContainerReader]


def cgroup_reader(lease: MeteredLease) -> ContainerReader:
    return CgroupReader(lease.container_id, lease.pid)
