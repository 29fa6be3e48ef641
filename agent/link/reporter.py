"""What the link reports about the node: the state for Hello and each Heartbeat.

``NodeReporter`` is the seam: the GPU backend, lease runtime and usage outbox
feed it. ``StaticReporter`` serves a fixed inventory with every GPU free and is
what ``gpu-agent run`` uses until those parts provide a live reporter.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from gpuagent.v1 import common_pb2, inventory_pb2


@dataclass(frozen=True)
class HelloState:
    inventory: inventory_pb2.Inventory
    gpu_health: Sequence[inventory_pb2.GpuHealth] = ()
    leases: Sequence[common_pb2.LeaseStatus] = ()
    last_acked_usage_seq: int = 0
    draining: bool = False


@dataclass(frozen=True)
class HeartbeatState:
    gpu_health: Sequence[inventory_pb2.GpuHealth] = ()
    free_gpu_uuids: Sequence[str] = ()
    allocated_gpu_uuids: Sequence[str] = ()
    leases: Sequence[common_pb2.LeaseStatus] = field(default_factory=tuple)
    draining: bool = False
    usage_pending: int = 0


class NodeReporter(Protocol):
    """Read by the link: once per Hello, once per Heartbeat. Must not block the loop."""

    async def hello_state(self) -> HelloState: ...

    async def heartbeat_state(self) -> HeartbeatState: ...


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


# name, memory GiB, compute capability, architecture, power W, sm/mem MHz, pcie gen/width
_PROFILES: dict[str, tuple[str, int, tuple[int, int], str, float, int, int, int, int]] = {
    "h100-sxm-80gb": ("NVIDIA H100 80GB HBM3", 80, (9, 0), "hopper", 700, 1980, 2619, 5, 16),
    "a100-sxm-80gb": ("NVIDIA A100-SXM4-80GB", 80, (8, 0), "ampere", 400, 1410, 1593, 4, 16),
    "rtx-4090": ("NVIDIA GeForce RTX 4090", 24, (8, 9), "ada", 450, 2520, 10501, 4, 16),
    "rtx-3080": ("NVIDIA GeForce RTX 3080", 10, (8, 6), "ampere", 320, 1710, 9501, 4, 16),
}


def simulated_gpus(profile: str, count: int, seed: str) -> list[inventory_pb2.GpuInfo]:
    """Stable simulated GPUs: UUIDs derive from ``seed`` so they survive restarts."""

    name, mem_gib, (cc_major, cc_minor), arch, power, sm, mem, gen, width = _PROFILES[profile]
    gpus = []
    for index in range(count):
        digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()[:16]
        gpus.append(
            inventory_pb2.GpuInfo(
                index=index,
                uuid=f"GPU-{uuid.UUID(bytes=digest)}",
                name=name,
                serial=f"SIM{digest.hex()[:10].upper()}",
                pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
                memory_total_bytes=mem_gib * 1024**3,
                compute_capability_major=cc_major,
                compute_capability_minor=cc_minor,
                architecture=arch,
                driver_version="550.54.15",
                cuda_driver_version="12.4",
                power_limit_watts=power,
                max_sm_clock_mhz=sm,
                max_mem_clock_mhz=mem,
                pcie_gen=gen,
                pcie_width=width,
                ecc_mode=True,
                simulated=True,
            )
        )
    return gpus


def build_inventory(gpus: Sequence[inventory_pb2.GpuInfo]) -> inventory_pb2.Inventory:
    """Host info plus ``gpus`` (blocking: call it off the event loop)."""
    return inventory_pb2.Inventory(
        host=host_info(), gpus=gpus, collected_at_unix_nanos=time.time_ns()
    )


def default_node_name() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()
