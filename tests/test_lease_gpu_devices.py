"""A lease container gets its allocated GPUs and no others: NVIDIA by UUID, AMD by device node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import RuntimeConfig
from agent.leases.docker_runtime import DockerRuntime
from agent.leases.gpu_devices import KFD, gpu_access
from agent.leases.spec import parse_spec

RENDER = {
    "GPU-a": "/dev/dri/renderD128",
    "GPU-b": "/dev/dri/renderD129",
    "GPU-c": "/dev/dri/renderD130",
}


def _gids(path: str) -> int | None:
    return {KFD: 44, "/dev/dri/renderD129": 992, "/dev/dri/renderD130": 992}.get(path)


def test_amd_lease_gets_kfd_and_only_its_render_nodes() -> None:
    """Two of three AMD GPUs: /dev/kfd and exactly those two render nodes, their groups added."""
    access = gpu_access(["GPU-b", "GPU-c"], RENDER, gid_of=_gids)
    assert access.host["devices"] == [
        "/dev/kfd:/dev/kfd:rw",
        "/dev/dri/renderD129:/dev/dri/renderD129:rw",
        "/dev/dri/renderD130:/dev/dri/renderD130:rw",
    ]
    assert access.host["group_add"] == ["44", "992"]
    assert "device_requests" not in access.host
    assert access.env == {"NVIDIA_VISIBLE_DEVICES": "void"}


def test_nvidia_lease_keeps_the_device_request_by_uuid() -> None:
    """NVIDIA GPUs (not in the render map): a device request for exactly the UUIDs."""
    access = gpu_access(["GPU-x", "GPU-y"], RENDER)
    (request,) = access.host["device_requests"]
    assert request["DeviceIDs"] == ["GPU-x", "GPU-y"] and request["Driver"] == "nvidia"
    assert "devices" not in access.host
    assert access.env == {"NVIDIA_VISIBLE_DEVICES": "GPU-x,GPU-y"}


def test_simulated_and_gpu_less_leases_get_no_device() -> None:
    """No device request (simulated GPUs) or no GPUs: nothing mounted."""
    assert gpu_access(["GPU-a"], RENDER, device_request=False).host == {}
    assert gpu_access([], RENDER).env == {"NVIDIA_VISIBLE_DEVICES": "void"}


def test_a_lease_mixing_vendors_is_refused() -> None:
    """One AMD and one NVIDIA GPU in a lease is a programming error, not a silent half."""
    with pytest.raises(ValueError, match="mix"):
        gpu_access(["GPU-a", "GPU-x"], RENDER)


class _Api:
    def __init__(self) -> None:
        self.host: dict[str, Any] = {}
        self.env: dict[str, str] = {}

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        self.host = kwargs
        return kwargs

    def create_container(self, image: str, **kwargs: Any) -> dict[str, str]:
        self.env = kwargs["environment"]
        return {"Id": "c0ffee"}


class _Client:
    def __init__(self) -> None:
        self.api = _Api()


def test_runtime_hands_an_amd_lease_its_devices_with_the_usual_hardening(tmp_path: Path) -> None:
    """DockerRuntime builds the AMD device list in its one spot and keeps cap_drop etc."""
    client = _Client()
    runtime = DockerRuntime(
        client,  # type: ignore[arg-type]
        RuntimeConfig(),
        "node-1",
        tmp_path,
        render_nodes={"GPU-a": "/dev/dri/renderD128", "GPU-b": "/dev/dri/renderD129"},
    )
    spec = parse_spec({"image": "busybox", "gpu_count": 1})
    assert runtime._create("lease-1", spec, ("GPU-b",), None, True, None) == "c0ffee"
    host = client.api.host
    assert [d.split(":")[0] for d in host["devices"]] == [KFD, "/dev/dri/renderD129"]
    assert host["cap_drop"] == ["ALL"] and host["security_opt"] == ["no-new-privileges:true"]
    assert "device_requests" not in host and "privileged" not in host
    assert client.api.env["NVIDIA_VISIBLE_DEVICES"] == "void"
