"""A minimal ``ServiceTargets``: a running lease's declared ports on its container.

Stands in until the lease side's ``LeaseManager.service_target`` (with real
readiness checks) lands; until then a port is ready when its container runs. The
answers come from an in-memory table checked against the lease manager's snapshot,
so ``service_target`` never blocks; ``refresh`` (on a miss) costs a new lease one
state-DB read and one container inspect, once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import docker

from ..leases.endpoints import ServiceTarget
from ..leases.manager import LeaseManager
from ..leases.statedb import StateDB
from ..leases.states import LeaseState

log = logging.getLogger(__name__)


def _ports(spec: dict[str, Any]) -> dict[str, int]:
    """Declared name -> container port; a port's name is its number unless it has one."""
    found: dict[str, int] = {}
    for port in spec.get("ports") or []:
        number = int(port.get("container_port", 0))
        if number:
            found[str(port.get("name") or number)] = number
    return found


def container_address(attrs: dict[str, Any], network: str | None = None) -> str:
    """The container's IPv4 address on its lease network ("" when it has none)."""
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    if network and network in networks:
        return str(networks[network].get("IPAddress") or "")
    for settings in networks.values():
        if settings.get("IPAddress"):
            return str(settings["IPAddress"])
    return ""


class LeaseTargets:
    def __init__(self, leases: LeaseManager, statedb: StateDB, client: docker.DockerClient) -> None:
        self._leases = leases
        self._db = statedb
        self._client = client
        # lease id -> (container id, address, declared ports)
        self._table: dict[str, tuple[str, str, dict[str, int]]] = {}
        self._lock = asyncio.Lock()

    def _running(self) -> dict[str, str]:
        return {
            view.lease_id: view.container_id
            for view in self._leases.snapshot().leases
            if view.state is LeaseState.RUNNING and view.container_id
        }

    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        entry = self._table.get(lease_id)
        # Checked against the manager's state on every call: a lease that ended (or
        # whose container was replaced) is never reached through a stale address.
        if entry is None or self._running().get(lease_id) != entry[0]:
            return None
        _, host, ports = entry
        number = ports.get(port)
        if number is None or not host:
            return None
        return ServiceTarget(lease_id, port, host, number, "http", ready=True)

    async def refresh(self) -> None:
        async with self._lock:
            running = self._running()
            for lease_id in list(self._table):
                if running.get(lease_id) != self._table[lease_id][0]:
                    del self._table[lease_id]
            for lease_id, container_id in running.items():
                if lease_id in self._table:
                    continue
                try:
                    entry = await asyncio.to_thread(self._resolve, lease_id, container_id)
                except (docker.errors.DockerException, OSError) as exc:
                    log.warning(
                        "cannot resolve a lease's service address",
                        extra={"lease_id": lease_id, "error": str(exc)},
                    )
                    continue
                if entry is not None:
                    self._table[lease_id] = entry

    def _resolve(self, lease_id: str, container_id: str) -> tuple[str, str, dict[str, int]] | None:
        record = self._db.get(lease_id)
        if record is None:
            return None
        ports = _ports(record.spec)
        if not ports:
            return (container_id, "", {})
        attrs = self._client.api.inspect_container(container_id)
        network = (attrs.get("Config") or {}).get("Labels", {}).get("io.gpuagent.network")
        return (container_id, container_address(attrs, network), ports)
