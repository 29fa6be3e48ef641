"""Per-lease cgroup counters for the sampler, found through Docker."""

from __future__ import annotations

import contextlib

import docker

from .cgroup import CgroupReader, ContainerCounters, lease_bridge


class DockerPidReader:
    """Cgroup counters of a container whose init pid and lease network are looked
    up on first read.

    The sampler calls ``read`` in a worker thread, so the Docker inspects it costs
    (the container, and each network it is attached to, once) never run on the
    event loop.
    """

    def __init__(self, client: docker.DockerClient, container_id: str, lease_id: str) -> None:
        self._client = client
        self._container_id = container_id
        self._lease_id = lease_id
        self._reader: CgroupReader | None = None

    def read(self) -> ContainerCounters:
        if self._reader is None:
            pid: int | None = None
            bridge: str | None = None
            with contextlib.suppress(docker.errors.DockerException):
                attrs = self._client.api.inspect_container(self._container_id)
                pid = int(attrs["State"].get("Pid") or 0) or None
                bridge = lease_bridge(attrs, self._client.api.inspect_network, self._lease_id)
            self._reader = CgroupReader(self._container_id, pid, bridge=bridge)
        return self._reader.read()
