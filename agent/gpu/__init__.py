"""GPU detection, telemetry and health: NVML or the simulated backend behind one interface."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from agent.config import GpuConfig

from .amdsmi_backend import AmdSmiBackend, AmdSmiUnavailable, import_amdsmi
from .backend import GpuBackend
from .model import GpuHealth, GpuInfo, GpuSample, HealthState, MigDevice, NvLinkPeer, XidEvent
from .nvml import GpuLost, NvmlBackend, NvmlUnavailable
from .simulated import simulated_backend

log = logging.getLogger(__name__)

__all__ = [
    "AmdSmiBackend",
    "AmdSmiUnavailable",
    "GpuBackend",
    "GpuHealth",
    "GpuInfo",
    "GpuLost",
    "GpuSample",
    "HealthState",
    "MigDevice",
    "NvLinkPeer",
    "NvmlBackend",
    "NvmlUnavailable",
    "XidEvent",
    "open_backend",
]


def _open_nvml(nvml_module: Any) -> NvmlBackend:
    if nvml_module is None:
        try:
            nvml_module = importlib.import_module("pynvml")
        except ImportError:
            raise NvmlUnavailable(
                "the pynvml Python module is missing",
                "reinstall gpu-agent (it depends on nvidia-ml-py)",
            ) from None
    backend = NvmlBackend(nvml_module)
    backend.open()
    return backend


def _open_amd(amdsmi_module: Any) -> AmdSmiBackend:
    backend = AmdSmiBackend(amdsmi_module if amdsmi_module is not None else import_amdsmi())
    backend.open()
    return backend


def open_backend(
    config: GpuConfig,
    *,
    nvml_module: Any = None,
    amdsmi_module: Any = None,
    uuid_seed: str | None = None,
) -> GpuBackend:
    """An opened backend as ``gpu.backend`` selects; blocking (``nvmlInit``, ``amdsmi_init``).

    ``nvml`` and ``amd`` raise ``NvmlUnavailable`` (``AmdSmiUnavailable`` is one; callers
    exit with code 2). ``auto`` tries NVML, then amdsmi (kept only when it sees a GPU),
    then falls back to simulated GPUs with a WARNING, since a provider must never mistake
    simulated GPUs for real ones.
    """
    if config.backend == "simulated":
        backend = simulated_backend(config.simulated, uuid_seed)
        backend.open()
        return backend
    if config.backend == "amd":
        return _open_amd(amdsmi_module)
    try:
        return _open_nvml(nvml_module)
    except NvmlUnavailable as exc:
        if config.backend == "nvml":
            raise
        nvml_cause = exc
    try:
        amd = _open_amd(amdsmi_module)
    except AmdSmiUnavailable:
        pass
    else:
        if amd.device_count() > 0:
            return amd
        amd.close()
    log.warning(
        "no NVIDIA or AMD GPU library usable; gpu.backend auto falls back to SIMULATED "
        "GPUs, not real hardware",
        extra={
            "cause": nvml_cause.cause,
            "fix": nvml_cause.fix,
            "profile": config.simulated.profile,
        },
    )
    backend = simulated_backend(config.simulated, uuid_seed)
    backend.open()
    return backend
