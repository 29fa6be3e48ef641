"""The isolation self-test: does this host really keep leases apart and off the host?

Two probe containers, each on a lease network of its own (made exactly as a
lease's), serve a TCP port; the agent listens on each network's gateway address (an
address of the host). Each probe then tries its peer's port and the host listener.
Every attempt must fail. A positive control first (the agent itself reaches both
probes' ports from the host) makes sure a "blocked" means blocked, not "nothing was
listening".

The result goes into the Hello inventory (``Isolation``), the
``gpu_agent_isolation_verified`` metric and the log. The probe image needs
``sh``, ``httpd`` and ``nc`` (busybox); it is never pulled here: when it is absent
the result is ``unverified`` with the ``docker pull`` to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import docker
import docker.errors

from ..leases.docker_runtime import LABEL_LEASE, LABEL_MANAGED, LABEL_NODE, RuntimeFailure

if TYPE_CHECKING:
    from ..leases.docker_runtime import DockerRuntime

log = logging.getLogger(__name__)

Status = Literal["verified", "failed", "unverified", "disabled"]
PROBE_PORT = 8080
PROBES = ("a", "b")
CONNECT_TIMEOUT = 1  # seconds per probe connect (nc -w); blocked ones are rejected at once
LISTENER_WAIT = 10.0


@dataclass(frozen=True)
class SelfTestResult:
    status: Status
    detail: str = ""
    checked_at: float = 0.0

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def probe_lease_id(name: str) -> str:
    return f"isolation-selftest-{name}"


async def _listen(address: str) -> asyncio.Server:
    async def close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(close, host=address, port=0)


async def _reachable(address: str, port: int, limit: float) -> bool:
    """From the host: wait until ``address:port`` accepts (the probe's server started)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 2)
        except (OSError, TimeoutError):
            if time.monotonic() >= deadline:
                return False
            # A server starting inside a container gives the host nothing to await.
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True


class SelfTest:
    def __init__(self, runtime: DockerRuntime, image: str) -> None:
        self._runtime = runtime
        self._client: docker.DockerClient = runtime._client
        self._image = image

    def _labels(self, name: str) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_NODE: self._runtime.node_id,
            LABEL_LEASE: probe_lease_id(name),
            "io.gpuagent.probe": "isolation",
        }

    def _start_probe(self, name: str, network: str) -> tuple[str, str]:
        # Any: the SDK's stubs type create_networking_config's argument as one
        # EndpointConfig, its docs and code as a mapping of network name to one.
        api: Any = self._client.api
        container_name = f"gpuagent-{probe_lease_id(name)}"
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(container_name, force=True)  # left by a crash
        created = api.create_container(
            self._image,
            command=["httpd", "-f", "-p", str(PROBE_PORT), "-h", "/"],
            name=container_name,
            labels=self._labels(name),
            detach=True,
            host_config=api.create_host_config(
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                pids_limit=64,
                mem_limit=32 * 1024**2,
                network_mode=network,
                restart_policy={"Name": "no"},
            ),
            networking_config=api.create_networking_config({network: api.create_endpoint_config()}),
        )
        container_id = str(created["Id"])
        api.start(container_id)
        networks = api.inspect_container(container_id)["NetworkSettings"]["Networks"]
        return container_id, str(networks[network]["IPAddress"])

    def _probe(self, container_id: str, targets: dict[str, tuple[str, int]]) -> dict[str, bool]:
        lines = " ".join(f'"{name} {host} {port}"' for name, (host, port) in targets.items())
        script = (
            f"for t in {lines}; do set -- $t; "
            f'( nc -w {CONNECT_TIMEOUT} "$2" "$3" </dev/null >/dev/null 2>&1 '
            '&& echo "$1 open" || echo "$1 closed" ) & done; wait'
        )
        result = self._client.api.exec_create(container_id, ["sh", "-c", script])
        output = self._client.api.exec_start(result["Id"]).decode("utf-8", "replace")
        opened = {line.split()[0] for line in output.splitlines() if line.endswith(" open")}
        seen = {line.split()[0] for line in output.splitlines() if line.split()}
        if seen != set(targets):
            raise RuntimeFailure(f"probe output unreadable: {output.strip()[:200]!r}")
        return {name: name in opened for name in targets}

    def _cleanup(self, containers: list[str]) -> None:
        for container_id in containers:
            with contextlib.suppress(docker.errors.APIError, OSError):
                self._client.api.remove_container(container_id, force=True)
        for name in PROBES:
            with contextlib.suppress(Exception):
                self._runtime.networks.remove_lease(probe_lease_id(name))

    async def run(self) -> SelfTestResult:
        now = time.time()
        try:
            await asyncio.to_thread(self._client.images.get, self._image)
        except docker.errors.ImageNotFound:
            return SelfTestResult(
                "unverified",
                f"probe image {self._image} is not on this host (docker pull {self._image})",
                now,
            )
        except (docker.errors.DockerException, OSError) as exc:
            return SelfTestResult("unverified", f"Docker: {exc}", now)
        containers: list[str] = []
        servers: list[asyncio.Server] = []
        try:
            if self._runtime.firewall.enabled:
                await self._runtime.ensure_firewall()
            ips: dict[str, str] = {}
            gateways: dict[str, str] = {}
            for name in PROBES:
                network = await self._runtime.ensure_network(probe_lease_id(name))
                gateways[name] = str(next(ipaddress.ip_network(network.subnet).hosts()))
                container_id, ips[name] = await asyncio.to_thread(
                    self._start_probe, name, network.name
                )
                containers.append(container_id)
            host_ports: dict[str, int] = {}
            for name in PROBES:
                server = await _listen(gateways[name])
                servers.append(server)
                host_ports[name] = int(server.sockets[0].getsockname()[1])
            for name in PROBES:
                if not await _reachable(ips[name], PROBE_PORT, LISTENER_WAIT):
                    return SelfTestResult(
                        "unverified", f"probe {name}'s listener did not come up", now
                    )
            peer = {"a": "b", "b": "a"}
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        self._probe,
                        containers[i],
                        {
                            "peer": (ips[peer[name]], PROBE_PORT),
                            "host": (gateways[name], host_ports[name]),
                        },
                    )
                    for i, name in enumerate(PROBES)
                )
            )
        except (RuntimeFailure, docker.errors.DockerException, OSError) as exc:
            return SelfTestResult("unverified", f"self-test could not run: {exc}", now)
        finally:
            for server in servers:
                server.close()
            await asyncio.to_thread(self._cleanup, containers)
        leaks = []
        for name, opened in zip(PROBES, results, strict=True):
            other = peer[name]
            if opened["peer"]:
                leaks.append(f"lease network {name} reached lease network {other}")
            if opened["host"]:
                leaks.append(f"lease network {name} reached the host at {gateways[name]}")
        if leaks:
            return SelfTestResult("failed", "; ".join(leaks), now)
        return SelfTestResult("verified", "", now)
