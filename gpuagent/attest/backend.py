"""What the prover needs of a compute device; the kernels are in ``benchmarks/attest/backends.py``.

The protocol lives here so the prover (gpuagent/attest/prover.py) depends only on the
shared package; torch, CuPy and NumPy implementations sit with the GPU benchmarks.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

# C on the host as int32, and the seconds the device spent on it.
MatmulOutput = tuple[NDArray[np.int32], float]


class BackendError(RuntimeError):
    """The requested backend cannot run here (missing library, no device, old version)."""


class Backend(Protocol):
    name: str
    simulated: bool  # True when not a real GPU: timing bands do not apply

    def device_name(self) -> str: ...

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        """C = A @ B for the nonce, on the host as int32, and the device seconds it took."""
        ...

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
        ...
