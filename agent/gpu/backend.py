"""The interface the rest of the agent uses to reach its GPUs.

``NvmlBackend`` is the one implementation: over the real ``pynvml`` in
production and over ``FakeNvml`` for the ``simulated`` backend, so both run
the same code. Every method blocks; call them from a worker thread.
"""

from __future__ import annotations

from typing import Any, Protocol

from .model import GpuInfo, GpuSample, XidEvent


class GpuBackend(Protocol):
    name: str  # "nvml" or "simulated"
    simulated: bool

    @property
    def nvml(self) -> Any:
        """The pynvml-shaped module underneath, for readers such as the metrics collector."""
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
