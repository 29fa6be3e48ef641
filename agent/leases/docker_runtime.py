"""Lease containers on the Docker Engine, through the docker SDK.

Every SDK call blocks, so each public coroutine runs it with ``asyncio.to_thread``.
The events stream is read by a dedicated daemon thread that feeds the loop with
``call_soon_threadsafe``: a blocked executor thread would keep ``asyncio.run``
from returning at shutdown.

Containers are created hardened whatever the spec says (the spec has already
been checked by ``spec.check_spec``): all capabilities dropped except the host's
allow-list, no-new-privileges, Docker's default seccomp profile, pids, memory
and CPU limits, no swap, no restart policy, and the only host path a per-lease
scratch dir. Every container carries the labels below; nothing without
``io.gpuagent.managed=true`` and this node's id is ever touched.

Each lease gets a bridge network of its own (``isolation.networks``), or none at
all when the spec asks for ``network_mode: none``; it never joins another lease's
network or the default bridge. Its ports are published on
``isolation.publish_address`` only, and before each network lease starts the
egress policy (``isolation.firewall``) is verified, restored if Docker or a
firewall reload dropped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from gpuagent.aio import wait_any

from ..config import IsolationConfig, RuntimeConfig
from ..isolation.firewall import Firewall, FirewallError
from ..isolation.networks import LeaseNetwork, LeaseNetworks, NetworkError
from .gpu_devices import gpu_access
from .scratch import ScratchError, ScratchSpace, resolve_mode
from .spec import (
    ImageRef,
    LeaseSpec,
    RegistryAuth,
    effective_cpus,
    effective_memory,
    effective_scratch,
)

log = logging.getLogger(__name__)

LABEL_MANAGED = "io.gpuagent.managed"
LABEL_LEASE = "io.gpuagent.lease-id"
LABEL_NODE = "io.gpuagent.node-id"
LABEL_GPUS = "io.gpuagent.gpus"
LABEL_EXPIRES = "io.gpuagent.expires-at"
LABEL_NETWORK = "io.gpuagent.network"  # the lease's network (a spare has no lease label)
SCRATCH_MOUNT = "/scratch"
LOG_TAIL_LINES = 100
# Events the manager acts on; the engine sends many more (exec, attach, ...).
WATCHED_ACTIONS = frozenset({"start", "die", "oom", "destroy"})
RESYNC = "resync"  # synthetic event: the stream (re)connected, look at everything


class RuntimeFailure(Exception):
    """A Docker operation failed; the message is fit for a lease's reason."""


class _StorageOptRefused(Exception):
    """The engine cannot bound the writable layer (storage-opt size) after all."""


class PullError(RuntimeFailure):
    """The image could not be made available."""


