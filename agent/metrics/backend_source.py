"""Which ``GpuSource`` reads a given GPU backend for /metrics and metering."""

from __future__ import annotations

from agent.gpu.amdsmi_backend import AmdSmiBackend
from agent.gpu.backend import GpuBackend

from .amdsmi_source import AmdSmiGpuSource
from .gpu_sample import XidSource
from .nvml_source import NvmlGpuSource


def gpu_source_for(
    backend: GpuBackend, xids: XidSource | None = None
) -> NvmlGpuSource | AmdSmiGpuSource:
    """amdsmi's reader for the AMD backend; NVML's (real or fake module) otherwise."""
    if isinstance(backend, AmdSmiBackend):
        return AmdSmiGpuSource(backend, xids)
    return NvmlGpuSource(backend.nvml, xids)
