"""The AMD backend: AMD Instinct GPUs through AMD's own Python library, ``amdsmi``.

The same boundary as ``NvmlBackend`` (``GpuBackend``): every call goes through the
module object handed to the constructor (the real ``amdsmi`` in production,
``FakeAmdSmi`` in tests), exception classes included, so both run the same code.

Robustness rules, as for NVML (one GPU's quirk never fails the whole probe):
- ``NOT_SUPPORTED``, ``NOT_YET_IMPLEMENTED`` and ``NO_PERM`` drop that field for that
  device: logged once, never called again, listed in ``unsupported``.
- ``NOT_FOUND`` on a device that answered before means it is gone (``GpuSample.lost``);
  amdsmi has no ``GpuIsLost``.
- ``AmdSmiRetryException`` / ``AmdSmiTimeoutException`` and anything else leave the field
  ``None`` for this sample only, logged once per field and error code.
- amdsmi answers ``"N/A"`` inside its dicts where the board has no value: read as None.

UUIDs are amdsmi's, prefixed ``GPU-`` like NVIDIA's so one naming scheme runs through
labels, leases and the schema. AMD has no Xids: health comes from the sampled RAS
counters (ECC, retired pages), and GPU resets arrive as amdsmi event notifications,
reported on the Xid path as ``xid.AMD_GPU_RESET`` (degrading, counted). Blocking.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model import GpuInfo, GpuSample, XidEvent
from .nvml import NvmlUnavailable
from .xid import AMD_GPU_RESET

log = logging.getLogger(__name__)

# amdsmi_wrapper.AMDSMI_STATUS_* (read from the module's exceptions as err_code).
_NOT_SUPPORTED = 2
_NOT_YET_IMPLEMENTED = 3
_FAIL_LOAD_MODULE = 4
_NO_PERM = 10
_INIT_ERROR = 18
_TIMEOUT = 8
_NO_DATA = 40
_MAX_EVENTS_PER_WAIT = 64
_NOT_FOUND = 31
_DRIVER_NOT_LOADED = 34

_DROP_REASONS = {
    _NOT_SUPPORTED: "not_supported",
    _NOT_YET_IMPLEMENTED: "function_not_found",
    _NO_PERM: "no_permission",
}

# gfx target -> architecture family, for GpuInfo.architecture.
ARCHITECTURES = {
    "gfx908": "cdna",
    "gfx90a": "cdna2",
    "gfx940": "cdna3",
    "gfx941": "cdna3",
    "gfx942": "cdna3",
    "gfx950": "cdna4",
}

_SYSFS_PCI = Path("/sys/bus/pci/devices")


class AmdSmiUnavailable(NvmlUnavailable):
    """amdsmi cannot be used here. A ``NvmlUnavailable`` so every caller that turns an
    unusable GPU library into exit code 2 with the cause and the fix handles both."""


def unavailable_from_code(code: int | None, detail: str) -> AmdSmiUnavailable:
    if code == _DRIVER_NOT_LOADED:
        return AmdSmiUnavailable(
            "the amdgpu kernel driver is not loaded",
            "install the ROCm driver (amdgpu-dkms) and load it with `modprobe amdgpu`, "
            "then check `amd-smi list`",
        )
    if code == _NO_PERM:
        return AmdSmiUnavailable(
            "permission denied opening the AMD GPU devices (/dev/kfd, /dev/dri/renderD*)",
            "run the agent as a user in the render and video groups (install the systemd "
            "drop-in deploy/systemd/gpu-agent-amd.conf), or check the device nodes' permissions",
        )
    if code in (_FAIL_LOAD_MODULE, _INIT_ERROR):
        return AmdSmiUnavailable(
            f"amdsmi failed to initialise ({detail})",
            "install the ROCm user space (amd-smi-lib) matching the driver and check "
            "`amd-smi list`",
        )
    return AmdSmiUnavailable(
        f"amdsmi failed to initialise: {detail}", "check `amd-smi list` and the kernel log (dmesg)"
    )


def import_amdsmi() -> Any:
    """The real ``amdsmi`` module, or ``AmdSmiUnavailable`` naming what is missing."""
    import importlib

    try:
        return importlib.import_module("amdsmi")
    except ImportError:
        raise AmdSmiUnavailable(
            "the amdsmi Python module is missing",
            "install it (`pip install amdsmi`, matching the ROCm version) or use the one "
            "ROCm ships in /opt/rocm/share/amd_smi",
        ) from None
    except (OSError, KeyError) as exc:
        # amdsmi's wrapper raises KeyError at import when libamd_smi.so is not found.
        raise AmdSmiUnavailable(
            f"libamd_smi.so could not be loaded ({exc!r})",
            "install the ROCm amd-smi-lib package or set ROCM_PATH to the ROCm install",
        ) from None


def _value(raw: Any) -> Any:
    """amdsmi's "N/A" (and the empty string) as None."""
    return None if raw in ("N/A", "") else raw


