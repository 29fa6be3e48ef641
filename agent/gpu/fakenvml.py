"""A ``pynvml``-shaped fake module: per-SKU GPUs, real NVML errors, fault injection.

``FakeNvml`` answers the subset of the pynvml API the agent uses, with the same
function names and argument order, and raises the real ``pynvml.NVMLError``
subclasses (looked up through ``pynvml`` so ``except nvml.NVMLError_NotSupported``
behaves exactly as against the C library). Constants (``NVML_CLOCK_SM``,
``nvmlEventTypeXidCriticalError``...) are forwarded from ``pynvml`` itself.

It backs both the tests and the ``simulated`` backend, so the NVML code path
that runs in production also runs in demos. Thread-safe: the health monitor
waits for events in one worker thread while sampling in another.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pynvml

from .profiles import PROFILES, SkuProfile

FaultKind = Literal["xid", "ecc", "thermal", "lost"]

_UUID_NAMESPACE = uuidlib.UUID("6b3f9a5e-8f0e-4d1c-9c59-2f8d8d7f1a10")
_MIB = 1024**2
_SBE = pynvml.nvmlEventTypeSingleBitEccError
_DBE = pynvml.nvmlEventTypeDoubleBitEccError
_XID = pynvml.nvmlEventTypeXidCriticalError
_THERMAL_MASK = (
    pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
    | pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
)


def _error(code: int) -> pynvml.NVMLError:
    # NVMLError(code) returns the matching subclass (NVMLError_NotSupported...).
    return pynvml.NVMLError(code)


@dataclass(frozen=True)
class FakeHandle:
    index: int
    mig: int | None = None


@dataclass(frozen=True)
class FakeEventData:
    device: FakeHandle
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class _PciInfo:
    busId: str
    pciDeviceId: int
    domain: int
    bus: int
    device: int


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Violation:
    referenceTime: int
    violationTime: int


@dataclass
class FakeGpu:
    """The mutable state of one fake GPU; tests poke it directly or via FakeNvml."""

    index: int
    profile: SkuProfile
    uuid: str
    serial: str
    pci_bus_id: str
    utilization: float = 0.0
    lost: bool = False
    thermal: bool = False
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    remapped_correctable: int = 0
    remapped_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failed: bool = False
    energy_mj: float = 0.0
    thermal_violation_ns: int = 0
    mig_enabled: bool = False
    mig_uuids: list[str] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    no_permission: set[str] = field(default_factory=set)


@dataclass(eq=False)  # identity: two empty sets are still different sets
class _EventSet:
    registered: dict[int, int] = field(default_factory=dict)  # gpu index -> event mask
    queue: deque[FakeEventData] = field(default_factory=deque)


@dataclass(frozen=True)
class ScheduledFault:
    gpu: int
    kind: FaultKind
    due: float  # on the fake's monotonic clock
    code: int | None = None


class FakeNvml:
    """A fake ``pynvml`` module. Build it from profile keys, one per GPU."""

    def __init__(
        self,
        profiles: Iterable[str | SkuProfile],
        *,
        driver_version: str = "550.90.07",
        cuda_driver_version: int = 12040,
        missing_functions: Iterable[str] = (),
        init_error: int | None = None,
        uuid_seed: str = "fake",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._clock = clock
        self._start = clock()
        self._last_tick = self._start
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        # An older driver lacks newer entry points: pynvml raises FunctionNotFound.
        self.missing_functions = set(missing_functions)
        self.init_error = init_error
        self.calls: Counter[str] = Counter()
        self.gpus: list[FakeGpu] = []
        self._initialized = 0
        self._event_sets: list[_EventSet] = []
        self._scheduled: list[ScheduledFault] = []
        for index, item in enumerate(profiles):
            profile = PROFILES[item] if isinstance(item, str) else item
            ident = uuidlib.uuid5(_UUID_NAMESPACE, f"{uuid_seed}/{profile.key}/{index}")
            self.gpus.append(
                FakeGpu(
                    index=index,
                    profile=profile,
                    uuid=f"GPU-{ident}",
                    serial=f"1654{ident.int % 10**9:09d}",
                    pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
                    unsupported=set(profile.unsupported),
                )
            )

    # -- constants and exception classes come from the real module ---------

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML", "nvmlEventType", "nvmlClocks")):
            return getattr(pynvml, name)
        raise AttributeError(f"fake pynvml has no attribute {name!r}")

    # -- fault injection ------------------------------------------------------

    def inject_xid(self, index: int, code: int, count: int = 1) -> None:
        """Queue ``count`` Xid events for GPU ``index`` (count > 1: an Xid storm)."""
        with self._cond:
            for _ in range(count):
                self._emit(index, _XID, code)
            self._cond.notify_all()

    def inject_ecc(self, index: int, uncorrected: int = 1, corrected: int = 0) -> None:
        """Uncorrectable errors also remap a row (pending until reset) and raise Xid 48."""
        with self._cond:
            gpu = self.gpus[index]
            gpu.ecc_corrected += corrected
            if corrected:
                self._emit(index, _SBE, 0)
            if uncorrected:
                gpu.ecc_uncorrected += uncorrected
                gpu.remapped_uncorrectable += uncorrected
                gpu.remap_pending = True
                self._emit(index, _DBE, 0)
            self._cond.notify_all()

    def set_thermal(self, index: int, throttled: bool = True) -> None:
        with self._lock:
            self.gpus[index].thermal = throttled

    def lose_gpu(self, index: int) -> None:
        """The GPU falls off the bus: Xid 79, then every call on it raises GpuIsLost."""
        with self._cond:
            self._emit(index, _XID, 79)
            self.gpus[index].lost = True
            self._cond.notify_all()

    def set_utilization(self, index: int, ratio: float) -> None:
        with self._lock:
            self.gpus[index].utilization = min(max(ratio, 0.0), 1.0)

    def enable_mig(self, index: int) -> None:
        """Partition the GPU into its profile's smallest MIG slices."""
        with self._lock:
            gpu = self.gpus[index]
            if gpu.profile.mig_profile is None:
                raise ValueError(f"{gpu.profile.name} does not support MIG")
            gpu.mig_enabled = True
            gpu.mig_uuids = [
                f"MIG-{uuidlib.uuid5(_UUID_NAMESPACE, f'{gpu.uuid}/mig/{n}')}"
                for n in range(gpu.profile.mig_max_devices)
            ]

    def schedule(self, index: int, kind: FaultKind, after: float, code: int | None = None) -> None:
        """Apply a fault ``after`` seconds from this fake's creation (checked on every call)."""
        with self._cond:
            self._scheduled.append(ScheduledFault(index, kind, self._start + after, code))
            self._cond.notify_all()

    def _emit(self, index: int, event_type: int, data: int) -> None:
        for event_set in self._event_sets:
            if event_set.registered.get(index, 0) & event_type:
                event_set.queue.append(FakeEventData(FakeHandle(index), event_type, data))

    def _apply_due(self) -> None:
        now = self._clock()
        due = [f for f in self._scheduled if f.due <= now]
        if due:
            self._scheduled = [f for f in self._scheduled if f.due > now]
            for fault in due:
                if fault.kind == "xid":
                    self.inject_xid(fault.gpu, fault.code or 79)
                elif fault.kind == "ecc":
                    self.inject_ecc(fault.gpu)
                elif fault.kind == "thermal":
                    self.set_thermal(fault.gpu)
                else:
                    self.lose_gpu(fault.gpu)
        # Energy accrues with wall time, like the real counter.
        elapsed = now - self._last_tick
        self._last_tick = now
        for gpu in self.gpus:
            if not gpu.lost:
                gpu.energy_mj += self._power_mw(gpu) * elapsed
                if gpu.thermal:
                    gpu.thermal_violation_ns += int(elapsed * 1e9)

    # -- call plumbing ---------------------------------------------------------

    def _enter(self, name: str, handle: FakeHandle | None = None) -> FakeGpu | None:
        self.calls[name] += 1
        self._apply_due()
        if name in self.missing_functions:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return None
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.no_permission:
            raise _error(pynvml.NVML_ERROR_NO_PERMISSION)
        if name in gpu.unsupported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _gpu(self, name: str, handle: FakeHandle) -> FakeGpu:
        gpu = self._enter(name, handle)
        assert gpu is not None
        return gpu

    @staticmethod
    def _power_mw(gpu: FakeGpu) -> float:
        p = gpu.profile
        return (
            p.idle_power_watts + (p.power_limit_watts - p.idle_power_watts) * gpu.utilization
        ) * 1000

    # -- library ------------------------------------------------------------------

    def nvmlInit(self) -> None:
        with self._lock:
            self.calls["nvmlInit"] += 1
            if self.init_error is not None:
                raise _error(self.init_error)
            self._initialized += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            self._enter("nvmlShutdown")
            self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        with self._lock:
            self._enter("nvmlSystemGetDriverVersion")
            return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        with self._lock:
            self._enter("nvmlSystemGetCudaDriverVersion")
            return self.cuda_driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.nvmlSystemGetCudaDriverVersion()

    def nvmlDeviceGetCount(self) -> int:
        with self._lock:
            self._enter("nvmlDeviceGetCount")
            return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        with self._lock:
            self._enter("nvmlDeviceGetHandleByIndex")
            if not 0 <= index < len(self.gpus):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if self.gpus[index].lost:
                raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
            return FakeHandle(index)

    # -- identity ---------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetUUID", handle)
            return gpu.uuid if handle.mig is None else gpu.mig_uuids[handle.mig]

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetName", handle)
            if handle.mig is not None and gpu.profile.mig_profile is not None:
                return f"{gpu.profile.name} MIG {gpu.profile.mig_profile.name}"
            return gpu.profile.name

    def nvmlDeviceGetSerial(self, handle: FakeHandle) -> str:
        with self._lock:
            return self._gpu("nvmlDeviceGetSerial", handle).serial

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> _PciInfo:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetPciInfo", handle)
            bus = 0x18 + 0x10 * gpu.index
            return _PciInfo(gpu.pci_bus_id, gpu.profile.pci_device_id, 0, bus, 0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeHandle) -> tuple[int, int]:
        with self._lock:
            return self._gpu(
                "nvmlDeviceGetCudaComputeCapability", handle
            ).profile.compute_capability

    def nvmlDeviceGetArchitecture(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._gpu("nvmlDeviceGetArchitecture", handle).profile.architecture

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle)
            return int(gpu.profile.power_limit_watts * 1000)

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetPowerManagementLimit", handle)
            return int(gpu.profile.power_limit_watts * 1000)

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        with self._lock:
            p = self._gpu("nvmlDeviceGetMaxClockInfo", handle).profile
            return (
                p.max_memory_clock_mhz
                if clock_type == pynvml.NVML_CLOCK_MEM
                else p.max_sm_clock_mhz
            )

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._gpu("nvmlDeviceGetMaxPcieLinkGeneration", handle).profile.pcie_generation

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._gpu("nvmlDeviceGetMaxPcieLinkWidth", handle).profile.pcie_width

    def nvmlDeviceGetEccMode(self, handle: FakeHandle) -> list[int]:
        with self._lock:
            on = int(self._gpu("nvmlDeviceGetEccMode", handle).profile.ecc)
            return [on, on]

    # -- MIG -----------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetMigMode", handle)
            if gpu.profile.mig_profile is None:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return [int(gpu.mig_enabled), int(gpu.mig_enabled)]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle).profile.mig_max_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
            if not gpu.mig_enabled:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if index >= len(gpu.mig_uuids):
                raise _error(pynvml.NVML_ERROR_NOT_FOUND)
            return FakeHandle(gpu.index, index)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        with self._lock:
            self._gpu("nvmlDeviceGetGpuInstanceId", handle)
            if handle.mig is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            # Smallest slices sit at GPU instance ids 7..13 on A100/H100.
            return 7 + handle.mig

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeHandle) -> int:
        with self._lock:
            self._gpu("nvmlDeviceGetComputeInstanceId", handle)
            if handle.mig is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return 0

    # -- NVLink ----------------------------------------------------------------------

    def nvmlDeviceGetNvLinkState(self, handle: FakeHandle, link: int) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetNvLinkState", handle)
            if link >= gpu.profile.nvlink_links:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return int(pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: FakeHandle, link: int) -> _PciInfo:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetNvLinkRemotePciInfo", handle)
            if link >= gpu.profile.nvlink_links:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            # HGX boards wire every GPU link to an NVSwitch, not to another GPU.
            switch = link % 4
            return _PciInfo(f"00000000:{0xC0 + switch:02X}:00.0", 0x22A310DE, 0, 0xC0 + switch, 0)

    # -- telemetry ---------------------------------------------------------------------

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetTemperature", handle)
            return 92 if gpu.thermal else int(30 + 45 * gpu.utilization)

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        with self._lock:
            return int(self._power_mw(self._gpu("nvmlDeviceGetPowerUsage", handle)))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        with self._lock:
            return int(self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> _Utilization:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
            if gpu.mig_enabled:
                # Real NVML has no whole-device utilization while MIG is on.
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            pct = round(gpu.utilization * 100)
            return _Utilization(pct, pct // 2)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> _Memory:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
            if handle.mig is not None and gpu.profile.mig_profile is not None:
                total = gpu.profile.mig_profile.memory_bytes
                return _Memory(total, total - 13 * _MIB, 13 * _MIB)
            total = gpu.profile.memory_total_bytes
            used = 512 * _MIB + int((total - 1024 * _MIB) * gpu.utilization * 0.8)
            return _Memory(total, total - used, used)

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
            p = gpu.profile
            if clock_type == pynvml.NVML_CLOCK_MEM:
                return p.max_memory_clock_mhz
            scale = 0.5 if gpu.thermal else 0.3 + 0.7 * gpu.utilization
            return int(p.max_sm_clock_mhz * scale)

    def _reasons(self, name: str, handle: FakeHandle) -> int:
        gpu = self._gpu(name, handle)
        mask = 0
        if gpu.utilization == 0:
            mask |= pynvml.nvmlClocksThrottleReasonGpuIdle
        if gpu.thermal:
            mask |= _THERMAL_MASK
        return mask

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._reasons("nvmlDeviceGetCurrentClocksEventReasons", handle)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._reasons("nvmlDeviceGetCurrentClocksThrottleReasons", handle)

    def nvmlDeviceGetViolationStatus(self, handle: FakeHandle, policy: int) -> _Violation:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetViolationStatus", handle)
            ns = gpu.thermal_violation_ns if policy == 1 else 0  # 1: NVML_PERF_POLICY_THERMAL
            return _Violation(time.time_ns(), ns)

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        with self._lock:
            self._gpu("nvmlDeviceGetPcieReplayCounter", handle)
            return 0

    # -- memory errors ---------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(
        self, handle: FakeHandle, error_type: int, counter_type: int
    ) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
            if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
                return gpu.ecc_uncorrected
            return gpu.ecc_corrected

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetRemappedRows", handle)
            return (
                gpu.remapped_correctable,
                gpu.remapped_uncorrectable,
                int(gpu.remap_pending),
                int(gpu.remap_failed),
            )

    def nvmlDeviceGetRetiredPages(self, handle: FakeHandle, cause: int) -> list[int]:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetRetiredPages", handle)
            if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR:
                return [0x1000 * n for n in range(gpu.ecc_uncorrected)]
            return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeHandle) -> int:
        with self._lock:
            return int(self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", handle).remap_pending)

    # -- events ----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> _EventSet:
        with self._lock:
            self._enter("nvmlEventSetCreate")
            event_set = _EventSet()
            self._event_sets.append(event_set)
            return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        with self._lock:
            gpu = self._gpu("nvmlDeviceGetSupportedEventTypes", handle)
            return int(_XID | ((_SBE | _DBE) if gpu.profile.ecc else 0))

    def nvmlDeviceRegisterEvents(
        self, handle: FakeHandle, event_types: int, event_set: _EventSet
    ) -> None:
        with self._lock:
            self._gpu("nvmlDeviceRegisterEvents", handle)
            event_set.registered[handle.index] = (
                event_set.registered.get(handle.index, 0) | event_types
            )

    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeout_ms: int) -> FakeEventData:
        deadline = self._clock() + timeout_ms / 1000
        with self._cond:
            self._enter("nvmlEventSetWait_v2")
            while not event_set.queue:
                now = self._clock()
                if now >= deadline:
                    raise _error(pynvml.NVML_ERROR_TIMEOUT)
                wake = min([deadline] + [f.due for f in self._scheduled])
                self._cond.wait(max(wake - now, 0.0))
                self._apply_due()
            return event_set.queue.popleft()

    def nvmlEventSetWait(self, event_set: _EventSet, timeout_ms: int) -> FakeEventData:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: _EventSet) -> None:
        with self._lock:
            self._enter("nvmlEventSetFree")
            if event_set in self._event_sets:
                self._event_sets.remove(event_set)
