"""What the GPU collector reads: one snapshot of every GPU, and where it comes from.

A field is ``None`` (or missing from a mapping) when the GPU does not support it
or reading it failed; the reason lands in ``GpuSnapshot.field_errors`` so the
scrape still succeeds and the failure is counted, never raised.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

FieldErrorReason = Literal["not_supported", "error", "gpu_lost", "timeout"]


@dataclass(frozen=True)
class FieldError:
    """One field that could not be read during one snapshot."""

    gpu: int | None  # None when the failure is not tied to one GPU (driver version...)
    field: str
    reason: FieldErrorReason


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant, in base units."""

    index: int
    uuid: str
    model: str
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules_total: float | None = None
    pcie_replays_total: int | None = None
    # type ("corrected" / "uncorrected") -> count since the driver loaded
    ecc_errors_total: Mapping[str, int] = field(default_factory=dict)
    # kind ("correctable" / "uncorrectable") -> rows remapped
    remapped_rows: Mapping[str, int] = field(default_factory=dict)
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None
    # reason ("power", "thermal", ...) -> seconds spent throttled
    throttle_seconds_total: Mapping[str, float] = field(default_factory=dict)
    # Xid code -> occurrences seen by this agent process
    xid_errors_total: Mapping[int, int] = field(default_factory=dict)
    xid_last_timestamp_seconds: float | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[GpuReading, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    field_errors: tuple[FieldError, ...] = ()


class GpuSource(Protocol):
    """Where GPU readings come from. ``read`` blocks (NVML) and may hang or raise;
    the collector calls it in a worker thread under a deadline."""

    def read(self) -> GpuSnapshot: ...


class XidSource(Protocol):
    """Xid counts per GPU UUID; ``XidCounter`` is one, the health monitor may be another."""

    def counts(self, uuid: str) -> dict[int, int]: ...

    def last_timestamp(self, uuid: str) -> float | None: ...


class XidCounter:
    """Xid events per GPU, fed by whoever watches NVML's event set.

    NVML only reports Xids as events (there is no counter to read), so the
    health monitor records them here as they arrive and the collector reads
    the counts at scrape time. Thread-safe: events come from a worker thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, int]] = {}
        self._last: dict[str, float] = {}

    def record(self, uuid: str, xid: int, timestamp: float) -> None:
        with self._lock:
            per_gpu = self._counts.setdefault(uuid, {})
            per_gpu[xid] = per_gpu.get(xid, 0) + 1
            self._last[uuid] = max(timestamp, self._last.get(uuid, timestamp))

    def counts(self, uuid: str) -> dict[int, int]:
        with self._lock:
            return dict(self._counts.get(uuid, {}))

    def last_timestamp(self, uuid: str) -> float | None:
        with self._lock:
            return self._last.get(uuid)
