"""The interface the rest of the agent uses to reach its GPUs.

``NvmlBackend`` implements it over the real ``pynvml`` in production and over
``FakeNvml`` for the ``simulated`` backend, so both run the same code;
``AmdSmiBackend`` implements it over AMD's ``amdsmi`` (``FakeAmdSmi`` in tests).
Every method blocks; call them from a worker thread.
"""

from __future__ import annotations

from typing import Any, Protocol

from .model import GpuInfo, GpuSample, XidEvent


class GpuBackend(Protocol):
    name: str  # "nvml", "amd" or "simulated"
    simulated: bool

    @property
    def nvml(self) -> Any:
        """The library module underneath (pynvml-shaped, or amdsmi), for other readers."""
        ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def device_count(self) -> int: ...

    def driver_versions(self) -> tuple[str | None, str | None]:
        """(driver version, CUDA driver version such as "12.4")."""
        ...

    def inventory(self) -> list[GpuInfo]: ...

    def sample(self, index: int) -> GpuSample: ...

    def sample_all(self) -> list[GpuSample]: ...

    @property
    def events_available(self) -> bool: ...

    def open_events(self) -> bool: ...

    def wait_events(self, timeout: float) -> list[XidEvent]: ...
