"""A fake ``amdsmi`` module: AMD's Python API, shaped as amdsmi 6.x/7.x ships it.

The agent's AMD backend only ever calls what this module offers, with the same
names, arguments, enums (same values), exception classes (``AmdSmiException`` >
``AmdSmiLibraryException(err_code)`` > ``AmdSmiRetryException`` /
``AmdSmiTimeoutException``; ``AmdSmiParameterException``) and return shapes
(dicts with the same keys; ``"N/A"`` where the library has no value), read from
amdsmi 7.0.2's ``amdsmi_interface.py``. Units are amdsmi's: power caps in
microwatts, socket power in watts, the energy accumulator in counts of
``counter_resolution`` microjoules, memory in bytes, clocks in MHz.

Fault injection: ``inject_ecc``, ``inject_reset`` (GPU_PRE/POST_RESET notifications),
``lose`` (the device answers NOT_FOUND, as amdsmi
does once a GPU is gone), ``unsupported`` per function, ``init_error``, and
``retry_once`` (the next call of that function raises ``AmdSmiRetryException``).
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .amd_profiles import AMD_PROFILES, AmdProfile

_UUID_NAMESPACE = uuidlib.UUID("7f3a4c58-7b9e-4a7c-9a59-3c3b9f2f0a11")

# amdsmi_wrapper.AMDSMI_STATUS_* values.
AMDSMI_STATUS_SUCCESS = 0
AMDSMI_STATUS_INVAL = 1
AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_NOT_YET_IMPLEMENTED = 3
AMDSMI_STATUS_FAIL_LOAD_MODULE = 4
AMDSMI_STATUS_TIMEOUT = 8
AMDSMI_STATUS_RETRY = 9
AMDSMI_STATUS_NO_PERM = 10
AMDSMI_STATUS_INIT_ERROR = 18
AMDSMI_STATUS_NOT_FOUND = 31
AMDSMI_STATUS_NOT_INIT = 32
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34


class AmdSmiException(Exception):
    """Base smi exception class"""


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code

    def get_error_code(self) -> int:
        return self.err_code

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | fake amdsmi"


class AmdSmiRetryException(AmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(AMDSMI_STATUS_RETRY)


class AmdSmiTimeoutException(AmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(AMDSMI_STATUS_TIMEOUT)


class AmdSmiParameterException(AmdSmiException):
    def __init__(self, received: object, expected: object, msg: str | None = None) -> None:
        super().__init__(msg)
        self.err_code = None
        self.actualType = type(received)
        self.expectedType = expected


class AmdSmiInitFlags(IntEnum):
    INIT_ALL_PROCESSORS = 4294967295
    INIT_AMD_GPUS = 2


class AmdSmiMemoryType(IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


class AmdSmiTemperatureType(IntEnum):
    EDGE = 0
    HOTSPOT = 1
    VRAM = 2


class AmdSmiTemperatureMetric(IntEnum):
    CURRENT = 0
    MAX = 1
    CRITICAL = 5


class AmdSmiClkType(IntEnum):
    SYS = 0
    GFX = 0
    MEM = 4


class AmdSmiEvtNotificationType(IntEnum):
    NONE = 0
    VMFAULT = 1
    THERMAL_THROTTLE = 2
    GPU_PRE_RESET = 3
    GPU_POST_RESET = 4


AMDSMI_STATUS_NO_DATA = 40


@dataclass
class FakeAmdGpu:
    index: int
    profile: AmdProfile
    uuid: str
    bdf: str
    serial: str
    render_minor: int
    memory_used: int = 0
    ecc_correctable: int = 0
    ecc_uncorrectable: int = 0
    bad_pages: list[dict[str, int]] = field(default_factory=list)
    lost: bool = False
    busy: float = 0.0  # 0..1, drives activity, power and energy
    energy_uj: float = 0.0


@dataclass(frozen=True)
class _Handle:
    """Stands for amdsmi's ``amdsmi_processor_handle`` (an opaque ctypes pointer)."""

    index: int


