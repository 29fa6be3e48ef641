"""The NVML backend: inventory, telemetry and Xid events through a pynvml-shaped module.

Every call goes through the module object handed to the constructor (the real
``pynvml`` in production, ``FakeNvml`` in tests and the simulated backend), and
so do the exception classes, so both run the same code.

Robustness rules (one GPU's quirk never fails the whole probe):
- ``NotSupported``, ``FunctionNotFound`` (older driver) and ``NoPermission``
  drop that field for that device: logged once, never called again, listed in
  the result's ``unsupported``.
- ``GpuIsLost`` turns the device into a lost one (``GpuSample.lost``).
- anything else leaves the field ``None`` for this sample and is logged once per
  field and error code, since a flapping error would otherwise flood the log.

All methods block: the daemon calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .model import GpuInfo, GpuSample, MigDevice, NvLinkPeer, XidEvent

log = logging.getLogger(__name__)

# nvml.h return codes; read from the module when it has them.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_DRIVER_NOT_LOADED = 9
_TIMEOUT = 10
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_LIB_RM_VERSION_MISMATCH = 18

_DROP_REASONS = {
    _NOT_SUPPORTED: "not_supported",
    _FUNCTION_NOT_FOUND: "function_not_found",
    _NO_PERMISSION: "no_permission",
}

ARCHITECTURES = {
    2: "kepler",
    3: "maxwell",
    4: "pascal",
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
}

# nvmlClocksEventReason* bits (nvml.h) and the names the agent reports.
THROTTLE_BITS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal",
    0x040: "hw_thermal",
    0x080: "hw_power_brake",
    0x100: "display_clocks",
}

_EVENT_XID = 0x08  # nvmlEventTypeXidCriticalError
_EVENT_DBE = 0x02  # nvmlEventTypeDoubleBitEccError
_XID_FOR_DBE = 48  # the driver logs a double-bit ECC error as Xid 48
_MAX_EVENTS_PER_WAIT = 256  # an Xid storm is drained in bounded batches
_NVLINK_MAX_LINKS = 18


class NvmlUnavailable(Exception):
    """NVML cannot be used on this host; ``cause`` and ``fix`` are for people."""

    def __init__(self, cause: str, fix: str) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}. Fix: {fix}")


class GpuLost(Exception):
    """NVML answered GpuIsLost: the GPU fell off the bus."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(f"GPU {index} is lost")


def unavailable_from_code(code: int | None, detail: str) -> NvmlUnavailable:
    """Map an ``nvmlInit`` failure to the cause and the fix an operator needs."""
    if code == _LIBRARY_NOT_FOUND:
        return NvmlUnavailable(
            "NVML library not found (libnvidia-ml.so.1): the NVIDIA driver is not installed",
            "install the NVIDIA driver (e.g. `apt install nvidia-driver-550`) and check "
            "`nvidia-smi`; for a machine without GPUs set gpu.backend: simulated",
        )
    if code == _DRIVER_NOT_LOADED:
        return NvmlUnavailable(
            "the NVIDIA kernel driver is not loaded",
            "load it with `modprobe nvidia` (or reboot after installing the driver) "
            "and check `nvidia-smi`",
        )
    if code == _NO_PERMISSION:
        return NvmlUnavailable(
            "permission denied opening the NVIDIA devices (/dev/nvidia*)",
            "run the agent as a user that can open /dev/nvidiactl and /dev/nvidia* "
            "(the packaged systemd unit does), or check the device nodes' permissions",
        )
    if code == _LIB_RM_VERSION_MISMATCH:
        return NvmlUnavailable(
            "the NVML library and the loaded kernel driver are different versions",
            "reboot (or reload the nvidia modules) after the driver upgrade",
        )
    return NvmlUnavailable(
        f"NVML failed to initialise: {detail}", "check `nvidia-smi` and the kernel log (dmesg)"
    )


