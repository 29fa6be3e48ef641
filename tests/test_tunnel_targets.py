"""LeaseTargets, the tunnel's stand-in ServiceTargets: a running lease's declared ports
on its own container (a real Docker container on a network of its own), nothing else."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.leases.manager import LeasesSnapshot, LeaseView
from agent.leases.records import LeaseRecord
from agent.leases.statedb import StateDB
from agent.leases.states import LeaseState
from agent.tunnel.targets import LeaseTargets

pytestmark = pytest.mark.docker


class Snapshots:
    """LeaseManager.snapshot's shape; the lease manager itself is tested elsewhere."""

    def __init__(self) -> None:
        self.views: dict[str, LeaseView] = {}

    def snapshot(self) -> LeasesSnapshot:
        return LeasesSnapshot(tuple(self.views.values()), {})


@pytest.fixture
def container(docker_client: docker.DockerClient, busybox_image: str) -> Iterator[Any]:
    tag = uuid.uuid4().hex[:8]
    network = docker_client.networks.create(f"tt-{tag}", labels={"gpu-agent.test": tag})
    box = docker_client.containers.run(
        busybox_image,
        ["sleep", "60"],
        detach=True,
        name=f"tt-{tag}",
        network=network.name,
        labels={"gpu-agent.test": tag, "io.gpuagent.network": network.name},
    )
    try:
        yield box
    finally:
        box.remove(force=True)
        network.remove()


@pytest.mark.asyncio
async def test_only_a_running_leases_declared_ports_resolve(
    tmp_path: Path, docker_client: docker.DockerClient, container: Any
) -> None:
    """The lease's declared port resolves to its container's address on its network;
    another lease, an undeclared port, an address as a port name and a lease that is no
    longer running (or whose container changed) resolve to nothing."""
    db = StateDB(tmp_path / "state.db")
    now = time.time()
    db.insert_new(
        LeaseRecord(
            "lease-a",
            LeaseState.RUNNING,
            {"image": "x", "ports": [{"container_port": 8080, "protocol": "tcp"}]},
            now,
            now,
            container_id=container.id,
        )
    )
    leases = Snapshots()
    leases.views["lease-a"] = LeaseView("lease-a", LeaseState.RUNNING, (), container.id, None)
    targets = LeaseTargets(leases, db, docker_client)  # type: ignore[arg-type]
    assert targets.service_target("lease-a", "8080") is None  # not resolved yet
    await targets.refresh()
    target = targets.service_target("lease-a", "8080")
    container.reload()
    address = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert target is not None and (target.host, target.port, target.ready) == (address, 8080, True)
    for lease_id, port in (
        ("lease-b", "8080"),
        ("lease-a", "22"),
        ("lease-a", "127.0.0.1:8080"),
        ("lease-a", f"{address}:8080"),
        ("", ""),
    ):
        assert targets.service_target(lease_id, port) is None, (lease_id, port)
    # Another container now holds the lease's id (a replaced container): no stale address.
    leases.views["lease-a"] = LeaseView("lease-a", LeaseState.RUNNING, (), "other", None)
    assert targets.service_target("lease-a", "8080") is None
    leases.views["lease-a"] = LeaseView("lease-a", LeaseState.SUCCEEDED, (), container.id, None)
    assert targets.service_target("lease-a", "8080") is None
    db.close()