class _EventReader:
    """amdsmi's ``AmdSmiEventReader``: per-GPU registration, one global queue read."""

    def __init__(self, fake: FakeAmdSmi, handle: Any, event_types: list[IntEnum]) -> None:
        gpu = fake._gpu("amdsmi_init_gpu_event_notification", handle)
        self._fake = fake
        self._index = gpu.index
        fake._subscribed[gpu.index] = {int(t) for t in event_types}

    def read(self, timestamp: int, num_elem: int = 10) -> list[dict[str, Any]]:
        """Events of every subscribed GPU, waiting up to ``timestamp`` ms for the first;
        ``AMDSMI_STATUS_NO_DATA`` when none came, as the library answers."""
        fake = self._fake
        with fake._events_ready:
            if not fake._events:
                fake._events_ready.wait(timestamp / 1000)
            if not fake._events:
                raise AmdSmiLibraryException(AMDSMI_STATUS_NO_DATA)
            out: list[dict[str, Any]] = []
            while fake._events and len(out) < num_elem:
                index, kind = fake._events.pop(0)
                out.append({"processor_handle": _Handle(index),
                            "event": AmdSmiEvtNotificationType(kind).name,
                            "message": f"fake event on GPU {index}"})  # fmt: skip
            return out

    def stop(self) -> None:
        self._fake.calls["amdsmi_stop_gpu_event_notification"] += 1
        self._fake._subscribed.pop(self._index, None)


