"""GPU detection, telemetry and health: NVML or the simulated backend behind one interface."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from agent.config import GpuConfig

from .backend import GpuBackend
from .model import GpuHealth, GpuInfo, GpuSample, HealthState, MigDevice, NvLinkPeer, XidEvent
from .nvml import GpuLost, NvmlBackend, NvmlUnavailable
from .simulated import simulated_backend

log = logging.getLogger(__name__)

__all__ = [
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


def open_backend(
    config: GpuConfig, *, nvml_module: Any = None, uuid_seed: str | None = None
) -> GpuBackend:
    """An opened backend as ``gpu.backend`` selects; blocking (``nvmlInit``).

    ``nvml`` raises ``NvmlUnavailable`` (callers exit with code 2); ``auto`` falls
    back to simulated GPUs with a WARNING, since a provider must never mistake
    simulated GPUs for real ones.
    """
    if config.backend == "simulated":
        backend = simulated_backend(config.simulated, uuid_seed)
        backend.open()
        return backend
    try:
        return _open_nvml(nvml_module)
    except NvmlUnavailable as exc:
        if config.backend == "nvml":
            raise
        log.warning(
            "NVML unavailable; gpu.backend auto falls back to SIMULATED GPUs, not real hardware",
            extra={"cause": exc.cause, "fix": exc.fix, "profile": config.simulated.profile},
        )
        backend = simulated_backend(config.simulated, uuid_seed)
        backend.open()
        return backend
