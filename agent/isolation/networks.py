"""One Docker bridge network per lease.

A lease network carries the agent's labels (so a restarted agent re-adopts it
instead of creating a second one, and never touches a network it did not make), has
inter-container traffic off, a subnet carved from ``isolation.subnet_pool`` and a
bridge named ``<bridge_prefix><hash>`` so that the egress policy (``firewall``) can
match every lease bridge, and nothing else, with one interface wildcard.

Creating a bridge network costs Docker about 100 ms, a fifth of a lease start, so
up to ``isolation.spare_networks`` are made ahead, labelled ``spare`` (no lease id:
labels cannot change later). A lease takes one and it is never given to another:
the lease's container names it in its ``io.gpuagent.network`` label, which is how a
restarted agent knows whose it is. Without a spare, the lease's network is made at
its start, named like its container and labelled with its lease id. Blocking
(docker SDK): call from a worker thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.types import IPAMConfig, IPAMPool

from ..config import IsolationConfig

log = logging.getLogger(__name__)

IFNAMSIZ = 15  # Linux interface names: 15 characters and a NUL
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
HOST_BINDING_OPTION = "com.docker.network.bridge.host_binding_ipv4"
LABEL_SPARE = "io.gpuagent.spare-network"


class NetworkError(Exception):
    """A lease network could not be made or found; the message fits a lease's reason."""


class _Conflict(Exception):
    """A network of that name exists already."""


@dataclass(frozen=True)
class LeaseNetwork:
    id: str
    name: str
    lease_id: str
    subnet: str
    bridge: str
    spare: bool = False  # made ahead for whichever lease starts next


def bridge_name(prefix: str, node_id: str, lease_id: str) -> str:
    digest = hashlib.sha256(f"{node_id}\0{lease_id}".encode()).hexdigest()
    return prefix + digest[: IFNAMSIZ - len(prefix)]


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or type(exc).__name__