def _text(value: Any) -> str:
    # pynvml returns bytes from older bindings and str from newer ones.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """``GpuBackend`` over NVML. ``simulated`` only labels what it reports."""

    def __init__(
        self, nvml: Any, *, simulated: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self._nvml = nvml
        self.simulated = simulated
        self.name = "simulated" if simulated else "nvml"
        self._clock = clock
        self._lock = threading.Lock()
        self._opened = False
        self._handles: dict[int, Any] = {}
        self._uuids: dict[int, str] = {}
        self._mig: dict[int, bool] = {}
        # index -> field -> why it is dropped (cached so it is never called again)
        self._dropped: dict[int, dict[str, str]] = {}
        self._warned: set[tuple[int, str, int]] = set()
        self._event_set: Any = None
        self._lost_logged: set[int] = set()

    @property
    def nvml(self) -> Any:
        """The pynvml-shaped module, for other readers (the metrics collector)."""
        return self._nvml

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """``nvmlInit``; raises ``NvmlUnavailable`` with the cause and the fix."""
        with self._lock:
            if self._opened:
                return
            try:
                self._nvml.nvmlInit()
            except self._nvml.NVMLError as exc:
                raise unavailable_from_code(getattr(exc, "value", None), str(exc)) from None
            except OSError as exc:
                raise unavailable_from_code(None, str(exc)) from None
            self._opened = True

    def close(self) -> None:
        with self._lock:
            if not self._opened:
                return
            self._opened = False
            if self._event_set is not None:
                # Shutting down: a failure to free the set changes nothing.
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlEventSetFree(self._event_set)
                self._event_set = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed", extra={"error": str(exc)})

    def __enter__(self) -> NvmlBackend:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- field access ------------------------------------------------------------

    def dropped_fields(self, index: int) -> dict[str, str]:
        return dict(self._dropped.get(index, {}))

    def _code(self, exc: BaseException) -> int:
        value = getattr(exc, "value", -1)
        return value if isinstance(value, int) else -1

    def _read(self, index: int, field: str, fn_name: str, *args: Any) -> Any:
        """One NVML call for one field of GPU ``index``; None when unavailable."""
        dropped = self._dropped.setdefault(index, {})
        if field in dropped:
            return None
        fn = getattr(self._nvml, fn_name, None)
        if fn is None:
            # A pynvml older than the function: the same as the driver lacking it.
            self._drop(index, field, "function_not_found", fn_name)
            return None
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            code = self._code(exc)
            if code == _GPU_IS_LOST:
                raise GpuLost(index) from exc
            reason = _DROP_REASONS.get(code)
            if reason is not None:
                self._drop(index, field, reason, fn_name)
            elif (index, field, code) not in self._warned:
                self._warned.add((index, field, code))
                log.warning(
                    "NVML read failed; field left empty",
                    extra={"gpu": index, "field": field, "call": fn_name, "error": str(exc)},
                )
            return None

    def _drop(self, index: int, field: str, reason: str, fn_name: str) -> None:
        self._dropped.setdefault(index, {})[field] = reason
        level = logging.WARNING if reason == "no_permission" else logging.INFO
        log.log(
            level,
            "GPU field unavailable; no longer read on this device",
            extra={"gpu": index, "field": field, "call": fn_name, "reason": reason},
        )

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            except self._nvml.NVMLError as exc:
                if self._code(exc) == _GPU_IS_LOST:
                    raise GpuLost(index) from exc
                raise
            self._handles[index] = handle
        return handle

    def _system(self, fn_name: str) -> Any:
        try:
            return getattr(self._nvml, fn_name)()
        except (self._nvml.NVMLError, AttributeError) as exc:
            log.info("NVML system field unavailable", extra={"call": fn_name, "error": str(exc)})
            return None

    # -- inventory -------------------------------------------------------------

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def driver_versions(self) -> tuple[str | None, str | None]:
        driver = self._system("nvmlSystemGetDriverVersion")
        cuda = self._system("nvmlSystemGetCudaDriverVersion")
        cuda_text = f"{cuda // 1000}.{(cuda % 1000) // 10}" if isinstance(cuda, int) else None
        return (_text(driver) if driver is not None else None, cuda_text)

    def inventory(self) -> list[GpuInfo]:
        """Every GPU's static facts. A lost GPU is listed with ``lost=True``."""
        driver, cuda = self.driver_versions()
        infos = []
        for index in range(self.device_count()):
            try:
                infos.append(self._info(index, driver, cuda))
            except GpuLost:
                self._log_lost(index)
                infos.append(
                    GpuInfo.lost_gpu(index, self._uuids.get(index), simulated=self.simulated)
                )
        bus_to_uuid = {i.pci_bus_id: i.uuid for i in infos if i.pci_bus_id and i.uuid}
        # NVLink peers can only be named once every GPU's bus id is known.
        return [
            _with_peer_uuids(info, bus_to_uuid) if info.nvlink_peers else info for info in infos
        ]

    def _info(self, index: int, driver: str | None, cuda: str | None) -> GpuInfo:
        h = self._handle(index)
        nvml = self._nvml
        uuid = self._read(index, "uuid", "nvmlDeviceGetUUID", h)
        if uuid is not None:
            self._uuids[index] = _text(uuid)
        name = self._read(index, "name", "nvmlDeviceGetName", h)
        serial = self._read(index, "serial", "nvmlDeviceGetSerial", h)
        pci = self._read(index, "pci_bus_id", "nvmlDeviceGetPciInfo", h)
        mem = self._read(index, "memory_total", "nvmlDeviceGetMemoryInfo", h)
        cc = self._read(index, "compute_capability", "nvmlDeviceGetCudaComputeCapability", h)
        arch = self._read(index, "architecture", "nvmlDeviceGetArchitecture", h)
        limit_mw = self._read(index, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h)
        sm_clock = self._read(
            index, "max_sm_clock", "nvmlDeviceGetMaxClockInfo", h, nvml.NVML_CLOCK_SM
        )
        mem_clock = self._read(
            index, "max_memory_clock", "nvmlDeviceGetMaxClockInfo", h, nvml.NVML_CLOCK_MEM
        )
        gen = self._read(index, "pcie_generation", "nvmlDeviceGetMaxPcieLinkGeneration", h)
        width = self._read(index, "pcie_width", "nvmlDeviceGetMaxPcieLinkWidth", h)
        ecc = self._read(index, "ecc_mode", "nvmlDeviceGetEccMode", h)
        mig_enabled = self._mig_mode(index)
        return GpuInfo(
            index=index,
            uuid=self._uuids.get(index),
            name=_text(name) if name is not None else None,
            serial=_text(serial) if serial is not None else None,
            pci_bus_id=_text(pci.busId) if pci is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
            architecture=ARCHITECTURES.get(arch, "unknown") if arch is not None else None,
            driver_version=driver,
            cuda_driver_version=cuda,
            power_limit_watts=limit_mw / 1000.0 if limit_mw is not None else None,
            max_sm_clock_mhz=int(sm_clock) if sm_clock is not None else None,
            max_memory_clock_mhz=int(mem_clock) if mem_clock is not None else None,
            pcie_max_generation=int(gen) if gen is not None else None,
            pcie_max_width=int(width) if width is not None else None,
            mig_enabled=mig_enabled,
            mig_devices=self._mig_devices(index, h) if mig_enabled else (),
            ecc_enabled=bool(ecc[0]) if ecc is not None else None,
            nvlink_peers=self._nvlink_peers(index, h),
            simulated=self.simulated,
            unsupported=tuple(sorted(self._dropped.get(index, {}))),
        )

    def _mig_mode(self, index: int) -> bool | None:
        if index not in self._mig:
            mode = self._read(index, "mig_mode", "nvmlDeviceGetMigMode", self._handle(index))
            if mode is None:
                return None
            self._mig[index] = bool(mode[0])
        return self._mig[index]

    def _mig_devices(self, index: int, h: Any) -> tuple[MigDevice, ...]:
        nvml = self._nvml
        count = self._read(index, "mig_devices", "nvmlDeviceGetMaxMigDeviceCount", h) or 0
        devices = []
        for slot in range(count):
            try:
                mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except nvml.NVMLError as exc:
                if self._code(exc) == _GPU_IS_LOST:
                    raise GpuLost(index) from exc
                continue  # NotFound: an empty slot, normal on a partly partitioned GPU
            try:
                name = _text(nvml.nvmlDeviceGetName(mh))
                mem = nvml.nvmlDeviceGetMemoryInfo(mh)
                gi = nvml.nvmlDeviceGetGpuInstanceId(mh)
                ci = nvml.nvmlDeviceGetComputeInstanceId(mh)
                devices.append(
                    MigDevice(
                        uuid=_text(nvml.nvmlDeviceGetUUID(mh)),
                        # NVML names a MIG device "<GPU name> MIG <profile>".
                        profile=name.rsplit(" MIG ", 1)[-1] if " MIG " in name else name,
                        memory_total_bytes=int(mem.total),
                        gpu_instance_id=int(gi),
                        compute_instance_id=int(ci),
                    )
                )
            except nvml.NVMLError as exc:
                if self._code(exc) == _GPU_IS_LOST:
                    raise GpuLost(index) from exc
                log.warning(
                    "MIG device unreadable; skipped",
                    extra={"gpu": index, "slot": slot, "error": str(exc)},
                )
        return tuple(devices)

    def _nvlink_peers(self, index: int, h: Any) -> tuple[NvLinkPeer, ...]:
        nvml = self._nvml
        links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", _NVLINK_MAX_LINKS)
        peers = []
        for link in range(links):
            if "nvlink" in self._dropped.get(index, {}):
                break
            try:
                state = nvml.nvmlDeviceGetNvLinkState(h, link)
            except nvml.NVMLError as exc:
                code = self._code(exc)
                if code == _GPU_IS_LOST:
                    raise GpuLost(index) from exc
                if link == 0 and code in _DROP_REASONS:
                    self._drop(index, "nvlink", _DROP_REASONS[code], "nvmlDeviceGetNvLinkState")
                break  # InvalidArgument past the last link this GPU has
            if state != getattr(nvml, "NVML_FEATURE_ENABLED", 1):
                continue
            pci = self._read(index, "nvlink_remote", "nvmlDeviceGetNvLinkRemotePciInfo", h, link)
            if pci is not None:
                peers.append(NvLinkPeer(link, _text(pci.busId), None))
        return tuple(peers)

    # -- telemetry -----------------------------------------------------------------

    def sample_all(self) -> list[GpuSample]:
        return [self.sample(index) for index in range(self.device_count())]

    def sample(self, index: int) -> GpuSample:
        """One GPU's telemetry; a lost GPU gives ``lost=True``, never an exception."""
        now = self._clock()
        try:
            return self._sample(index, now)
        except GpuLost:
            self._log_lost(index)
            return GpuSample(index=index, uuid=self._uuids.get(index), timestamp=now, lost=True)

    def _log_lost(self, index: int) -> None:
        if index not in self._lost_logged:
            self._lost_logged.add(index)
            log.error(
                "GPU is lost (NVML GpuIsLost): fallen off the bus",
                extra={"gpu": index, "uuid": self._uuids.get(index)},
            )

    def _sample(self, index: int, now: float) -> GpuSample:
        nvml = self._nvml
        h = self._handle(index)
        if index not in self._uuids:
            uuid = self._read(index, "uuid", "nvmlDeviceGetUUID", h)
            if uuid is not None:
                self._uuids[index] = _text(uuid)
        temp = self._read(
            index, "temperature", "nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU
        )
        power = self._read(index, "power", "nvmlDeviceGetPowerUsage", h)
        util = None
        mig = self._mig_mode(index)
        if not mig:
            # MIG-enabled GPUs have no whole-device utilization (NVML says NotSupported).
            util = self._read(index, "utilization", "nvmlDeviceGetUtilizationRates", h)
        mem = self._read(index, "memory", "nvmlDeviceGetMemoryInfo", h)
        sm = self._read(index, "sm_clock", "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM)
        mclk = self._read(index, "memory_clock", "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_MEM)
        reasons = self._read(index, "throttle_reasons", "nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None and "throttle_reasons" in self._dropped.get(index, {}):
            # Drivers before 535 only have the older name for the same bitmask.
            reasons = self._read(
                index, "throttle_reasons_legacy", "nvmlDeviceGetCurrentClocksThrottleReasons", h
            )
        volatile = nvml.NVML_VOLATILE_ECC
        ecc_corr = self._read(
            index,
            "ecc_corrected",
            "nvmlDeviceGetTotalEccErrors",
            h,
            nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            volatile,
        )
        ecc_unc = self._read(
            index,
            "ecc_uncorrected",
            "nvmlDeviceGetTotalEccErrors",
            h,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            volatile,
        )
        rows = self._read(index, "remapped_rows", "nvmlDeviceGetRemappedRows", h)
        sbe_pages = self._read(
            index,
            "retired_pages",
            "nvmlDeviceGetRetiredPages",
            h,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        )
        dbe_pages = self._read(
            index,
            "retired_pages",
            "nvmlDeviceGetRetiredPages",
            h,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        )
        pages_pending = self._read(
            index, "retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus", h
        )
        unsupported = set(self._dropped.get(index, {}))
        if mig:
            unsupported.add("utilization")
        return GpuSample(
            index=index,
            uuid=self._uuids.get(index),
            timestamp=now,
            temperature_celsius=float(temp) if temp is not None else None,
            power_watts=power / 1000.0 if power is not None else None,
            utilization_ratio=util.gpu / 100.0 if util is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            sm_clock_mhz=int(sm) if sm is not None else None,
            memory_clock_mhz=int(mclk) if mclk is not None else None,
            throttle_reasons=_throttle_names(reasons) if reasons is not None else (),
            ecc_corrected=int(ecc_corr) if ecc_corr is not None else None,
            ecc_uncorrected=int(ecc_unc) if ecc_unc is not None else None,
            remapped_rows_correctable=int(rows[0]) if rows is not None else None,
            remapped_rows_uncorrectable=int(rows[1]) if rows is not None else None,
            row_remap_pending=bool(rows[2]) if rows is not None else None,
            row_remap_failed=bool(rows[3]) if rows is not None else None,
            retired_pages_single_bit=len(sbe_pages) if sbe_pages is not None else None,
            retired_pages_double_bit=len(dbe_pages) if dbe_pages is not None else None,
            retired_pages_pending=bool(pages_pending) if pages_pending is not None else None,
            unsupported=tuple(sorted(unsupported)),
        )

    # -- Xid events -------------------------------------------------------------------

    @property
    def events_available(self) -> bool:
        return self._event_set is not None

    def open_events(self) -> bool:
        """Register every GPU for Xid and double-bit ECC events; False when NVML cannot."""
        nvml = self._nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as exc:
            log.warning("NVML events unavailable; Xids go unseen", extra={"error": str(exc)})
            return False
        wanted = getattr(nvml, "nvmlEventTypeXidCriticalError", _EVENT_XID) | getattr(
            nvml, "nvmlEventTypeDoubleBitEccError", _EVENT_DBE
        )
        for index in range(self.device_count()):
            try:
                h = self._handle(index)
                supported = self._read(index, "events", "nvmlDeviceGetSupportedEventTypes", h)
                mask = wanted & (supported if supported is not None else _EVENT_XID)
                if mask:
                    self._read(
                        index, "events", "nvmlDeviceRegisterEvents", h, mask, self._event_set
                    )
            except GpuLost:
                self._log_lost(index)
        return True

    def wait_events(self, timeout: float) -> list[XidEvent]:
        """Block up to ``timeout`` seconds for events, then drain what queued behind them."""
        nvml = self._nvml
        if self._event_set is None:
            return []
        events: list[XidEvent] = []
        wait_ms = max(int(timeout * 1000), 0)
        while len(events) < _MAX_EVENTS_PER_WAIT:
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, wait_ms)
            except nvml.NVMLError as exc:
                code = self._code(exc)
                if code not in (_TIMEOUT, _GPU_IS_LOST) and (-1, "wait", code) not in self._warned:
                    self._warned.add((-1, "wait", code))
                    log.warning("NVML event wait failed", extra={"error": str(exc)})
                break
            events.append(self._event(data))
            wait_ms = 0  # drain whatever else is already queued, without waiting
        return events

    def _event(self, data: Any) -> XidEvent:
        index = next((i for i, h in self._handles.items() if h == data.device), None)
        uuid = self._uuids.get(index) if index is not None else None
        if index is None:
            try:
                uuid = _text(self._nvml.nvmlDeviceGetUUID(data.device))
                index = next((i for i, u in self._uuids.items() if u == uuid), None)
            except self._nvml.NVMLError:
                pass  # a lost GPU cannot name itself; the event still counts
        dbe = getattr(self._nvml, "nvmlEventTypeDoubleBitEccError", _EVENT_DBE)
        code = _XID_FOR_DBE if data.eventType == dbe else int(data.eventData)
        return XidEvent(index=index, uuid=uuid, code=code, timestamp=self._clock())


def _throttle_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_BITS.items() if mask & bit)


def _with_peer_uuids(info: GpuInfo, bus_to_uuid: Mapping[str, str | None]) -> GpuInfo:
    peers = tuple(
        replace(p, peer_uuid=bus_to_uuid.get(p.peer_pci_bus_id)) for p in info.nvlink_peers
    )
    return replace(info, nvlink_peers=peers)