class FakeAmdSmi:
    """A fake ``amdsmi`` module. Build it from AMD profile keys, one per GPU."""

    # The real module's classes, as attributes, as ``import amdsmi`` exposes them.
    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiRetryException = AmdSmiRetryException
    AmdSmiTimeoutException = AmdSmiTimeoutException
    AmdSmiParameterException = AmdSmiParameterException
    AmdSmiInitFlags = AmdSmiInitFlags
    AmdSmiMemoryType = AmdSmiMemoryType
    AmdSmiTemperatureType = AmdSmiTemperatureType
    AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
    AmdSmiClkType = AmdSmiClkType
    AmdSmiEvtNotificationType = AmdSmiEvtNotificationType

    def __init__(
        self,
        profiles: Iterable[str | AmdProfile],
        *,
        driver_version: str = "6.8.5",
        rocm_version: str | None = "6.4.1",
        init_error: int | None = None,
        uuid_seed: str = "fake",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._last_tick = clock()
        self.driver_version = driver_version
        self.rocm_version = rocm_version
        self.init_error = init_error
        self.unsupported: set[str] = set()
        self.retry_once: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.initialized = 0
        self.gpus: list[FakeAmdGpu] = []
        self._subscribed: dict[int, set[int]] = {}
        self._events: list[tuple[int, int]] = []
        self._events_ready = threading.Condition(self._lock)
        for index, item in enumerate(profiles):
            profile = AMD_PROFILES[item] if isinstance(item, str) else item
            ident = uuidlib.uuid5(_UUID_NAMESPACE, f"{uuid_seed}/{profile.key}/{index}")
            self.gpus.append(
                FakeAmdGpu(
                    index=index,
                    profile=profile,
                    # amdsmi's UUID: the device id in the first group, as on real boards.
                    uuid=f"{profile.device_id:04x}{str(ident)[4:]}",
                    bdf=f"0000:{0x05 + 0x10 * index:02x}:00.0",
                    serial=f"0x{ident.int % 16**16:016X}",
                    render_minor=128 + index,
                )
            )

    # -- fault injection ---------------------------------------------------------

    def inject_ecc(self, index: int, uncorrectable: int = 1, correctable: int = 0) -> None:
        """An uncorrectable error also retires a page (pending until the driver reloads)."""
        with self._lock:
            gpu = self.gpus[index]
            gpu.ecc_correctable += correctable
            gpu.ecc_uncorrectable += uncorrectable
            for _ in range(uncorrectable):
                gpu.bad_pages.append(
                    {"value": len(gpu.bad_pages), "page_address": 0x1000 * len(gpu.bad_pages),
                     "page_size": 4096, "status": 1}  # AMDSMI_MEM_PAGE_STATUS_PENDING
                )  # fmt: skip

    def inject_reset(self, index: int) -> None:
        """The driver resets GPU ``index``: pre- and post-reset events for subscribers."""
        with self._events_ready:
            for kind in (AmdSmiEvtNotificationType.GPU_PRE_RESET,
                         AmdSmiEvtNotificationType.GPU_POST_RESET):  # fmt: skip
                if kind in self._subscribed.get(index, set()):
                    self._events.append((index, int(kind)))
            self._events_ready.notify_all()

    def AmdSmiEventReader(self, handle: Any, event_types: list[IntEnum]) -> _EventReader:
        """amdsmi's class of that name (a method here, so readers reach this fake)."""
        return _EventReader(self, handle, event_types)

    def lose(self, index: int) -> None:
        with self._lock:
            self.gpus[index].lost = True

    def set_busy(self, index: int, busy: float, memory_used: int | None = None) -> None:
        with self._lock:
            self._tick()
            self.gpus[index].busy = busy
            if memory_used is not None:
                self.gpus[index].memory_used = memory_used

    # -- plumbing -------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._last_tick)
        self._last_tick = now
        for gpu in self.gpus:
            gpu.energy_uj += self._power_w(gpu) * dt * 1e6

    @staticmethod
    def _power_w(gpu: FakeAmdGpu) -> float:
        p = gpu.profile
        return p.idle_power_watts + gpu.busy * (p.sku.tdp_watts - p.idle_power_watts)

    def _enter(self, fn: str, handle: Any = None) -> FakeAmdGpu | None:
        self.calls[fn] += 1
        if not self.initialized:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT)
        if fn in self.retry_once:
            self.retry_once.discard(fn)
            raise AmdSmiRetryException()
        if handle is None:
            return None
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise AmdSmiParameterException(handle, _Handle)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_FOUND)
        if fn in self.unsupported or fn in gpu.profile.unsupported:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        self._tick()
        return gpu

    def _gpu(self, fn: str, handle: Any) -> FakeAmdGpu:
        gpu = self._enter(fn, handle)
        assert gpu is not None
        return gpu

    # -- lifecycle ---------------------------------------------------------------------

    def amdsmi_init(self, flag: IntEnum = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
        self.calls["amdsmi_init"] += 1
        if not isinstance(flag, AmdSmiInitFlags):
            raise AmdSmiParameterException(flag, AmdSmiInitFlags)
        if self.init_error is not None:
            raise AmdSmiLibraryException(self.init_error)
        with self._lock:
            self.initialized += 1

    def amdsmi_shut_down(self) -> None:
        self._enter("amdsmi_shut_down")
        with self._lock:
            self.initialized = 0

    def amdsmi_get_processor_handles(self) -> list[_Handle]:
        self._enter("amdsmi_get_processor_handles")
        return [_Handle(g.index) for g in self.gpus]

    def amdsmi_get_rocm_version(self) -> tuple[bool, str]:
        # Not a library call in amdsmi either (it loads librocm-core.so): no init needed.
        self.calls["amdsmi_get_rocm_version"] += 1
        if self.rocm_version is None:
            return False, "Could not find librocm-core.so"
        return True, self.rocm_version

    # -- identity ------------------------------------------------------------------------

    def amdsmi_get_gpu_device_uuid(self, handle: Any) -> str:
        return self._gpu("amdsmi_get_gpu_device_uuid", handle).uuid

    def amdsmi_get_gpu_device_bdf(self, handle: Any) -> str:
        return self._gpu("amdsmi_get_gpu_device_bdf", handle).bdf

    def amdsmi_get_gpu_asic_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_gpu_asic_info", handle)
        p = gpu.profile
        return {
            "market_name": p.market_name,
            "vendor_id": "0x1002",
            "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
            "subvendor_id": "0x1002",
            "device_id": hex(p.device_id),
            "rev_id": "0x00",
            "asic_serial": gpu.serial,
            "oam_id": gpu.index,
            "num_compute_units": p.compute_units,
            "target_graphics_version": p.gfx_version,
            "subsystem_id": hex(p.device_id),
        }

    def amdsmi_get_gpu_enumeration_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_gpu_enumeration_info", handle)
        return {
            "drm_render": gpu.render_minor,
            "drm_card": gpu.index,
            "hsa_id": gpu.index + 1,
            "hip_id": gpu.index,
            "hip_uuid": f"GPU-{gpu.uuid.replace('-', '')[:16]}",
        }

    def amdsmi_get_gpu_driver_info(self, handle: Any) -> dict[str, Any]:
        self._gpu("amdsmi_get_gpu_driver_info", handle)
        return {
            "driver_name": "amdgpu",
            "driver_version": self.driver_version,
            "driver_date": "N/A",
        }

    def amdsmi_get_gpu_vram_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_gpu_vram_info", handle)
        return {
            "vram_type": 5,
            "vram_vendor": "SAMSUNG",
            "vram_size": gpu.profile.sku.reported_memory_mib,  # MB, as amdsmi reports it
            "vram_bit_width": 8192,
            "vram_max_bandwidth": "N/A",
        }

    def amdsmi_get_gpu_memory_total(self, handle: Any, mem_type: IntEnum) -> int:
        gpu = self._gpu("amdsmi_get_gpu_memory_total", handle)
        if not isinstance(mem_type, AmdSmiMemoryType):
            raise AmdSmiParameterException(mem_type, AmdSmiMemoryType)
        return gpu.profile.sku.reported_memory_mib * 1024**2

    def amdsmi_get_gpu_memory_usage(self, handle: Any, mem_type: IntEnum) -> int:
        gpu = self._gpu("amdsmi_get_gpu_memory_usage", handle)
        if not isinstance(mem_type, AmdSmiMemoryType):
            raise AmdSmiParameterException(mem_type, AmdSmiMemoryType)
        return gpu.memory_used

    def amdsmi_get_gpu_compute_partition(self, handle: Any) -> str:
        return self._gpu("amdsmi_get_gpu_compute_partition", handle).profile.compute_partition

    def amdsmi_get_gpu_memory_partition(self, handle: Any) -> str:
        return self._gpu("amdsmi_get_gpu_memory_partition", handle).profile.memory_partition

    def amdsmi_get_power_cap_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_power_cap_info", handle)
        cap_uw = int(gpu.profile.sku.tdp_watts * 1e6)
        return {
            "power_cap": cap_uw,
            "default_power_cap": cap_uw,
            "dpm_cap": gpu.profile.max_gfx_clock_mhz,
            "min_power_cap": 0,
            "max_power_cap": cap_uw,
        }

    def amdsmi_get_clock_info(self, handle: Any, clock_type: IntEnum) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_clock_info", handle)
        if not isinstance(clock_type, AmdSmiClkType):
            raise AmdSmiParameterException(clock_type, AmdSmiClkType)
        p = gpu.profile
        top = p.max_memory_clock_mhz if clock_type == AmdSmiClkType.MEM else p.max_gfx_clock_mhz
        now = int(top * (0.3 + 0.7 * gpu.busy))
        return {"clk": now, "min_clk": top // 10, "max_clk": top, "clk_locked": False,
                "clk_deep_sleep": "N/A"}  # fmt: skip

    def amdsmi_get_pcie_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_pcie_info", handle)
        p = gpu.profile
        return {
            "pcie_static": {
                "max_pcie_width": p.pcie_width,
                "max_pcie_speed": 32000 if p.pcie_generation >= 5 else 16000,
                "pcie_interface_version": p.pcie_generation,
                "slot_type": "OAM",
            },
            "pcie_metric": {"pcie_width": p.pcie_width, "pcie_speed": 32000,
                            "pcie_bandwidth": "N/A", "pcie_replay_count": 0},
        }  # fmt: skip

    def amdsmi_get_gpu_ecc_enabled(self, handle: Any) -> int:
        return 0x3FFF if self._gpu("amdsmi_get_gpu_ecc_enabled", handle).profile.ecc else 0

    # -- telemetry ---------------------------------------------------------------------------

    def amdsmi_get_gpu_activity(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_gpu_activity", handle)
        return {"gfx_activity": int(gpu.busy * 100), "umc_activity": int(gpu.busy * 40),
                "mm_activity": "N/A"}  # fmt: skip

    def amdsmi_get_power_info(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_power_info", handle)
        watts = int(self._power_w(gpu))
        # MI300 reports current_socket_power; MI200 only the average ("N/A" for current).
        current: int | str = watts if gpu.profile.current_power else "N/A"
        return {
            "socket_power": watts,
            "current_socket_power": current,
            "average_socket_power": watts,
            "gfx_voltage": 800,
            "soc_voltage": 750,
            "mem_voltage": 1100,
            "power_limit": int(gpu.profile.sku.tdp_watts),
        }

    def amdsmi_get_energy_count(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_energy_count", handle)
        resolution = 15.259  # microjoules per count on MI200/MI300
        return {
            "energy_accumulator": int(gpu.energy_uj / resolution),
            "counter_resolution": resolution,
            "timestamp": int(self._clock() * 1e9),
        }

    def amdsmi_get_temp_metric(self, handle: Any, sensor_type: IntEnum, metric: IntEnum) -> int:
        gpu = self._gpu("amdsmi_get_temp_metric", handle)
        if not isinstance(sensor_type, AmdSmiTemperatureType):
            raise AmdSmiParameterException(sensor_type, AmdSmiTemperatureType)
        if not isinstance(metric, AmdSmiTemperatureMetric):
            raise AmdSmiParameterException(metric, AmdSmiTemperatureMetric)
        if sensor_type == AmdSmiTemperatureType.EDGE and not gpu.profile.edge_sensor:
            # MI300X has no edge sensor: amdsmi answers NOT_SUPPORTED.
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        return int(35 + 50 * gpu.busy)

    def amdsmi_get_gpu_total_ecc_count(self, handle: Any) -> dict[str, Any]:
        gpu = self._gpu("amdsmi_get_gpu_total_ecc_count", handle)
        return {
            "correctable_count": gpu.ecc_correctable,
            "uncorrectable_count": gpu.ecc_uncorrectable,
            "deferred_count": 0,
        }

    def amdsmi_get_gpu_bad_page_info(self, handle: Any) -> list[dict[str, int]]:
        return list(self._gpu("amdsmi_get_gpu_bad_page_info", handle).bad_pages)