class LeaseNetworks:
    def __init__(
        self,
        client: docker.DockerClient,
        config: IsolationConfig,
        node_id: str,
        labels: dict[str, str],
        lease_label: str,
    ) -> None:
        self._client = client
        self._config = config
        self._node_id = node_id
        self._labels = labels  # the agent's managed + node labels
        self._lease_label = lease_label
        self._spares: list[LeaseNetwork] = []
        # Subnet choice reads every network then creates one: two lease starts at once
        # would otherwise pick the same free subnet (Docker refuses the second).
        self._create_lock = threading.Lock()
        self._lock = threading.Lock()  # the spares list

    def _filters(self, lease_id: str | None = None) -> dict[str, Any]:
        labels = [f"{k}={v}" for k, v in self._labels.items()]
        if lease_id is not None:
            labels.append(f"{self._lease_label}={lease_id}")
        return {"label": labels}

    def _ours(self, raw: dict[str, Any]) -> LeaseNetwork | None:
        labels: dict[str, str] = raw.get("Labels") or {}
        # The engine filtered already; check again so a bug there cannot make us
        # remove someone else's network.
        if any(labels.get(k) != v for k, v in self._labels.items()):
            return None
        lease_id = labels.get(self._lease_label, "")
        spare = labels.get(LABEL_SPARE) == "true"
        if not lease_id and not spare:
            return None
        configs = (raw.get("IPAM") or {}).get("Config") or []
        options: dict[str, str] = raw.get("Options") or {}
        return LeaseNetwork(
            id=str(raw.get("Id", "")),
            name=str(raw.get("Name", "")),
            lease_id=lease_id,
            subnet=str(configs[0].get("Subnet", "")) if configs else "",
            bridge=options.get(BRIDGE_NAME_OPTION, ""),
            spare=spare,
        )

    def list_managed(self) -> list[LeaseNetwork]:
        try:
            found = self._client.api.networks(filters=self._filters())
        except (docker.errors.DockerException, OSError) as exc:
            raise NetworkError(f"cannot list lease networks: {_explain(exc)}") from exc
        return [n for n in (self._ours(raw) for raw in found) if n is not None]

    def find(self, lease_id: str) -> list[LeaseNetwork]:
        try:
            found = self._client.api.networks(filters=self._filters(lease_id))
        except (docker.errors.DockerException, OSError) as exc:
            raise NetworkError(f"cannot list lease networks: {_explain(exc)}") from exc
        return [n for n in (self._ours(raw) for raw in found) if n and n.lease_id == lease_id]

    def _used_subnets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        used = []
        for raw in self._client.api.networks():
            for cfg in (raw.get("IPAM") or {}).get("Config") or []:
                try:
                    used.append(ipaddress.ip_network(str(cfg.get("Subnet", "")), strict=False))
                except ValueError:
                    continue
        return used

    def _candidates(self) -> Iterator[ipaddress.IPv4Network]:
        used = self._used_subnets()
        for subnet in self._config.subnet_pool.subnets(new_prefix=self._config.subnet_prefix):
            if not any(subnet.overlaps(u) for u in used):
                yield subnet

    def ensure(self, name: str, lease_id: str) -> LeaseNetwork:
        """The lease's own network, created unless it exists (an earlier attempt)."""
        existing = self.find(lease_id)
        if existing:
            return existing[0]
        try:
            return self._create(name, {self._lease_label: lease_id}, lease_id)
        except _Conflict:
            found = self.find(lease_id)
            if found:
                return found[0]
            raise NetworkError(f"lease network {name} exists but is not this lease's") from None

    def make_spare(self) -> LeaseNetwork:
        """One more network for a future lease; kept until ``claim`` hands it out."""
        name = f"gpuagent-spare-{uuid.uuid4().hex[:12]}"
        network = self._create(name, {LABEL_SPARE: "true"}, name)
        with self._lock:
            self._spares.append(network)
        return network

    def adopt_spares(self, spares: list[LeaseNetwork], keep: int) -> list[LeaseNetwork]:
        """Take unclaimed spares found at start into the pool; returns those beyond ``keep``."""
        with self._lock:
            known = {n.id for n in self._spares}
            self._spares.extend(n for n in spares if n.id not in known)
            extra, self._spares = self._spares[keep:], self._spares[:keep]
        return extra

    def spare_count(self) -> int:
        with self._lock:
            return len(self._spares)

    def claim(self) -> LeaseNetwork | None:
        """A spare for a lease starting now, or None when there is none."""
        with self._lock:
            return self._spares.pop(0) if self._spares else None

    def _create(self, name: str, extra_labels: dict[str, str], key: str) -> LeaseNetwork:
        labels = {**self._labels, **extra_labels}
        options = {
            ICC_OPTION: "false",
            BRIDGE_NAME_OPTION: bridge_name(self._config.bridge_prefix, self._node_id, key),
        }
        if self._config.publish_address.version == 4:
            # Docker's default for ports published without an address; the runtime
            # always names one, this covers anything that does not.
            options[HOST_BINDING_OPTION] = str(self._config.publish_address)
        with self._create_lock:
            for subnet in self._candidates():
                gateway = next(subnet.hosts())
                ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(gateway))])
                try:
                    created = self._client.api.create_network(
                        name,
                        driver="bridge",
                        options=options,
                        ipam=ipam,
                        check_duplicate=True,
                        labels=labels,
                    )
                except docker.errors.APIError as exc:
                    if "overlap" in _explain(exc).lower():
                        continue  # someone (another agent, a test) took it meanwhile
                    if exc.status_code == 409:
                        raise _Conflict from exc
                    raise NetworkError(f"lease network create failed: {_explain(exc)}") from exc
                except OSError as exc:
                    raise NetworkError(
                        f"lease network create failed: Docker did not answer: {exc}"
                    ) from exc
                log.info("lease network created", extra={"network": name, "subnet": str(subnet)})
                return LeaseNetwork(
                    id=str(created.get("Id", "")),
                    name=name,
                    lease_id=extra_labels.get(self._lease_label, ""),
                    subnet=str(subnet),
                    bridge=options[BRIDGE_NAME_OPTION],
                    spare=LABEL_SPARE in extra_labels,
                )
        raise NetworkError(
            f"no free /{self._config.subnet_prefix} left in isolation.subnet_pool "
            f"{self._config.subnet_pool} for the lease network"
        )

    def remove(self, network_id: str) -> None:
        """Remove one network; a gone one is fine. Containers must be removed first."""
        try:
            self._client.api.remove_network(network_id)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise NetworkError(f"lease network remove failed: {_explain(exc)}") from exc

    def remove_lease(self, lease_id: str) -> None:
        for network in self.find(lease_id):
            self.remove(network.id)
            log.info("lease network removed", extra={"lease_id": lease_id, "network": network.name})