class ContainerExists(RuntimeFailure):
    """A container with the lease's name already exists (an earlier attempt)."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        super().__init__(f"container {container_id[:12]} already exists for this lease")


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    lease_id: str
    node_id: str
    gpu_uuids: tuple[str, ...]
    status: str  # created | running | paused | restarting | exited | dead | removing
    exit_code: int | None
    oom_killed: bool
    restart_count: int
    started_at: str
    error: str
    # Unix seconds the container exited, from State.FinishedAt; None while it has
    # not (Docker reports year 1 then) or when the engine gave nothing usable.
    finished_at: float | None = None
    network: str = ""  # name of the lease network it was created on; "" = none


@dataclass(frozen=True)
class ContainerEvent:
    action: str  # one of WATCHED_ACTIONS, or RESYNC
    container_id: str = ""
    lease_id: str = ""
    exit_code: int | None = None


def container_name(lease_id: str) -> str:
    # Lease ids are validated already; this keeps the name legal regardless.
    return "gpuagent-" + re.sub(r"[^A-Za-z0-9_.-]", "-", lease_id)


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or type(exc).__name__


def parse_docker_time(text: str) -> float | None:
    """Unix seconds of a Docker RFC 3339 timestamp (nanosecond precision), or None.

    Docker writes ``0001-01-01T00:00:00Z`` for "never"; that, and anything that
    does not parse, is None. Python's ``fromisoformat`` takes at most microseconds,
    so the fraction is cut to six digits first (sub-microsecond is noise here).
    """
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None or match.group(1).startswith("0001-"):
        return None
    fraction = (match.group(2) or "0")[:6]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    try:
        moment = datetime.fromisoformat(f"{match.group(1)}.{fraction:0<6}{zone}")
    except ValueError:
        return None
    return moment.timestamp()


def _info(container: Container) -> ContainerInfo:
    attrs: dict[str, Any] = container.attrs
    state: dict[str, Any] = attrs.get("State") or {}
    labels: dict[str, str] = (attrs.get("Config") or {}).get("Labels") or {}
    gpus = labels.get(LABEL_GPUS, "")
    return ContainerInfo(
        id=container.id or "",
        name=(attrs.get("Name") or "").lstrip("/"),
        lease_id=labels.get(LABEL_LEASE, ""),
        node_id=labels.get(LABEL_NODE, ""),
        gpu_uuids=tuple(g for g in gpus.split(",") if g),
        status=str(state.get("Status", "")),
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        restart_count=int(attrs.get("RestartCount") or 0),
        started_at=str(state.get("StartedAt", "")),
        error=str(state.get("Error", "")),
        finished_at=parse_docker_time(str(state.get("FinishedAt", ""))),
        network=labels.get(LABEL_NETWORK, ""),
    )


class PullBytes:
    """Bytes a pull downloaded, from the engine's progress events.

    Each layer being fetched reports ``Downloading`` with ``progressDetail.total``
    (its compressed size) many times; a layer already on the host reports
    ``Already exists`` and downloads nothing. The sum of each layer's largest
    total is what came over the network.
    """

    def __init__(self) -> None:
        self._layers: dict[str, int] = {}

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("status") != "Downloading":
            return
        detail = event.get("progressDetail")
        total = detail.get("total") if isinstance(detail, dict) else None
        layer = event.get("id")
        if isinstance(layer, str) and isinstance(total, int) and total > 0:
            self._layers[layer] = max(total, self._layers.get(layer, 0))

    @property
    def total(self) -> int:
        return sum(self._layers.values())


PullObserver = Callable[[float, int], None]  # (seconds, bytes downloaded) per pull


class DockerRuntime:
    def __init__(
        self,
        client: docker.DockerClient,
        config: RuntimeConfig,
        node_id: str,
        scratch_root: Path,
        on_pull: PullObserver | None = None,
        render_nodes: Mapping[str, str] | None = None,
        isolation: IsolationConfig | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self.node_id = node_id
        self.scratch_root = scratch_root
        self._on_pull = on_pull
        # AMD GPU UUID -> its /dev/dri/renderD* (see gpu_devices); empty on NVIDIA hosts.
        self._render_nodes = dict(render_nodes or {})
        self.isolation = isolation or IsolationConfig()
        self.networks = LeaseNetworks(
            client,
            self.isolation,
            node_id,
            {LABEL_MANAGED: "true", LABEL_NODE: node_id},
            LABEL_LEASE,
        )
        self.firewall = Firewall(self.isolation)
        self._firewall_recheck = asyncio.Event()
        # Set when the events stream reconnects after the first time: Docker restarted
        # (or its socket blipped), so what it rewrote is checked again.
        self.engine_reconnected = asyncio.Event()
        self._resyncs = 0
        # Lease id -> name of the spare network it took (its own networks carry the
        # lease id as a label; a spare cannot). Rebuilt from container labels at start.
        self._claimed: dict[str, str] = {}
        self._refill = asyncio.Event()
        self._refill_due = False
        mode, why = resolve_mode(config.scratch_mode)
        self.scratch = ScratchSpace(scratch_root, mode)
        log.info("scratch mode", extra={"mode": mode, "why": why})
        # Docker's storage-opt size works only on overlay2 over xfs with pquota; set
        # by ``detect_storage`` (None: unknown yet, so not used).
        self.writable_layer_bounded: bool | None = None

    def update_config(self, config: RuntimeConfig) -> None:
        """Limits for containers created from now on (SIGHUP); running ones keep theirs."""
        self._config = config

    @property
    def label_filters(self) -> list[str]:
        return [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={self.node_id}"]

    # -- images -----------------------------------------------------------------

    async def ensure_image(
        self, image: str, ref: ImageRef, auth: RegistryAuth | None = None
    ) -> None:
        """Make ``image`` local per ``pull_policy``; raises ``PullError`` with the cause."""
        policy = self._config.pull_policy
        if policy != "always" and await asyncio.to_thread(self._present, image):
            log.debug("image present, not pulling", extra={"image": image})
            return
        if policy == "never":
            raise PullError(f"image {image} is not present on this host and pull_policy is never")
        abort = threading.Event()
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self._pull, image, ref, auth, abort),
                timeout=self._config.pull_timeout,
            )
        except TimeoutError:
            abort.set()
            raise PullError(
                f"pull of {image} timed out after {self._config.pull_timeout:g}s"
            ) from None

    def _present(self, image: str) -> bool:
        try:
            self._client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            raise PullError(f"cannot inspect image {image}: {_explain(exc)}") from exc
        return True

    def _pull(
        self, image: str, ref: ImageRef, auth: RegistryAuth | None, abort: threading.Event
    ) -> None:
        auth_config = None
        if auth is not None and auth.username:
            auth_config = {"username": auth.username, "password": auth.password.get_secret_value()}
            if auth.server:
                auth_config["serveraddress"] = auth.server
        started = time.monotonic()
        last_log = 0.0
        downloaded = PullBytes()
        log.info("pulling image", extra={"image": image})
        try:
            stream = self._client.api.pull(
                ref.repository, tag=ref.pull_tag, stream=True, decode=True, auth_config=auth_config
            )
            for event in stream:
                if abort.is_set():
                    return
                if "error" in event:
                    raise PullError(f"pull of {image} failed: {event['error']}")
                downloaded.feed(event)
                now = time.monotonic()
                # Per-layer progress comes many times a second; a line every 5 s is enough.
                if now - last_log >= 5.0 or "progress" not in event:
                    last_log = now
                    log.debug(
                        "pull progress",
                        extra={
                            "image": image,
                            "layer": event.get("id"),
                            "status": event.get("status"),
                            "progress": event.get("progress"),
                        },
                    )
        except docker.errors.DockerException as exc:
            raise PullError(f"pull of {image} failed: {_explain(exc)}") from exc
        seconds = time.monotonic() - started
        log.info(
            "image pulled",
            extra={"image": image, "seconds": round(seconds, 1), "bytes": downloaded.total},
        )
        if self._on_pull is not None:
            self._on_pull(seconds, downloaded.total)

    # -- containers -------------------------------------------------------------

    def scratch_dir(self, lease_id: str) -> Path:
        return self.scratch_root / container_name(lease_id)

    async def create(
        self,
        lease_id: str,
        spec: LeaseSpec,
        gpu_uuids: Sequence[str],
        expires_at: float | None,
        device_request: bool,
    ) -> str:
        """Create (not start) the lease's container on its own network; returns its id."""
        # Independent steps (mkfs and mount, iptables-save, Docker), so side by side:
        # the lease start pays for the slowest only.
        scratch = asyncio.to_thread(self._prepare_scratch, lease_id, spec)
        network: str | None = None
        if spec.network_mode == "none":
            await scratch
        else:
            # Every step finishes before a failure is raised: the lease's cleanup must
            # not race a mount still being made.
            results = await asyncio.gather(
                scratch,
                self.ensure_firewall(),
                self.lease_network(lease_id),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            made = results[2]
            assert isinstance(made, LeaseNetwork)
            network = made.name
        return await asyncio.to_thread(
            self._create, lease_id, spec, tuple(gpu_uuids), expires_at, device_request, network
        )

    def _prepare_scratch(self, lease_id: str, spec: LeaseSpec) -> None:
        try:
            self.scratch.prepare(self.scratch_dir(lease_id), effective_scratch(spec, self._config))
        except (ScratchError, OSError) as exc:
            raise RuntimeFailure(f"scratch space could not be made: {exc}") from exc

    async def ensure_network(self, lease_id: str) -> LeaseNetwork:
        """The lease's own network, made now (used by the self-test's probes)."""
        try:
            return await asyncio.to_thread(self.networks.ensure, container_name(lease_id), lease_id)
        except NetworkError as exc:
            raise RuntimeFailure(str(exc)) from exc

    async def lease_network(self, lease_id: str) -> LeaseNetwork:
        """A network for the lease: the one it has (a retry), a spare, or a new one."""
        claimed = self._claimed.get(lease_id)
        if claimed is not None:
            return LeaseNetwork("", claimed, lease_id, "", "", spare=True)
        spare = self.networks.claim()
        if spare is None:
            return await self.ensure_network(lease_id)
        self._claimed[lease_id] = spare.name
        # Refilled once this lease has started (``start``): a network create running
        # beside the start would slow it down in dockerd.
        self._refill_due = True
        log.debug("lease took a spare network", extra={"lease_id": lease_id, "network": spare.name})
        return spare

    async def keep_spares(self, stop: asyncio.Event) -> None:
        """Keep ``isolation.spare_networks`` made ahead, so lease starts do not wait."""
        want = self.isolation.spare_networks
        while not stop.is_set():
            self._refill.clear()
            try:
                while self.networks.spare_count() < want and not stop.is_set():
                    await asyncio.to_thread(self.networks.make_spare)
            except NetworkError as exc:
                log.warning("cannot make a spare lease network", extra={"error": str(exc)})
            # Retried at the firewall's pace after a failure; woken by every claim.
            await wait_any(stop, self._refill, within=self.isolation.recheck_interval)

    def note_networks(self, containers: Sequence[ContainerInfo]) -> None:
        """At start, before any lease is finished: which spare each lease container took."""
        self._claimed = {c.lease_id: c.network for c in containers if c.network}

    async def sweep_networks(self, active: set[str], containers: Sequence[ContainerInfo]) -> None:
        """At start: keep live leases' networks and unused spares, remove the rest.

        A spare any container ever named is not unused: it served a lease and is never
        handed to another.
        """

        def _sweep() -> None:
            in_use = {c.network for c in containers if c.lease_id in active and c.network}
            named = {c.network for c in containers if c.network}
            spares = []
            for network in self.networks.list_managed():
                if network.name in in_use or (network.lease_id and network.lease_id in active):
                    continue  # a live lease's: re-adopted with its container
                if network.spare and network.name not in named:
                    spares.append(network)
                    continue
                log.warning(
                    "removing lease network no active lease claims",
                    extra={"lease_id": network.lease_id, "network": network.name},
                )
                with contextlib.suppress(NetworkError):
                    self.networks.remove(network.id)
            for extra in self.networks.adopt_spares(spares, self.isolation.spare_networks):
                with contextlib.suppress(NetworkError):
                    self.networks.remove(extra.id)

        try:
            await asyncio.to_thread(_sweep)
        except NetworkError as exc:
            log.warning("cannot sweep lease networks", extra={"error": str(exc)})

    async def ensure_firewall(self) -> bool:
        """Verify (and restore) the egress policy; raises ``RuntimeFailure`` if it cannot.

        Fails closed: a lease does not start while the rules that keep it off the
        LAN cannot be installed.
        """
        try:
            return await asyncio.to_thread(self.firewall.ensure)
        except FirewallError as exc:
            raise RuntimeFailure(f"egress policy could not be installed: {exc}") from exc

    def recheck_firewall(self) -> None:
        """Ask ``watch_firewall`` to verify now (the events stream reconnected)."""
        self._firewall_recheck.set()
        self._resyncs += 1
        if self._resyncs > 1:
            self.engine_reconnected.set()

    async def watch_firewall(self, stop: asyncio.Event) -> None:
        """Keep the egress policy in place: every ``recheck_interval`` and on request."""
        while not stop.is_set():
            self._firewall_recheck.clear()
            try:
                await self.ensure_firewall()
            except RuntimeFailure as exc:
                log.error("egress policy check failed", extra={"error": str(exc)})
            await wait_any(stop, self._firewall_recheck, within=self.isolation.recheck_interval)

    async def remove_network(self, lease_id: str) -> None:
        """Remove the lease's network (a spare it took, or its own); a gone one is fine."""
        claimed = self._claimed.pop(lease_id, None)
        try:
            if claimed is not None:
                await asyncio.to_thread(self.networks.remove, claimed)
            await asyncio.to_thread(self.networks.remove_lease, lease_id)
        except NetworkError as exc:
            raise RuntimeFailure(str(exc)) from exc

    async def list_networks(self) -> list[LeaseNetwork]:
        try:
            return await asyncio.to_thread(self.networks.list_managed)
        except NetworkError as exc:
            raise RuntimeFailure(str(exc)) from exc

    def _create(
        self,
        lease_id: str,
        spec: LeaseSpec,
        gpu_uuids: tuple[str, ...],
        expires_at: float | None,
        device_request: bool,
        network: str | None,
    ) -> str:
        scratch = self.scratch_dir(lease_id)
        memory = effective_memory(spec, self._config)
        env = dict(spec.env)
        # Only the allocated GPUs, by vendor (gpu_devices); NVIDIA_VISIBLE_DEVICES="void"
        # hides every GPU from an NVIDIA runtime.
        access = gpu_access(gpu_uuids, self._render_nodes, device_request=device_request)
        env.update(access.env)
        labels = {
            LABEL_MANAGED: "true",
            LABEL_LEASE: lease_id,
            LABEL_NODE: self.node_id,
            LABEL_GPUS: ",".join(gpu_uuids),
        }
        if network:
            labels[LABEL_NETWORK] = network
        if expires_at is not None:
            labels[LABEL_EXPIRES] = f"{expires_at:.3f}"
        # Host settings and the create call are built by hand, not via
        # containers.create(): that one inspects the new container afterwards, a
        # round trip to the engine on every lease start that we do not need.
        host: dict[str, Any] = {
            "cap_drop": ["ALL"],
            "cap_add": [c.upper().removeprefix("CAP_") for c in spec.cap_add] or None,
            "security_opt": ["no-new-privileges:true"],
            "pids_limit": self._config.pids_limit,
            "mem_limit": memory,
            "memswap_limit": memory,  # equal to the limit: no swap
            "nano_cpus": int(effective_cpus(spec, self._config) * 1e9),
            "read_only": self._config.read_only_rootfs,
            "mounts": [Mount(SCRATCH_MOUNT, str(scratch), type="bind")],
            "restart_policy": {"Name": "no"},
            # Its own network, or none: never the default bridge, never another lease's.
            "network_mode": network or "none",
            # Bounded logs: a chatty lease must not fill the host's disk.
            "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
        }
        if spec.shm_bytes:
            host["shm_size"] = spec.shm_bytes
        if self.writable_layer_bounded and self._config.writable_layer_size:
            host["storage_opt"] = {"size": str(self._config.writable_layer_size)}
        if self._config.runtime:
            host["runtime"] = self._config.runtime
        if self._config.read_only_rootfs:
            host["tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=64m"}  # noqa: S108 - in the container
        # Docker knows transports only: an http port is a tcp one to it.
        ports = [(p.container_port, "udp" if p.protocol == "udp" else "tcp") for p in spec.ports]
        if ports:
            # Never 0.0.0.0 / [::]: only the configured address (loopback by default).
            address = str(self.isolation.publish_address)
            host["port_bindings"] = {f"{port}/{proto}": (address,) for port, proto in ports}
        host.update(access.host)
        api = self._client.api
        try:
            created = self._create_container(api, host, network, spec, lease_id, env, labels, ports)
        except _StorageOptRefused:
            # overlay2 on xfs without pquota: the engine says so only now. Bound nothing
            # from here on (doctor reports it) rather than fail every lease.
            log.warning("storage-opt size refused by the engine; writable layers unbounded")
            self.writable_layer_bounded = False
            host.pop("storage_opt", None)
            created = self._create_container(api, host, network, spec, lease_id, env, labels, ports)
        container_id = str(created.get("Id", ""))
        log.info(
            "container created",
            extra={"lease_id": lease_id, "container_id": container_id, "gpus": list(gpu_uuids)},
        )
        return container_id

    def _create_container(
        self,
        api: Any,
        host: dict[str, Any],
        network: str | None,
        spec: LeaseSpec,
        lease_id: str,
        env: dict[str, str],
        labels: dict[str, str],
        ports: Sequence[tuple[int, str]],
    ) -> dict[str, Any]:
        try:
            created: dict[str, Any] = api.create_container(
                spec.image,
                command=list(spec.args) or None,
                name=container_name(lease_id),
                entrypoint=list(spec.command) or None,
                environment=env,
                labels=labels,
                detach=True,
                ports=ports or None,
                host_config=api.create_host_config(**host),
                networking_config=(
                    api.create_networking_config({network: api.create_endpoint_config()})
                    if network
                    else None
                ),
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                existing = self._client.containers.get(container_name(lease_id))
                raise ContainerExists(existing.id or "") from exc
            if "storage_opt" in host and "storage-opt" in _explain(exc):
                raise _StorageOptRefused from exc
            raise RuntimeFailure(f"container create failed: {_explain(exc)}") from exc
        except OSError as exc:
            # requests' connection errors and timeouts are OSErrors: the engine hung up
            # or did not answer within the client timeout. A container it may still have
            # created carries the lease's name; reconcile removes it.
            raise RuntimeFailure(f"container create failed: Docker did not answer: {exc}") from exc
        return created

    async def start(self, container_id: str) -> float | None:
        """Start the container; returns Docker's StartedAt (unix seconds) when known.

        Billing starts at Docker's own start time, as it ends at Docker's FinishedAt:
        the API call's latency (long on a loaded host) is not the tenant's time.
        """

        def _start() -> float | None:
            try:
                self._client.api.start(container_id)
            except docker.errors.APIError as exc:
                raise RuntimeFailure(f"container start failed: {_explain(exc)}") from exc
            except OSError as exc:
                raise RuntimeFailure(
                    f"container start failed: Docker did not answer: {exc}"
                ) from exc
            try:
                state = self._client.api.inspect_container(container_id)["State"]
            except (docker.errors.DockerException, OSError, KeyError):
                return None  # started; the caller falls back to its own clock
            return parse_docker_time(str(state.get("StartedAt") or ""))

        try:
            return await asyncio.to_thread(_start)
        finally:
            if self._refill_due:
                self._refill_due = False
                self._refill.set()

    async def stop(self, container_id: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; a gone container is fine."""

        def _stop() -> None:
            try:
                self._client.api.stop(container_id, timeout=max(0, round(grace)))
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                raise RuntimeFailure(f"container stop failed: {_explain(exc)}") from exc

        await asyncio.to_thread(_stop)

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        def _inspect() -> ContainerInfo | None:
            try:
                return _info(self._client.containers.get(container_id))
            except docker.errors.NotFound:
                return None

        return await asyncio.to_thread(_inspect)

    async def container_address(self, container_id: str) -> str | None:
        """The running container's IPv4 address on its lease network (health checks and
        the tunnel reach it there); None when it has none or is gone."""

        def _address() -> str | None:
            try:
                attrs = self._client.api.inspect_container(container_id)
            except (docker.errors.DockerException, OSError):
                return None
            labels = (attrs.get("Config") or {}).get("Labels") or {}
            networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
            # Only the lease's own network: never an address on another one.
            entry = networks.get(labels.get(LABEL_NETWORK, ""))
            address = str((entry or {}).get("IPAddress") or "")
            return address or None

        return await asyncio.to_thread(_address)

    async def logs_tail(self, container_id: str, lines: int = LOG_TAIL_LINES) -> str:
        def _logs() -> str:
            try:
                data = self._client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
            except docker.errors.NotFound:
                return ""
            except docker.errors.APIError as exc:
                log.warning(
                    "cannot read container logs",
                    extra={"container_id": container_id, "error": _explain(exc)},
                )
                return ""
            return bytes(data).decode("utf-8", errors="replace")

        return await asyncio.to_thread(_logs)

    async def remove(self, container_id: str) -> None:
        def _remove() -> None:
            try:
                self._client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                # 409 "removal already in progress" is as good as done.
                if exc.status_code != 409:
                    raise RuntimeFailure(f"container remove failed: {_explain(exc)}") from exc

        await asyncio.to_thread(_remove)

    async def remove_scratch(self, lease_id: str) -> None:
        try:
            await asyncio.to_thread(self.scratch.remove, self.scratch_dir(lease_id))
        except ScratchError as exc:
            raise RuntimeFailure(f"scratch removal failed: {exc}") from exc

    async def scratch_used(self, lease_id: str) -> int:
        return await asyncio.to_thread(self.scratch.used_bytes, self.scratch_dir(lease_id))

    async def detect_storage(self) -> str:
        """Whether the writable layer can be bounded here; returns the mode's description."""

        def _detect() -> str:
            info = self._client.api.info()
            driver = str(info.get("Driver", ""))
            status = {str(k): str(v) for k, v in info.get("DriverStatus") or []}
            backing = status.get("Backing Filesystem", "")
            bounded = driver == "overlay2" and backing == "xfs"
            self.writable_layer_bounded = bounded
            if bounded:
                return f"writable layer bounded (storage-opt size) on {driver} over {backing}"
            return (
                f"writable layer unbounded: storage driver {driver}"
                + (f" over {backing}" if backing else "")
                + " (storage-opt size needs overlay2 on xfs with pquota)"
            )

        try:
            return await asyncio.to_thread(_detect)
        except (docker.errors.DockerException, OSError) as exc:
            return f"writable layer mode unknown: {_explain(exc)}"

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container with our managed label and this node's id, any status."""

        def _list() -> list[ContainerInfo]:
            found = self._client.containers.list(all=True, filters={"label": self.label_filters})
            # The filter is the engine's; check again so a bug there cannot make
            # us touch someone else's container.
            infos = [_info(c) for c in found]
            return [i for i in infos if i.node_id == self.node_id and i.lease_id]

        return await asyncio.to_thread(_list)

    # -- events -----------------------------------------------------------------

    async def events(
        self, stop: asyncio.Event, reconnect_delay: float = 1.0
    ) -> AsyncIterator[ContainerEvent]:
        """Container events for our leases until ``stop``; reconnects on failure.

        Yields ``RESYNC`` each time the stream is (re)established: events may
        have been missed before it, so the consumer should look at every lease.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ContainerEvent | BaseException | None] = asyncio.Queue()
        since: int | None = None
        while not stop.is_set():
            holder: list[Any] = []
            thread = threading.Thread(
                target=self._pump,
                args=(loop, queue, since, holder),
                name="docker-events",
                daemon=True,
            )
            thread.start()
            stop_wait = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait(
                        {get, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if get not in done:
                        get.cancel()
                        return
                    item = get.result()
                    if item is None or isinstance(item, BaseException):
                        if item is not None:
                            log.warning(
                                "docker events stream failed; reconnecting",
                                extra={
                                    "error": _explain(item)
                                    if isinstance(item, Exception)
                                    else repr(item)
                                },
                            )
                        break
                    if item.action != RESYNC:
                        since = int(time.time()) - 1  # overlap: duplicates are harmless
                    yield item
            finally:
                stop_wait.cancel()
                for stream in holder:
                    with contextlib.suppress(Exception):
                        stream.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=reconnect_delay)

    def _pump(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[ContainerEvent | BaseException | None],
        since: int | None,
        holder: list[Any],
    ) -> None:
        def put(item: ContainerEvent | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            filters: dict[str, Any] = {"type": "container", "label": self.label_filters}
            stream = self._client.events(decode=True, since=since, filters=filters)
            holder.append(stream)
            put(ContainerEvent(RESYNC))
            for raw in stream:
                action = str(raw.get("Action") or raw.get("status") or "")
                if action not in WATCHED_ACTIONS:
                    continue
                attrs: dict[str, str] = (raw.get("Actor") or {}).get("Attributes") or {}
                exit_code = attrs.get("exitCode")
                put(
                    ContainerEvent(
                        action=action,
                        container_id=str(raw.get("id") or (raw.get("Actor") or {}).get("ID", "")),
                        lease_id=attrs.get(LABEL_LEASE, ""),
                        exit_code=int(exit_code) if exit_code and exit_code.isdigit() else None,
                    )
                )
        except Exception as exc:  # any failure ends this stream; the reader reconnects
            put(exc)
            return
        put(None)
