"""The running agent, assembled: every part built from config and wired together.

Data flows one way per edge (DESIGN.md): hardware -> health -> Hello/Heartbeat;
LeaseAssign -> lease manager -> Docker; Docker + NVML -> sampler -> outbox ->
UsageReport -> UsageAck -> prune. This module only connects those parts; each
lives in its own package and is tested there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
from google.protobuf.json_format import MessageToDict

from gpuagent import sdnotify
from gpuagent.configload import ConfigError
from gpuagent.logsetup import setup_logging
from gpuagent.usage import SignedUsageRecord
from gpuagent.usage_wire import record_to_pb
from gpuagent.v1 import coordinator_pb2, leases_pb2, usage_pb2

from . import control_token, wire
from .attestation import (
    AttestationResponder,
    GpuResult,
    device_index_from_inventory,
    identity_from_inventory,
    load_backend,
    per_gpu_prover,
)
from .config import AgentConfig, load_agent_config
from .daemon import Agent
from .doctor import CheckResult, fatal_results, run_preflight
from .gpu import GpuBackend, open_backend
from .gpu.cordons import CordonStore
from .gpu.health import HealthMonitor
from .hostinfo import collect_host_info
from .identity import NodeIdentity, load_or_create
from .isolation.selftest import SelfTest, SelfTestResult
from .isolation.toolkit import ToolkitGate
from .leases.allocator import GpuAllocator
from .leases.docker_runtime import DockerRuntime
from .leases.manager import LeaseManager
from .leases.records import LeaseUpdate
from .leases.spec import GpuDescription
from .leases.statedb import StateDB
from .leases.states import LeaseState
from .link import CoordinatorLink, NotConnected
from .link.reporter import HeartbeatState, HelloState, default_node_name
from .metrics.agent_metrics import Attestation
from .metrics.backend_source import gpu_source_for
from .metrics.gpu_collector import GpuHealth as MetricsGpuHealth
from .metrics.readiness import (
    Readiness,
    coordinator_check,
    disk_check,
    docker_check,
    nvml_check,
)
from .metrics.registry import Telemetry, build_telemetry
from .metrics.server import StatusApp, StatusServer
from .metrics.status import (
    StatusDocument,
    coordinator_section,
    gpus_section,
    leases_section,
    readiness_section,
    usage_section,
)
from .reload import merge_live, plan_reload
from .tunnel import LeaseTargets, TunnelClient
from .usage.cgroup import CgroupReader, ContainerCounters, lease_bridge
from .usage.outbox import OUTBOX_FILE_NAME, Outbox
from .usage.sampler import Sampler
from .usage.sources import MeteredLease, SnapshotGpuUsage

if TYPE_CHECKING:  # imported lazily at run time: it brings numpy
    from benchmarks.attest.prover import Prover

log = logging.getLogger(__name__)


# How a lease's start ended, for gpu_agent_lease_starts_total{outcome}.
_START_OUTCOMES = {
    LeaseState.RUNNING: "started",
    LeaseState.REJECTED: "rejected",
    LeaseState.CANCELLED: "cancelled",
}


class PreflightFailed(Exception):
    """A fatal preflight problem: the daemon refuses to start (exit code 2)."""

    def __init__(self, results: Sequence[CheckResult]) -> None:
        self.results = list(results)
        super().__init__("; ".join(f"{r.name}: {r.message}" for r in results))


@dataclass(frozen=True)
class _Metered:
    """A running lease as the sampler sees it."""

    lease_id: str
    container_id: str
    gpu_uuids: Sequence[str]
    started_monotonic: float
    pid: int | None = None


class _DockerPidReader:
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


class AgentNode:
    """Owns the parts of one agent process; ``start()`` builds them, ``agent`` runs them."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        nvml_module: Any = None,
        docker_client: docker.DockerClient | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._nvml_module = nvml_module
        self._docker_client = docker_client
        self.agent = Agent(config)
        self.identity: NodeIdentity
        self.backend: GpuBackend
        self.health: HealthMonitor
        self.leases: LeaseManager
        self.outbox: Outbox
        self.sampler: Sampler
        self.link: CoordinatorLink
        self._started = time.monotonic()
        self._usage_wake = asyncio.Event()
        self._usage_acked = asyncio.Event()
        self._usage_sent_through = 0
        self._draining = False
        self._drain_deadline: float | None = None  # unix seconds
        self._drain_task: asyncio.Task[None] | None = None
        self._inventory_pb: Any = None
        self._gpu_names: dict[str, GpuDescription] = {}
        self._assigned_at: dict[str, float] = {}  # lease id -> monotonic, until it runs
        self._run_started: dict[str, float] = {}  # lease id -> monotonic start, while it runs

    # -- building -------------------------------------------------------------------

    async def start(self) -> Agent:
        config = self.config
        state_dir = config.node.state_dir
        results = await asyncio.to_thread(
            run_preflight, config, nvml_module=self._nvml_module, log_problems=True
        )
        fatal = fatal_results(results)
        if fatal:
            raise PreflightFailed(fatal)
        self.identity = await asyncio.to_thread(load_or_create, state_dir)
        log.info(
            "node identity",
            extra={"node_id": self.identity.node_id, "key": str(self.identity.path)},
        )
        self.backend = await asyncio.to_thread(
            open_backend, config.gpu, nvml_module=self._nvml_module
        )
        if self.backend.simulated:
            log.warning(
                "running on SIMULATED GPUs: nothing here is real hardware",
                extra={
                    "profile": config.gpu.simulated.profile,
                    "count": config.gpu.simulated.count,
                },
            )
        gpus = await asyncio.to_thread(self.backend.inventory)
        self._gpu_names = {
            g.uuid: GpuDescription(name=g.name or "", memory_bytes=g.memory_total_bytes or 0)
            for g in gpus
            if g.uuid
        }
        host = await asyncio.to_thread(collect_host_info, state_dir, config.runtime.docker_host)
        self._inventory_pb = wire.inventory(host, gpus)

        # One GPU reader (NVML or amdsmi) feeds both the usage sampler and /metrics.
        self.gpu_source = gpu_source_for(self.backend)
        cordons = CordonStore(state_dir)
        self.health = HealthMonitor(self.backend, cordons, interval=config.gpu.health_interval)
        await asyncio.to_thread(self.health.check_once)

        client = self._docker_client or docker.DockerClient(
            base_url=config.runtime.docker_host, timeout=60
        )
        self._docker_client = client
        scratch = config.runtime.scratch_dir or state_dir / "scratch"
        runtime = DockerRuntime(
            client,
            config.runtime,
            self.identity.node_id,
            Path(scratch),
            on_pull=self._on_image_pulled,
            render_nodes={g.uuid: g.render_node for g in gpus if g.uuid and g.render_node},
            isolation=config.isolation,
        )
        self.runtime = runtime
        log.info("container storage", extra={"mode": await runtime.detect_storage()})
        statedb = await asyncio.to_thread(StateDB.in_state_dir, state_dir)
        # Real GPUs only: with simulated ones no container reaches a GPU.
        toolkit_gate = None if self.backend.simulated else ToolkitGate()
        if toolkit_gate is not None:
            await asyncio.to_thread(toolkit_gate.refresh)
        self.leases = LeaseManager(
            config,
            runtime,
            statedb,
            GpuAllocator(),
            self.identity.node_id,
            gpu_uuids_source=self._leasable_gpus,
            on_update=self._on_lease_update,
            simulated_gpus=self.backend.simulated,
            gpu_details_source=lambda: self._gpu_names,
            gpu_gate=toolkit_gate.refusal if toolkit_gate is not None else None,
        )
        self.outbox = await asyncio.to_thread(
            Outbox, state_dir / OUTBOX_FILE_NAME, alert_records=config.metering.outbox_alert_records
        )
        self.sampler = Sampler(
            self.outbox,
            self._metered_leases,
            SnapshotGpuUsage(self.gpu_source),
            self.identity.sign,
            self.identity.node_id,
            config.metering,
            reader_factory=lambda lease: _DockerPidReader(
                client, lease.container_id, lease.lease_id
            ),
            on_records=self._on_usage_records,
        )
        # Re-adopt what ran before a restart before telling the coordinator anything. After
        # the sampler exists: a lease that ended while the agent was down gets its final
        # usage record here, and without a sampler it would never get one.
        # Telemetry first: a final usage record written by reconcile updates its gauges.
        self.telemetry = self._build_telemetry()
        await self.leases.reconcile()
        # Before the link: the first Hello carries the result.
        await self._check_isolation()

        self.link = CoordinatorLink(
            config.coordinator,
            self.identity,
            self,
            node_name=config.node.name or default_node_name(),
            region=config.node.region or "",
            labels=self._labels(),
            observer=self.telemetry.agent,
        )
        status_server = self._build_status_server(client)
        self.link.on("lease_assign", self._on_lease_assign)
        self.link.on("lease_cancel", self._on_lease_cancel)
        self.link.on("lease_update_ack", self._on_lease_update_ack)
        self.link.on("usage_ack", self._on_usage_ack)
        self.link.on("drain", self._on_drain)
        self.link.on_session(self._on_session)
        # Service leases: the tunnel to the relay the coordinator names (docs/services.md).
        self.tunnel = TunnelClient(
            config.coordinator, self.identity, LeaseTargets(self.leases, statedb, client)
        )
        self.link.on_session(self.tunnel.on_welcome)
        self.attestation = await self._build_attestation()

        agent = self.agent
        agent.add_component("watchdog", sdnotify.watchdog_task)
        agent.add_component("gpu-health", self.health.run)
        agent.add_component("egress-policy", runtime.watch_firewall)
        agent.add_component("isolation-self-test", self._recheck_isolation)
        agent.add_component("leases", self.leases.run)
        agent.add_component("usage-sampler", self.sampler.run)
        agent.add_component("usage-sender", self._usage_sender)
        agent.add_component("coordinator-link", self.link.run)
        agent.add_component("relay-tunnel", self.tunnel.run)
        agent.add_component("status-server", status_server.run)
        agent.add_component("ready", self._announce_ready)
        agent.add_component("disconnect-guard", self._disconnect_guard)
        agent.on_reload = self.reload
        agent.before_stop.append(self._flush_usage)
        return agent

    async def _build_attestation(self) -> AttestationResponder | None:
        # The Prover and its backend (numpy, maybe torch) load on the first challenge,
        # off the event loop: holding them from startup cost the idle daemon ~15 MB
        # (docs/performance.md). A backend that cannot load fails that challenge.
        name = self.config.attestation.backend
        identity = identity_from_inventory(self._inventory_pb.gpus)
        sign = self.identity.sign

        def build(device: int) -> Prover:
            from benchmarks.attest.prover import Prover

            try:
                backend = load_backend(name, device)
            except Exception as exc:
                # The coordinator sees the challenge fail and withholds leases: say why.
                log.error(
                    "attestation backend unavailable; challenges will be refused",
                    extra={"backend": name, "error": str(exc)},
                )
                raise
            log.info(
                "attestation backend loaded", extra={"backend": backend.name, "device": device}
            )
            return Prover(sign, backend, identity)

        # One Prover per GPU, each bound to its own device (built on that GPU's first
        # challenge), so every GPU is timed on its own work.
        prover_for = per_gpu_prover(build, device_index_from_inventory(self._inventory_pb.gpus))
        responder = AttestationResponder(self.link, prover_for, on_result=self._on_attestation)
        responder.register()
        return responder

    async def _check_isolation(self) -> SelfTestResult:
        iso = self.config.isolation
        if iso.self_test:
            result = await SelfTest(self.runtime, iso.self_test_image).run()
        else:
            result = SelfTestResult("disabled", "isolation.self_test is off", time.time())
        level = logging.INFO if result.status in ("verified", "disabled") else logging.ERROR
        log.log(level, "isolation: %s", result, extra={"status": result.status})
        self.isolation_result = result
        self._inventory_pb.isolation.CopyFrom(
            wire.isolation(result, iso.egress_policy, self.runtime.scratch.mode)
        )
        self.telemetry.agent.set_isolation(result.status == "verified")
        return result

    async def _recheck_isolation(self, stop: asyncio.Event) -> None:
        """After Docker restarts: run the self-test again (the next Hello carries it)."""
        reconnected = self.runtime.engine_reconnected
        while not stop.is_set():
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(reconnected.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if stop.is_set():
                return
            reconnected.clear()
            # The firewall watcher was poked by the same reconnect; the self-test's own
            # ensure_firewall waits for nothing more than that check.
            await self._check_isolation()

    def _labels(self) -> dict[str, str]:
        labels = dict(self.config.node.labels)
        price = self.config.node.price_micros_per_gpu_hour
        if price is not None:
            # The reference scheduler reads the provider's ask from this Hello label.
            labels["price_micros_per_gpu_hour"] = str(price)
        return labels

    def _on_attestation(self, result: GpuResult) -> None:
        index = {g.uuid: g.index for g in self._inventory_pb.gpus}.get(result.gpu_uuid, -1)
        score = 0.0
        with contextlib.suppress(KeyError, ValueError):
            from benchmarks.attest.skus import get_sku  # numpy: loaded with the prover

            peak = get_sku(result.sku.partition("@")[0]).peak_flops("fp16") / 1e12
            score = min(1.0, result.measured_tflops / peak) if peak else 0.0
        self.telemetry.agent.set_attestation(
            index, result.gpu_uuid, Attestation(result.passed, score, time.time())
        )
        # agent.attestation already logs each verdict with its figures.

    async def close(self) -> None:
        """Release what the parts hold; containers keep running (they are Docker's)."""
        if getattr(self, "attestation", None) is not None:
            with contextlib.suppress(Exception):
                await self.attestation.aclose()  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.outbox.close)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.backend.close)
        if self._docker_client is not None:
            with contextlib.suppress(Exception):
                self._docker_client.close()

    def _on_image_pulled(self, seconds: float, size_bytes: int) -> None:
        # Telemetry is built later in start-up than the runtime; pulls come later still.
        telemetry: Telemetry | None = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.agent.image_pulled(seconds, size_bytes)

    def _build_telemetry(self) -> Telemetry:
        def gpu_health() -> dict[str, MetricsGpuHealth]:
            return {
                h.uuid: MetricsGpuHealth(
                    state=h.state.value,
                    cordoned=h.cordoned,
                    reason=h.cordon_reason or "; ".join(h.reasons),
                )
                for h in self.health.snapshot()
                if h.uuid
            }

        return build_telemetry(
            gpu_source=self.gpu_source,
            scrape_timeout=self.config.status.scrape_timeout,
            gpu_leases=lambda: self.leases.snapshot().allocations,
            gpu_health=gpu_health,
            lease_states=lambda: _count_states(self.leases),
            usage_alert_records=self.config.metering.outbox_alert_records,
        )

    def _build_status_server(self, client: docker.DockerClient) -> StatusServer:
        telemetry = self.telemetry
        readiness = Readiness(self.config.status.scrape_timeout)
        readiness.add("coordinator", coordinator_check(lambda: self.link.connected))
        readiness.add("docker", docker_check(client.ping))
        readiness.add("nvml", nvml_check(self.gpu_source))
        readiness.add(
            "disk",
            disk_check(self.config.node.state_dir, self.config.runtime.min_free_state_disk),
        )
        doc = StatusDocument()
        doc.add(
            "node",
            lambda: {
                "node_id": self.identity.node_id,
                "name": self.config.node.name or default_node_name(),
                "draining": self._draining,
                "simulated_gpus": self.backend.simulated,
                "uptime_seconds": round(time.monotonic() - self._started, 1),
            },
        )
        if telemetry.gpu is not None:
            doc.add("gpus", gpus_section(telemetry.gpu, lambda: self.leases.snapshot().allocations))
        doc.add(
            "coordinator", coordinator_section(telemetry.agent, self.config.coordinator.address)
        )
        doc.add(
            "leases",
            leases_section(
                lambda: _count_states(self.leases),
                lambda: [
                    {
                        "lease_id": v.lease_id,
                        "state": v.state.value,
                        "gpu_uuids": list(v.gpu_uuids),
                        "container_id": v.container_id,
                        "expires_at": v.expires_at,
                    }
                    for v in self.leases.snapshot().leases
                ],
            ),
        )
        doc.add("usage", usage_section(telemetry.agent))
        doc.add("readiness", readiness_section(readiness))
        loop = asyncio.get_running_loop()

        def drain(body: Mapping[str, Any]) -> dict[str, Any]:
            enabled = bool(body.get("enabled", True))
            raw = body.get("deadline_unix")
            deadline = float(raw) if isinstance(raw, int | float) and enabled else None
            loop.call_soon_threadsafe(
                self._set_draining, enabled, "local (gpu-agent drain)", deadline
            )
            return {"draining": enabled, "deadline_unix": deadline}

        def uncordon(body: Mapping[str, Any]) -> dict[str, Any]:
            uuid = str(body.get("uuid", ""))
            released = self.health.cordons.uncordon(uuid)
            return {"uncordoned": released is not None, "uuid": uuid}

        app = StatusApp(
            telemetry.registry,
            readiness=readiness,
            status=doc.build,
            actions={"drain": drain, "uncordon": uncordon},
            control_token=control_token.load_or_create(self.config.node.state_dir),
        )
        return StatusServer(self.config.status.listen, app)

    def _on_usage_records(self, _records: Sequence[SignedUsageRecord]) -> None:
        self._usage_wake.set()
        self._refresh_usage_metrics()

    def _refresh_usage_metrics(self) -> None:
        stats = self.sampler.stats
        if stats is not None:
            oldest = stats.oldest_pending_unix_ns
            self.telemetry.agent.set_usage_backlog(
                stats.pending, oldest / 1e9 if oldest is not None else None
            )

    # -- what the link reports ------------------------------------------------------

    def _leasable_gpus(self) -> list[str]:
        if self._draining:
            return []
        return sorted(self.health.healthy_uuids())

    def _lease_statuses(self) -> list[Any]:
        return [wire.lease_status(v) for v in self.leases.snapshot().leases]

    async def hello_state(self) -> HelloState:
        stats = await asyncio.to_thread(self.outbox.stats)
        return HelloState(
            inventory=self._inventory_pb,
            gpu_health=[wire.gpu_health(h) for h in self.health.snapshot() if h.uuid],
            leases=self._lease_statuses(),
            last_acked_usage_seq=stats.acked_seq,
            draining=self._draining,
        )

    async def heartbeat_state(self) -> HeartbeatState:
        snapshot = self.leases.snapshot()
        allocated = set(snapshot.allocations)
        health = [h for h in self.health.snapshot() if h.uuid]
        free = [h.uuid for h in health if h.leasable and h.uuid not in allocated]
        stats = self.sampler.stats
        return HeartbeatState(
            gpu_health=[wire.gpu_health(h) for h in health],
            free_gpu_uuids=[] if self._draining else [u for u in free if u],
            allocated_gpu_uuids=sorted(allocated),
            leases=[wire.lease_status(v) for v in snapshot.leases],
            draining=self._draining,
            usage_pending=stats.pending if stats is not None else 0,
        )

    # -- leases ---------------------------------------------------------------------

    async def _on_lease_assign(self, msg: leases_pb2.LeaseAssign) -> None:
        spec = MessageToDict(msg.spec, preserving_proto_field_name=True)
        expires = msg.expires_at_unix_nanos / 1e9 if msg.expires_at_unix_nanos else None
        self._assigned_at.setdefault(msg.lease_id, time.monotonic())
        await self.leases.assign(msg.lease_id, spec, expires, gpu_uuids=list(msg.gpu_uuids) or None)

    async def _on_lease_cancel(self, msg: leases_pb2.LeaseCancel) -> None:
        await self.leases.cancel(
            msg.lease_id, msg.reason or "cancelled by coordinator", msg.grace_seconds or None
        )

    async def _on_lease_update_ack(self, msg: leases_pb2.LeaseUpdateAck) -> None:
        await self.leases.ack_update(msg.lease_id, msg.update_seq)

    async def _on_lease_update(self, update: LeaseUpdate) -> None:
        assigned = self._assigned_at.get(update.lease_id)
        if assigned is not None and (update.state.terminal or update.state.value == "running"):
            del self._assigned_at[update.lease_id]
            outcome = _START_OUTCOMES.get(update.state, "start_failed")
            self.telemetry.agent.lease_started(outcome, time.monotonic() - assigned)
        if update.state == LeaseState.RUNNING:
            # Docker's StartedAt (carried on the update), not when this update is handled:
            # a short lease may have finished by now, and it must still be billed in full.
            started = {r.lease_id: r.started_monotonic for r in self.leases.running_leases()}
            self._run_started[update.lease_id] = (
                started.get(update.lease_id) or _monotonic_at(update.started_at) or time.monotonic()
            )
            # Energy counters read now, not at the first tick: the lease's first usage
            # record is then measured, not estimated (metering.md).
            sampler: Sampler | None = getattr(self, "sampler", None)
            if sampler is not None:
                for metered in self._metered_leases():
                    if metered.lease_id == update.lease_id:
                        await sampler.lease_started(metered)
        await self._close_usage(update)
        if not hasattr(self, "link"):
            # Reconcile at start reports before the link exists; the update stays in the
            # state DB and goes out with the first session's pending updates.
            return
        with contextlib.suppress(NotConnected):
            # Kept in the state DB until acked: a failed send is re-sent on reconnect.
            await self.link.send(
                coordinator_pb2.AgentMessage(lease_update=wire.lease_update(update))
            )

    async def _close_usage(self, update: LeaseUpdate) -> None:
        """Write a terminal lease's final usage record (idempotent: at most one)."""
        if not (update.state.terminal and update.state != LeaseState.REJECTED):
            return
        if not update.container_id:
            # Refused or failed before it had a container: it never ran and gets no
            # usage record (the coordinator would refuse one as not placed).
            return
        view = _Metered(
            update.lease_id,
            update.container_id,
            update.gpu_uuids,
            # After a restart the start is known only from the lease's record.
            self._run_started.pop(update.lease_id, 0.0) or _monotonic_at(update.started_at) or 0.0,
        )
        await self.sampler.close_lease(view, end_monotonic=_monotonic_at(update.ended_at))

    def _metered_leases(self) -> list[MeteredLease]:
        return [
            _Metered(r.lease_id, r.container_id, r.gpu_uuids, r.started_monotonic)
            for r in self.leases.running_leases()
        ]

    # -- usage ------------------------------------------------------------------------

    async def _on_usage_ack(self, msg: usage_pb2.UsageAck) -> None:
        pruned = await asyncio.to_thread(self.outbox.ack, msg.acked_through_seq)
        self._usage_acked.set()
        log.debug("usage acked", extra={"through_seq": msg.acked_through_seq, "pruned": pruned})

    async def _on_session(self, welcome: coordinator_pb2.Welcome) -> None:
        # What the coordinator stored is safe to prune; everything after it is re-sent.
        if welcome.acked_usage_seq:
            await asyncio.to_thread(self.outbox.ack, welcome.acked_usage_seq)
        stats = await asyncio.to_thread(self.outbox.stats)
        self._usage_sent_through = stats.acked_seq
        self._usage_wake.set()
        for update in await self.leases.pending_updates():
            # The agent may have died between storing a terminal update and writing the
            # lease's final usage record: write it now (a no-op when it exists).
            await self._close_usage(update)
            await self.link.send(
                coordinator_pb2.AgentMessage(lease_update=wire.lease_update(update))
            )
        if welcome.draining != self._draining:
            self._set_draining(welcome.draining, "coordinator")

    async def _flush_usage(self) -> None:
        """At shutdown: close due intervals and deliver what is pending while connected.

        Nothing is lost without this (the outbox is durable and replayed after the
        restart); it only spares the coordinator a backlog after routine restarts.
        """
        await self.sampler.tick()
        target = (await asyncio.to_thread(self.outbox.stats)).last_seq
        while self.link.connected:
            stats = await asyncio.to_thread(self.outbox.stats)
            if stats.acked_seq >= target:
                log.info("usage flushed", extra={"acked_through_seq": stats.acked_seq})
                return
            self._usage_acked.clear()
            self._usage_wake.set()
            # Re-checked on every ack; the agent's drain timeout bounds the whole flush.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._usage_acked.wait(), 1.0)

    async def _usage_sender(self, stop: asyncio.Event) -> None:
        """Send outbox records in seq order whenever there are some and a session is open."""
        batch_size = self.config.metering.batch_size
        while not stop.is_set():
            if self.link.connected:
                batch: list[SignedUsageRecord] = await asyncio.to_thread(
                    self.outbox.pending, batch_size, self._usage_sent_through
                )
                if batch:
                    report = usage_pb2.UsageReport(records=[record_to_pb(r) for r in batch])
                    try:
                        await self.link.send(coordinator_pb2.AgentMessage(usage_report=report))
                    except NotConnected:
                        continue
                    self._usage_sent_through = batch[-1].record.seq
                    continue
            self._usage_wake.clear()
            waiters = [
                asyncio.ensure_future(self._usage_wake.wait()),
                asyncio.ensure_future(stop.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    # -- drain and readiness ------------------------------------------------------------

    async def _on_drain(self, msg: Any) -> None:
        deadline = msg.deadline_unix_nanos / 1e9 if msg.deadline_unix_nanos else None
        source = f"coordinator: {msg.reason}" if msg.reason else "coordinator"
        self._set_draining(msg.enabled, source, deadline)

    def _set_draining(self, draining: bool, source: str, deadline: float | None = None) -> None:
        """No new leases while draining; at ``deadline`` the running ones are stopped."""
        if draining == self._draining and deadline == self._drain_deadline:
            return
        self._draining = draining
        self._drain_deadline = deadline if draining else None
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        if draining and deadline is not None:
            self._drain_task = asyncio.get_running_loop().create_task(
                self._stop_at_deadline(deadline), name="drain-deadline"
            )
        log.warning(
            "drain %s",
            "enabled: no new leases" if draining else "lifted",
            extra={"source": source, "deadline": deadline},
        )
        sdnotify.status("draining" if draining else "running")

    async def _stop_at_deadline(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        await self._cancel_all("drain deadline reached")

    async def _cancel_all(self, reason: str) -> None:
        running = [v.lease_id for v in self.leases.snapshot().leases if not v.state.terminal]
        if running:
            log.warning("stopping running leases", extra={"reason": reason, "leases": running})
        for lease_id in running:
            await self.leases.cancel(lease_id, reason)

    async def _disconnect_guard(self, stop: asyncio.Event) -> None:
        """Off by default (leases run through outages); like Nomad's stop_on_client_after."""
        while not stop.is_set():
            limit = self.config.coordinator.stop_leases_after_disconnect
            if limit is not None and not self.link.connected:
                since = time.monotonic()
                while not stop.is_set() and not self.link.connected:
                    if time.monotonic() - since >= limit:
                        await self._cancel_all(
                            f"no coordinator for {limit:.0f}s "
                            "(coordinator.stop_leases_after_disconnect)"
                        )
                        break
                    await _wait(stop, 1.0)
                while not stop.is_set() and not self.link.connected:
                    await _wait(stop, 1.0)
            await _wait(stop, 1.0)

    async def reload(self) -> None:
        """SIGHUP: apply the live-safe changes of the config file; report the rest."""
        sdnotify.reloading(status="reloading configuration")
        try:
            new = await asyncio.to_thread(load_agent_config, self.config_path)
        except ConfigError as exc:
            log.error(
                "config reload failed; keeping the running config",
                extra={"file": exc.source, "problems": exc.problems},
            )
            sdnotify.ready(status="reload failed: kept the running config")
            return
        plan = plan_reload(self.config, new)
        if plan.live:
            self.config = merge_live(self.config, new, plan)
            setup_logging(self.config.log.level, self.config.log.format)
            self.leases.update_policy(self.config.runtime)
        if plan.restart:
            log.warning(
                "config changes need a restart to apply", extra={"keys": list(plan.restart)}
            )
        log.info(
            "config reloaded",
            extra={"applied": list(plan.live), "need_restart": list(plan.restart)},
        )
        sdnotify.ready(status="running (config reloaded)")

    async def _announce_ready(self, stop: asyncio.Event) -> None:
        """READY after the first Welcome, or degraded-ready if the coordinator is away.

        systemd would otherwise keep the unit in 'activating' (and time it out)
        while the coordinator is down, although the agent works: leases keep
        running and usage keeps accruing.
        """
        connected = asyncio.ensure_future(self.link.wait_connected())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait(
            [connected, stopped],
            timeout=self.config.coordinator.call_timeout * 3,
            return_when=asyncio.FIRST_COMPLETED,
        )
        connected.cancel()
        stopped.cancel()
        if stop.is_set():
            return
        if self.link.connected:
            sdnotify.ready(status=f"connected to {self.config.coordinator.address}")
        else:
            sdnotify.ready(
                status=f"degraded: coordinator {self.config.coordinator.address} unreachable "
                f"({self.link.last_error or 'no answer'}); leases keep running"
            )
        await stop.wait()
        sdnotify.stopping(status="stopping: running containers are left to Docker")


def _monotonic_at(unix_seconds: float | None) -> float | None:
    """A past wall-clock instant on this process's monotonic clock, or None.

    Converted with the wall/monotonic offset of now: a wall-clock step between
    that instant and now shifts it by the step, which the sampler bounds anyway
    (a final record never ends before its lease's last closed point, nor after now).
    """
    if unix_seconds is None:
        return None
    return time.monotonic() - max(0.0, time.time() - unix_seconds)


def _count_states(leases: LeaseManager) -> dict[str, int]:
    counts: dict[str, int] = {}
    for view in leases.snapshot().leases:
        counts[view.state.value] = counts.get(view.state.value, 0) + 1
    return counts


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