def compute_capability(gfx: str) -> str | None:
    """HIP's major.minor for a gfx target: gfx942 -> "9.4", gfx90a -> "9.0"."""
    digits = gfx.removeprefix("gfx")
    if len(digits) < 3 or not digits[:-2].isdigit():
        return None
    try:
        return f"{int(digits[:-2])}.{int(digits[-2], 16)}"
    except ValueError:
        return None


class AmdSmiBackend:
    """``GpuBackend`` over amdsmi."""

    name = "amd"
    simulated = False

    def __init__(
        self,
        amdsmi: Any,
        *,
        clock: Callable[[], float] = time.time,
        sysfs_pci: Path = _SYSFS_PCI,
    ) -> None:
        self._amd = amdsmi
        self._clock = clock
        self._sysfs_pci = sysfs_pci
        self._lock = threading.Lock()
        self._opened = False
        self._handles: list[Any] = []
        self._uuids: dict[int, str] = {}
        self._dropped: dict[int, dict[str, str]] = {}
        self._warned: set[tuple[int, str, int]] = set()
        self._lost: set[int] = set()
        self._readers: list[Any] = []  # AmdSmiEventReader per GPU

    @property
    def nvml(self) -> Any:
        """The library module underneath (amdsmi here), for readers such as the collector."""
        return self._amd

    @property
    def amdsmi(self) -> Any:
        return self._amd

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        amd = self._amd
        with self._lock:
            if self._opened:
                return
            try:
                amd.amdsmi_init(amd.AmdSmiInitFlags.INIT_AMD_GPUS)
                self._handles = list(amd.amdsmi_get_processor_handles())
            except amd.AmdSmiLibraryException as exc:
                raise unavailable_from_code(getattr(exc, "err_code", None), str(exc)) from None
            except (amd.AmdSmiException, OSError) as exc:
                raise unavailable_from_code(None, str(exc)) from None
            self._opened = True

    def close(self) -> None:
        with self._lock:
            if not self._opened:
                return
            self._opened = False
            for reader in self._readers:
                # Shutting down: a failure to unsubscribe changes nothing.
                with contextlib.suppress(self._amd.AmdSmiException):
                    reader.stop()
            self._readers.clear()
            try:
                self._amd.amdsmi_shut_down()
            except self._amd.AmdSmiException as exc:
                log.debug("amdsmi_shut_down failed", extra={"error": str(exc)})

    def __enter__(self) -> AmdSmiBackend:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- field access --------------------------------------------------------------

    def dropped_fields(self, index: int) -> dict[str, str]:
        return dict(self._dropped.get(index, {}))

    def _read(self, index: int, field: str, fn_name: str, *args: Any) -> Any:
        """One amdsmi call for one field of GPU ``index``; None when unavailable.

        Raises ``_Lost`` when the device is gone."""
        dropped = self._dropped.setdefault(index, {})
        if field in dropped:
            return None
        fn = getattr(self._amd, fn_name, None)
        if fn is None:
            # An amdsmi older than the function (enumeration info arrived in 6.4).
            self._drop(index, field, "function_not_found", fn_name)
            return None
        try:
            return fn(self._handles[index], *args)
        except self._amd.AmdSmiLibraryException as exc:
            code = int(getattr(exc, "err_code", -1) or -1)
            if code == _NOT_FOUND and index in self._uuids:
                raise _Lost(index) from exc
            reason = _DROP_REASONS.get(code)
            if reason is not None:
                self._drop(index, field, reason, fn_name)
            else:
                self._warn(index, field, fn_name, code, exc)
            return None
        except self._amd.AmdSmiException as exc:
            self._warn(index, field, fn_name, -1, exc)
            return None

    def _warn(self, index: int, field: str, fn_name: str, code: int, exc: BaseException) -> None:
        if (index, field, code) not in self._warned:
            self._warned.add((index, field, code))
            log.warning(
                "amdsmi read failed; field left empty",
                extra={"gpu": index, "field": field, "call": fn_name, "error": str(exc)},
            )

    def _drop(self, index: int, field: str, reason: str, fn_name: str) -> None:
        self._dropped.setdefault(index, {})[field] = reason
        level = logging.WARNING if reason == "no_permission" else logging.INFO
        log.log(
            level,
            "GPU field unavailable; no longer read on this device",
            extra={"gpu": index, "field": field, "call": fn_name, "reason": reason},
        )

    def _log_lost(self, index: int) -> None:
        if index not in self._lost:
            self._lost.add(index)
            log.error(
                "AMD GPU is gone (amdsmi NOT_FOUND)",
                extra={"gpu": index, "uuid": self._uuids.get(index)},
            )

    # -- inventory ---------------------------------------------------------------

    def device_count(self) -> int:
        return len(self._handles)

    def driver_versions(self) -> tuple[str | None, str | None]:
        """(amdgpu driver version, ROCm version); the second slot is CUDA's on NVML."""
        driver = None
        if self._handles:
            info = self._read(0, "driver_version", "amdsmi_get_gpu_driver_info")
            driver = _value(info.get("driver_version")) if info else None
        return driver, self.rocm_version()

    def rocm_version(self) -> str | None:
        fn = getattr(self._amd, "amdsmi_get_rocm_version", None)
        if fn is None:
            return None
        try:
            ok, version = fn()
        except Exception as exc:
            log.info("ROCm version unavailable", extra={"error": str(exc)})
            return None
        return str(version) if ok else None

    def inventory(self) -> list[GpuInfo]:
        driver, rocm = self.driver_versions()
        infos = []
        for index in range(self.device_count()):
            try:
                infos.append(self._info(index, driver, rocm))
            except _Lost:
                self._log_lost(index)
                infos.append(GpuInfo.lost_gpu(index, self._uuids.get(index)))
        return infos

    def _info(self, index: int, driver: str | None, rocm: str | None) -> GpuInfo:
        amd = self._amd
        raw_uuid = self._read(index, "uuid", "amdsmi_get_gpu_device_uuid")
        if raw_uuid:
            self._uuids[index] = f"GPU-{str(raw_uuid).lower()}"
        asic = self._read(index, "asic_info", "amdsmi_get_gpu_asic_info") or {}
        bdf = self._read(index, "pci_bus_id", "amdsmi_get_gpu_device_bdf")
        total = self._read(
            index, "memory_total", "amdsmi_get_gpu_memory_total", amd.AmdSmiMemoryType.VRAM
        )
        cap = self._read(index, "power_limit", "amdsmi_get_power_cap_info") or {}
        gfx_clk = self._read(index, "max_sm_clock", "amdsmi_get_clock_info", amd.AmdSmiClkType.GFX)
        mem_clk = self._read(
            index, "max_memory_clock", "amdsmi_get_clock_info", amd.AmdSmiClkType.MEM
        )
        pcie = (self._read(index, "pcie", "amdsmi_get_pcie_info") or {}).get("pcie_static", {})
        ecc = self._read(index, "ecc_mode", "amdsmi_get_gpu_ecc_enabled")
        compute_part = self._read(index, "compute_partition", "amdsmi_get_gpu_compute_partition")
        memory_part = self._read(index, "memory_partition", "amdsmi_get_gpu_memory_partition")
        gfx = str(_value(asic.get("target_graphics_version")) or "")
        power_uw = _value(cap.get("power_cap"))
        return GpuInfo(
            index=index,
            uuid=self._uuids.get(index),
            name=_value(asic.get("market_name")),
            serial=_value(asic.get("asic_serial")),
            pci_bus_id=str(bdf) if bdf else None,
            memory_total_bytes=int(total) if total is not None else None,
            compute_capability=compute_capability(gfx) if gfx else None,
            architecture=ARCHITECTURES.get(gfx, "unknown") if gfx else None,
            driver_version=driver,
            cuda_driver_version=None,
            power_limit_watts=power_uw / 1e6 if isinstance(power_uw, int | float) else None,
            max_sm_clock_mhz=_int(gfx_clk, "max_clk"),
            max_memory_clock_mhz=_int(mem_clk, "max_clk"),
            pcie_max_generation=_int(pcie, "pcie_interface_version"),
            pcie_max_width=_int(pcie, "max_pcie_width"),
            mig_enabled=None,
            ecc_enabled=bool(ecc) if ecc is not None else None,
            simulated=False,
            unsupported=tuple(sorted(self._dropped.get(index, {}))),
            rocm_version=rocm,
            compute_partition=_value(compute_part),
            memory_partition=_value(memory_part),
            render_node=self._render_node(index, str(bdf) if bdf else None),
        )

    def _render_node(self, index: int, bdf: str | None) -> str | None:
        """/dev/dri/renderD<minor> of this GPU: from amdsmi, else from sysfs by PCI address."""
        enum = self._read(index, "render_node", "amdsmi_get_gpu_enumeration_info")
        minor = _value(enum.get("drm_render")) if enum else None
        if isinstance(minor, int):
            return f"/dev/dri/renderD{minor}"
        if bdf:
            nodes = sorted((self._sysfs_pci / bdf.lower() / "drm").glob("renderD*"))
            if nodes:
                return f"/dev/dri/{nodes[0].name}"
        return None

    # -- telemetry -----------------------------------------------------------------

    def sample_all(self) -> list[GpuSample]:
        return [self.sample(index) for index in range(self.device_count())]

    def sample(self, index: int) -> GpuSample:
        now = self._clock()
        try:
            return self._sample(index, now)
        except _Lost:
            self._log_lost(index)
            return GpuSample(index=index, uuid=self._uuids.get(index), timestamp=now, lost=True)

    def _sample(self, index: int, now: float) -> GpuSample:
        amd = self._amd
        if index not in self._uuids:
            raw = self._read(index, "uuid", "amdsmi_get_gpu_device_uuid")
            if raw:
                self._uuids[index] = f"GPU-{str(raw).lower()}"
        temp = self._read(
            index,
            "temperature",
            "amdsmi_get_temp_metric",
            amd.AmdSmiTemperatureType.HOTSPOT,
            amd.AmdSmiTemperatureMetric.CURRENT,
        )
        power = self.power_watts(index)
        activity = self._read(index, "utilization", "amdsmi_get_gpu_activity") or {}
        used = self._read(index, "memory", "amdsmi_get_gpu_memory_usage", amd.AmdSmiMemoryType.VRAM)
        total = self._read(
            index, "memory_total", "amdsmi_get_gpu_memory_total", amd.AmdSmiMemoryType.VRAM
        )
        gfx = self._read(index, "sm_clock", "amdsmi_get_clock_info", amd.AmdSmiClkType.GFX)
        mem = self._read(index, "memory_clock", "amdsmi_get_clock_info", amd.AmdSmiClkType.MEM)
        ecc = self._read(index, "ecc", "amdsmi_get_gpu_total_ecc_count") or {}
        pages = self._read(index, "retired_pages", "amdsmi_get_gpu_bad_page_info")
        util = _value(activity.get("gfx_activity"))
        return GpuSample(
            index=index,
            uuid=self._uuids.get(index),
            timestamp=now,
            temperature_celsius=float(temp) if temp is not None else None,
            power_watts=power,
            utilization_ratio=util / 100.0 if isinstance(util, int | float) else None,
            memory_used_bytes=int(used) if used is not None else None,
            memory_total_bytes=int(total) if total is not None else None,
            sm_clock_mhz=_int(gfx, "clk"),
            memory_clock_mhz=_int(mem, "clk"),
            ecc_corrected=_int(ecc, "correctable_count"),
            ecc_uncorrected=_int(ecc, "uncorrectable_count"),
            # amdsmi retires whole pages on uncorrectable errors (as NVML's page retirement).
            retired_pages_double_bit=len(pages) if pages is not None else None,
            retired_pages_pending=(
                any(p.get("status") == 1 for p in pages) if pages is not None else None
            ),
            unsupported=tuple(sorted(self._dropped.get(index, {}))),
        )

    def power_watts(self, index: int) -> float | None:
        """Socket power: the current reading on MI300, the average where that is all (MI200)."""
        info = self._read(index, "power", "amdsmi_get_power_info") or {}
        for key in ("current_socket_power", "average_socket_power"):
            value = _value(info.get(key))
            if isinstance(value, int | float):
                return float(value)
        return None

    def energy_joules(self, index: int) -> float | None:
        """The energy accumulator in joules (counts x resolution in microjoules)."""
        raw = self._read(index, "energy", "amdsmi_get_energy_count")
        if not raw:
            return None
        count, resolution = _value(raw.get("energy_accumulator")), raw.get("counter_resolution")
        if not isinstance(count, int) or not isinstance(resolution, int | float):
            return None
        return count * float(resolution) / 1e6

    def uuid_of(self, index: int) -> str | None:
        return self._uuids.get(index)

    # -- events ------------------------------------------------------------------------

    @property
    def events_available(self) -> bool:
        return bool(self._readers)

    def open_events(self) -> bool:
        """Subscribe every GPU to reset notifications; False when amdsmi cannot."""
        amd = self._amd
        kinds = getattr(amd, "AmdSmiEvtNotificationType", None)
        reader_cls = getattr(amd, "AmdSmiEventReader", None)
        if kinds is None or reader_cls is None:
            log.warning("amdsmi has no event reader; GPU resets show only in counters")
            return False
        for index, handle in enumerate(self._handles):
            try:
                self._readers.append(reader_cls(handle, [kinds.GPU_PRE_RESET]))
            except amd.AmdSmiException as exc:
                log.warning("amdsmi events unavailable on this GPU; its resets go unseen",
                            extra={"gpu": index, "error": str(exc)})  # fmt: skip
        return bool(self._readers)

    def wait_events(self, timeout: float) -> list[XidEvent]:
        """Block up to ``timeout`` s for reset notifications (one read covers every GPU)."""
        if not self._readers:
            return []
        try:
            raw = self._readers[0].read(max(int(timeout * 1000), 0), _MAX_EVENTS_PER_WAIT)
        except self._amd.AmdSmiLibraryException as exc:
            code = int(getattr(exc, "err_code", -1) or -1)
            if code not in (_NO_DATA, _TIMEOUT) and (-1, "wait", code) not in self._warned:
                self._warned.add((-1, "wait", code))
                log.warning("amdsmi event wait failed", extra={"error": str(exc)})
            return []
        except self._amd.AmdSmiException as exc:
            log.warning("amdsmi event wait failed", extra={"error": str(exc)})
            return []
        events = []
        for item in raw:
            if item.get("event") != "GPU_PRE_RESET":
                continue
            index = self._index_of(item.get("processor_handle"))
            uuid = self._uuids.get(index) if index is not None else None
            events.append(XidEvent(index=index, uuid=uuid, code=AMD_GPU_RESET,
                                   timestamp=self._clock()))  # fmt: skip
        return events

    def _index_of(self, handle: Any) -> int | None:
        # The event's handle is a new ctypes object: compare the pointer values.
        key = getattr(handle, "value", handle)
        return next((i for i, h in enumerate(self._handles) if getattr(h, "value", h) == key), None)


class _Lost(Exception):
    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(f"GPU {index} is gone")


def _int(mapping: Any, key: str) -> int | None:
    if not isinstance(mapping, dict):
        return None
    value = _value(mapping.get(key))
    return int(value) if isinstance(value, int | float) else None
