"""Read a ``GpuSnapshot`` through a pynvml-shaped module, one field at a time.

The module is passed in (``nvml=``) so tests and the simulated backend can hand
over a fake with the same API. Each field is read on its own: an unsupported
field (``NVMLError_NotSupported``, common on consumer cards and in VMs) or a
failing one is left out and recorded as a ``FieldError``; it never costs the
rest of the snapshot. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from .gpu_sample import FieldError, FieldErrorReason, GpuReading, GpuSnapshot, XidSource

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML's return codes (nvml.h), used when the module lacks the named constant.
_ERROR_NOT_SUPPORTED = 3
_ERROR_GPU_IS_LOST = 15

# nvmlPerfPolicyType_t values and the throttle reason each one accounts for;
# the same reasons dcgm-exporter reports as DCGM_FI_DEV_*_VIOLATION.
THROTTLE_POLICIES: dict[str, int] = {
    "power": 0,
    "thermal": 1,
    "sync_boost": 2,
    "board_limit": 3,
    "low_utilization": 4,
    "reliability": 5,
}

_NS_PER_S = 1e9


def _text(value: Any) -> str:
    # pynvml returns bytes from older bindings and str from newer ones.
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(raw: int) -> str:
    # nvmlSystemGetCudaDriverVersion encodes 12.4 as 12040.
    return f"{raw // 1000}.{(raw % 1000) // 10}"


class NvmlGpuSource:
    """``GpuSource`` over NVML. ``xids`` supplies Xid counts (NVML only has events)."""

    def __init__(self, nvml: Any, xids: XidSource | None = None) -> None:
        self._nvml = nvml
        self._xids = xids
        self._init_lock = threading.Lock()
        self._initialized = False

    def _ensure_init(self) -> None:
        # nvmlInit is reference counted by NVML, so our own call is harmless even
        # when the GPU backend initialised it too.
        with self._init_lock:
            if not self._initialized:
                self._nvml.nvmlInit()
                self._initialized = True

    def close(self) -> None:
        with self._init_lock:
            if self._initialized:
                self._initialized = False
                self._nvml.nvmlShutdown()

    def device_count(self) -> int:
        """Blocking; raises NVMLError when NVML is unusable (the readiness check)."""
        self._ensure_init()
        return int(self._nvml.nvmlDeviceGetCount())

    def _reason(self, exc: BaseException) -> FieldErrorReason:
        code = getattr(exc, "value", None)
        if code == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", _ERROR_NOT_SUPPORTED):
            return "not_supported"
        if code == getattr(self._nvml, "NVML_ERROR_GPU_IS_LOST", _ERROR_GPU_IS_LOST):
            return "gpu_lost"
        return "error"

    def _const(self, name: str, default: int) -> Any:
        return getattr(self._nvml, name, default)

    def read(self) -> GpuSnapshot:
        self._ensure_init()
        nvml = self._nvml
        errors: list[FieldError] = []

        def get(gpu: int | None, name: str, call: Callable[[], T]) -> T | None:
            try:
                return call()
            except Exception as exc:  # NVMLError and anything a broken binding raises
                reason = self._reason(exc)
                errors.append(FieldError(gpu, name, reason))
                if reason == "error":
                    log.debug("nvml read failed", extra={"gpu": gpu, "field": name, "err": exc})
                return None

        driver = get(None, "driver_version", nvml.nvmlSystemGetDriverVersion)
        cuda_raw = get(None, "cuda_version", nvml.nvmlSystemGetCudaDriverVersion)
        count = get(None, "device_count", nvml.nvmlDeviceGetCount) or 0
        readings = []
        for index in range(count):
            handle = get(index, "handle", partial(nvml.nvmlDeviceGetHandleByIndex, index))
            if handle is None:
                continue
            reading = self._read_gpu(index, handle, get)
            if reading is not None:
                readings.append(reading)
        return GpuSnapshot(
            gpus=tuple(readings),
            driver_version=_text(driver) if driver is not None else None,
            cuda_version=_cuda_version(cuda_raw) if cuda_raw is not None else None,
            field_errors=tuple(errors),
        )

    def _read_gpu(
        self, index: int, handle: Any, get: Callable[[int | None, str, Callable[[], Any]], Any]
    ) -> GpuReading | None:
        nvml = self._nvml

        def field(name: str, call: Callable[[], Any]) -> Any:
            return get(index, name, call)

        uuid_raw = field("uuid", lambda: nvml.nvmlDeviceGetUUID(handle))
        if uuid_raw is None:
            # Without a UUID the series cannot be told apart across reboots; a GPU
            # that cannot report one is lost or broken, which the error counts show.
            return None
        uuid = _text(uuid_raw)
        name = field("name", lambda: nvml.nvmlDeviceGetName(handle))
        pci = field("pci_info", lambda: nvml.nvmlDeviceGetPciInfo(handle))
        cc = field("compute_capability", lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
        util = field("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        mem = field("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        sm_clock = field(
            "sm_clock",
            lambda: nvml.nvmlDeviceGetClockInfo(handle, self._const("NVML_CLOCK_SM", 1)),
        )
        mem_clock = field(
            "memory_clock",
            lambda: nvml.nvmlDeviceGetClockInfo(handle, self._const("NVML_CLOCK_MEM", 2)),
        )
        temp = field(
            "temperature",
            lambda: nvml.nvmlDeviceGetTemperature(handle, self._const("NVML_TEMPERATURE_GPU", 0)),
        )
        power_mw = field("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = field("power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        energy_mj = field("energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        replays = field("pcie_replays", lambda: nvml.nvmlDeviceGetPcieReplayCounter(handle))

        ecc: dict[str, int] = {}
        volatile = self._const("NVML_VOLATILE_ECC", 0)
        for kind, const, default in (
            ("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0),
            ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        ):
            etype = self._const(const, default)
            value = field(
                f"ecc_{kind}",
                partial(nvml.nvmlDeviceGetTotalEccErrors, handle, etype, volatile),
            )
            if value is not None:
                ecc[kind] = int(value)

        remapped: dict[str, int] = {}
        remap_pending: bool | None = None
        remap_failed: bool | None = None
        rows = field("remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        if rows is not None:
            corr, unc, pending, failed = rows
            remapped = {"correctable": int(corr), "uncorrectable": int(unc)}
            remap_pending, remap_failed = bool(pending), bool(failed)

        throttle: dict[str, float] = {}
        for reason, policy in THROTTLE_POLICIES.items():
            status = field(
                f"throttle_{reason}",
                partial(nvml.nvmlDeviceGetViolationStatus, handle, policy),
            )
            if status is not None:
                throttle[reason] = int(status.violationTime) / _NS_PER_S

        return GpuReading(
            index=index,
            uuid=uuid,
            model=_text(name) if name is not None else "unknown",
            pci_bus_id=_text(pci.busId) if pci is not None else None,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
            utilization_ratio=util.gpu / 100.0 if util is not None else None,
            memory_utilization_ratio=util.memory / 100.0 if util is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_free_bytes=int(mem.free) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            sm_clock_hertz=sm_clock * 1e6 if sm_clock is not None else None,
            memory_clock_hertz=mem_clock * 1e6 if mem_clock is not None else None,
            temperature_celsius=float(temp) if temp is not None else None,
            power_watts=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_watts=limit_mw / 1000.0 if limit_mw is not None else None,
            energy_joules_total=energy_mj / 1000.0 if energy_mj is not None else None,
            pcie_replays_total=int(replays) if replays is not None else None,
            ecc_errors_total=ecc,
            remapped_rows=remapped,
            row_remap_pending=remap_pending,
            row_remap_failed=remap_failed,
            throttle_seconds_total=throttle,
            xid_errors_total=self._xids.counts(uuid) if self._xids else {},
            xid_last_timestamp_seconds=self._xids.last_timestamp(uuid) if self._xids else None,
        )
