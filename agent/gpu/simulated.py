"""The ``simulated`` backend: the real NVML code over ``FakeNvml``, for hosts without GPUs.

UUIDs derive from the host name, the profile and the index, so every process on
one host (the daemon, ``gpu-agent cordon``) sees the same UUIDs, while two
simulated hosts in one demo do not collide. Faults from ``gpu.simulated.faults``
are scheduled relative to the backend's creation.
"""

from __future__ import annotations

import socket

from agent.config import SimulatedGpuConfig

from .fakenvml import FakeNvml
from .nvml import NvmlBackend


def build_fake_nvml(config: SimulatedGpuConfig, uuid_seed: str | None = None) -> FakeNvml:
    fake = FakeNvml([config.profile] * config.count, uuid_seed=uuid_seed or socket.gethostname())
    for fault in config.faults:
        fake.schedule(fault.gpu, fault.kind, fault.after, fault.code)
    return fake


def simulated_backend(config: SimulatedGpuConfig, uuid_seed: str | None = None) -> NvmlBackend:
    return NvmlBackend(build_fake_nvml(config, uuid_seed), simulated=True)
