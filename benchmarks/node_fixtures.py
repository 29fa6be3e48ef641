"""Static node state for tests and benchmarks: a fixed inventory, every GPU free.

Nothing in ``gpu-agent run`` uses these; the daemon's reporter is ``AgentNode``
(agent/node.py), fed by the GPU backend, the lease runtime and the usage outbox.
Simulated GPUs take every figure from their device profile (agent/gpu/profiles.py)
and its row of the one SKU table (gpuagent/attest/skus.py).
"""

from __future__ import annotations

import hashlib
import platform
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil

from agent.link.reporter import HeartbeatState, HelloState
from gpuagent.v1 import inventory_pb2


class StaticReporter:
    """A fixed inventory; every GPU healthy and free; no leases."""

    def __init__(self, inventory: inventory_pb2.Inventory) -> None:
        self.inventory = inventory
        self.health = [
            inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
            for g in inventory.gpus
        ]

    async def hello_state(self) -> HelloState:
        return HelloState(inventory=self.inventory, gpu_health=self.health)

    async def heartbeat_state(self) -> HeartbeatState:
        return HeartbeatState(
            gpu_health=self.health, free_gpu_uuids=[g.uuid for g in self.inventory.gpus]
        )


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return platform.system()
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return platform.system()


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


def host_info(root_paths: Sequence[str] = ("/",)) -> inventory_pb2.HostInfo:
    """The host half of the inventory (blocking: call it off the event loop)."""
    disks = []
    for path in root_paths:
        try:
            usage = psutil.disk_usage(path)
        except OSError:
            continue
        disks.append(
            inventory_pb2.Disk(mountpoint=path, total_bytes=usage.total, free_bytes=usage.free)
        )
    return inventory_pb2.HostInfo(
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(),
        cpu_cores=psutil.cpu_count(logical=False) or 0,
        cpu_threads=psutil.cpu_count(logical=True) or 0,
        memory_bytes=psutil.virtual_memory().total,
        disks=disks,
        kernel=platform.release(),
        os=_os_name(),
        arch=platform.machine(),
    )


def simulated_gpus(profile: str, count: int, seed: str) -> list[inventory_pb2.GpuInfo]:
    """Stable simulated GPUs of a device profile: UUIDs derive from ``seed`` so they survive
    restarts; every figure comes from the profile and its SKU row."""
    from agent.gpu.nvml import ARCHITECTURES
    from agent.gpu.profiles import get_profile

    p = get_profile(profile)
    gpus = []
    for index in range(count):
        digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()[:16]
        gpus.append(
            inventory_pb2.GpuInfo(
                index=index,
                uuid=f"GPU-{uuid.UUID(bytes=digest)}",
                name=p.name,
                serial=f"SIM{digest.hex()[:10].upper()}",
                pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
                memory_total_bytes=p.memory_total_bytes,
                compute_capability_major=p.compute_capability[0],
                compute_capability_minor=p.compute_capability[1],
                architecture=ARCHITECTURES.get(p.architecture, "unknown"),
                driver_version="550.54.15",
                cuda_driver_version="12.4",
                power_limit_watts=p.power_limit_watts,
                max_sm_clock_mhz=p.max_sm_clock_mhz,
                max_mem_clock_mhz=p.max_memory_clock_mhz,
                pcie_gen=p.pcie_generation,
                pcie_width=p.pcie_width,
                ecc_mode=p.ecc,
                simulated=True,
            )
        )
    return gpus


def build_inventory(gpus: Sequence[inventory_pb2.GpuInfo]) -> inventory_pb2.Inventory:
    """Host info plus ``gpus`` (blocking: call it off the event loop)."""
    return inventory_pb2.Inventory(
        host=host_info(), gpus=gpus, collected_at_unix_nanos=time.time_ns()
    )
