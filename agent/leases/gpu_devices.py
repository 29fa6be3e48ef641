"""How a lease container is given its GPUs, and only those: one rule per vendor.

NVIDIA: a Docker device request for the allocated UUIDs; the NVIDIA Container Toolkit
mounts exactly those devices. AMD (ROCm): no runtime hook is needed or trusted; the
container gets ``/dev/kfd`` (the compute interface every ROCm process opens) and the
allocated GPUs' own ``/dev/dri/renderD*`` nodes, as AMD documents for Docker. KFD
only lets a process use GPUs whose render node it can open, so the device cgroup Docker
builds from this list is what keeps the other GPUs out. ``NVIDIA_VISIBLE_DEVICES`` is
``void`` there, so an NVIDIA runtime set as Docker's default adds nothing either.

The device nodes belong to root:render (or video) mode 0660 and leases run with every
capability dropped, so the node's group ids are added to the container: an image running
as a non-root user can then open them, and nothing else on the host changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest

KFD = "/dev/kfd"


@dataclass(frozen=True)
class GpuAccess:
    """Host-config entries and environment that give a container its GPUs."""

    host: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _gid(path: str) -> int | None:
    try:
        return Path(path).stat().st_gid
    except OSError:
        return None


def gpu_access(
    gpu_uuids: Sequence[str],
    render_nodes: Mapping[str, str],
    *,
    device_request: bool = True,
    gid_of: Callable[[str], int | None] = _gid,
) -> GpuAccess:
    """What the container of a lease holding ``gpu_uuids`` gets.

    ``render_nodes`` maps AMD GPU UUIDs to their render node; a UUID found there is an
    AMD GPU. ``device_request`` False (simulated GPUs) gives no device at all.
    """
    uuids = list(gpu_uuids)
    amd = [u for u in uuids if u in render_nodes]
    if amd and len(amd) != len(uuids):
        raise ValueError("a lease cannot mix AMD and NVIDIA GPUs")
    if not device_request or not uuids:
        return GpuAccess(env={"NVIDIA_VISIBLE_DEVICES": ",".join(uuids) or "void"})
    if not amd:
        return GpuAccess(
            host={
                "device_requests": [
                    DeviceRequest(driver="nvidia", device_ids=uuids, capabilities=[["gpu"]])
                ]
            },
            env={"NVIDIA_VISIBLE_DEVICES": ",".join(uuids)},
        )
    paths = [KFD, *(render_nodes[u] for u in amd)]
    groups = sorted({g for g in (gid_of(p) for p in paths) if g is not None and g != 0})
    host: dict[str, Any] = {"devices": [f"{p}:{p}:rw" for p in paths]}
    if groups:
        host["group_add"] = [str(g) for g in groups]
    return GpuAccess(host=host, env={"NVIDIA_VISIBLE_DEVICES": "void"})
