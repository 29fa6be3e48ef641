"""The running agent, assembled: every part built from config, then connected.

Data flows one way per edge (docs/architecture.md): hardware -> health -> Hello/
Heartbeat; LeaseAssign -> lease manager -> Docker; Docker + NVML -> sampler ->
outbox -> UsageReport -> UsageAck -> prune. This module only builds those parts
and connects them, in phases like uvicorn's ``Server`` (build, run, close): every
part exists before any callback can fire. Each part lives in its own module and
is tested there: the usage sender (agent/usage/sender.py), drain and the
disconnect guard (agent/drain.py), the status server (agent/node_status.py),
SIGHUP reload (agent/reload.py), systemd readiness (agent/ready.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
from google.protobuf.json_format import MessageToDict

from gpuagent import sdnotify
from gpuagent.aio import wait_any
from gpuagent.usage import SignedUsageRecord
from gpuagent.v1 import coordinator_pb2, leases_pb2

from . import wire
from .attestation import (
    AttestationResponder,
    GpuResult,
    device_index_from_inventory,
    identity_from_inventory,
    load_backend,
    per_gpu_prover,
    throughput_score,
)
from .config import AgentConfig
from .daemon import Agent
from .direct.publisher import DirectPublisher
from .doctor import CheckResult, fatal_results, run_preflight
from .drain import DrainController, disconnect_guard, stop_all
from .gpu import GpuBackend, open_backend
from .gpu.cordons import CordonStore
from .gpu.health import HealthMonitor
from .gpu.model import GpuInfo
from .hostinfo import collect_host_info
from .identity import NodeIdentity, load_or_create
from .isolation.selftest import SelfTest, SelfTestResult
from .isolation.toolkit import ToolkitGate
from .leases.allocator import GpuAllocator
from .leases.docker_runtime import DockerRuntime
from .leases.manager import LeaseManager
from .leases.output_keeper import OutputKeeper
from .leases.records import LeaseUpdate
from .leases.spec import GpuDescription
from .leases.statedb import StateDB
from .leases.states import LeaseState
from .link import CoordinatorLink, NotConnected
from .link.reporter import HeartbeatState, HelloState, default_node_name
from .link.session import LinkParams
from .market import MarketReporter, scratch_storage
from .metrics.agent_metrics import Attestation
from .metrics.backend_source import gpu_source_for
from .metrics.gpu_collector import GpuHealth as MetricsGpuHealth
from .metrics.registry import Telemetry, build_telemetry
from .node_status import build_status_server, lease_state_counts
from .ready import announce_ready
from .reload import reload_config
from .tunnel import TunnelClient
from .usage.docker_pids import DockerPidReader
from .usage.outbox import OUTBOX_FILE_NAME, Outbox
from .usage.sampler import Sampler
from .usage.sender import UsageSender
from .usage.sources import MeteredLease, SnapshotGpuUsage

if TYPE_CHECKING:  # imported lazily at run time: it brings numpy
    from gpuagent.attest.prover import Prover

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
        self._gpus: list[GpuInfo] = []
        self.health: HealthMonitor
        self.telemetry: Telemetry
        self.runtime: DockerRuntime
        self.leases: LeaseManager
        self.outbox: Outbox
        self.link: CoordinatorLink
        self.usage: UsageSender
        self.sampler: Sampler
        self.outputs: OutputKeeper
        self.attestation: AttestationResponder | None = None
        self.drain = DrainController(self._stop_all_leases)
        self._started = time.monotonic()
        self._inventory_pb: Any = None
        self._gpu_names: dict[str, GpuDescription] = {}
        self._assigned_at: dict[str, float] = {}  # lease id -> monotonic, until it runs
        self._run_started: dict[str, float] = {}  # lease id -> monotonic start, while it runs

    # -- building: every part before anything runs ------------------------------------

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
        await self._build_gpus()
        client = self._docker_client or docker.DockerClient(
            base_url=config.runtime.docker_host, timeout=60
        )
        self._docker_client = client
        # Telemetry before the parts that report to it (image pulls, usage, the link).
        self.telemetry = self._build_telemetry()
        self.runtime = DockerRuntime(
            client,
            config.runtime,
            self.identity.node_id,
            config.scratch_root(),
            on_pull=self.telemetry.agent.image_pulled,
            render_nodes={g.uuid: g.render_node for g in self._gpus if g.uuid and g.render_node},
            isolation=config.isolation,
        )
        self._inventory_pb.scratch.CopyFrom(scratch_storage(config.scratch_root()))
        log.info("container storage", extra={"mode": await self.runtime.detect_storage()})
        statedb = await asyncio.to_thread(StateDB.in_state_dir, state_dir)
        # Batch outputs (PROTOCOL.md "Lease outputs"): signed by the node key; what is
        # retained shows in the inventory the next Hello carries.
        self.outputs = OutputKeeper(
            config, self.identity.node_id, self.identity.sign, on_change=self._retained_changed
        )
        # Real GPUs only: with simulated ones no container reaches a GPU.
        toolkit_gate = None if self.backend.simulated else ToolkitGate()
        if toolkit_gate is not None:
            await asyncio.to_thread(toolkit_gate.refresh)
        self.leases = LeaseManager(
            config,
            self.runtime,
            statedb,
            GpuAllocator(),
            self.identity.node_id,
            gpu_uuids_source=self._leasable_gpus,
            on_update=self._on_lease_update,
            simulated_gpus=self.backend.simulated,
            gpu_details_source=lambda: self._gpu_names,
            gpu_gate=toolkit_gate.refusal if toolkit_gate is not None else None,
            service_observer=self.telemetry.agent,  # health checks and restarts
            before_cleanup=self._last_usage_reading,
            outputs=self.outputs,
        )
        if config.services.mode == "direct":
            # Refuses an advertise address this host does not have (DirectModeError).
            self.leases.publisher = DirectPublisher(config.services, state_dir, self.leases)
        self.outbox = await asyncio.to_thread(
            Outbox, state_dir / OUTBOX_FILE_NAME, alert_records=config.metering.outbox_alert_records
        )
        # Built now, run later: the first Hello (when the link runs) reads what the
        # isolation self-test below found.
        self.link = CoordinatorLink(
            config.coordinator,
            self.identity,
            self,
            node_name=config.node.name or default_node_name(),
            region=config.node.where().region,
            labels=dict(config.node.labels),
            observer=self.telemetry.agent,
            params=LinkParams(metering_interval=config.metering.record_interval),
        )
        self.usage = UsageSender(self.outbox, self.link, config.metering.batch_size)
        # Service leases: the tunnel to the relay each Welcome names (docs/services.md);
        # it reaches only what the lease manager's service_target answers.
        self.tunnel = TunnelClient(
            config.coordinator,
            self.identity,
            self.leases,
            outputs=lambda lease_id: self.outputs.store.lookup(lease_id),
        )
        self.sampler = Sampler(
            self.outbox,
            self._metered_leases,
            SnapshotGpuUsage(self.gpu_source),
            self.identity.sign,
            self.identity.node_id,
            config.metering,
            reader_factory=lambda lease: DockerPidReader(
                client, lease.container_id, lease.lease_id
            ),
            on_records=self._on_usage_records,
        )
        self.attestation = self._build_attestation()
        # Prices, location, measured bandwidth (docs/market.md): in every Hello, and in
        # an OfferUpdate when a SIGHUP or a bandwidth probe changes them.
        self.market = MarketReporter(
            config, self.link, [g.name for g in self._inventory_pb.gpus], self.identity.sign
        )
        self._connect_link()
        # Re-adopt what ran before a restart before telling the coordinator anything: a
        # lease that ended while the agent was down gets its final usage record here.
        await self.leases.reconcile()
        # Before the link runs: the first Hello carries the result.
        await self._check_isolation()
        return self._compose(client)

    async def _build_gpus(self) -> None:
        config = self.config
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
        self._gpus = await asyncio.to_thread(self.backend.inventory)
        self._gpu_names = {
            g.uuid: GpuDescription(name=g.name or "", memory_bytes=g.memory_total_bytes or 0)
            for g in self._gpus
            if g.uuid
        }
        host = await asyncio.to_thread(
            collect_host_info, config.node.state_dir, config.runtime.docker_host
        )
        self._inventory_pb = wire.inventory(host, self._gpus)
        # One GPU reader (NVML or amdsmi) feeds both the usage sampler and /metrics.
        self.gpu_source = gpu_source_for(self.backend)
        cordons = CordonStore(config.node.state_dir)
        self.health = HealthMonitor(self.backend, cordons, interval=config.gpu.health_interval)
        await asyncio.to_thread(self.health.check_once)

    def _connect_link(self) -> None:
        link = self.link
        link.on("lease_assign", self._on_lease_assign)
        link.on("lease_cancel", self._on_lease_cancel)
        link.on("lease_update_ack", self._on_lease_update_ack)
        link.on("usage_ack", self.usage.on_ack)
        link.on("drain", self.drain.on_drain)
        link.on_session(self._on_session)
        link.on_session(self.market.on_session)
        link.on_session(self.tunnel.on_welcome)
        link.on_params(self._on_params)

    def _compose(self, client: docker.DockerClient) -> Agent:
        config = self.config
        status_server = build_status_server(
            config,
            self.telemetry,
            node_id=self.identity.node_id,
            simulated_gpus=self.backend.simulated,
            connected=lambda: self.link.connected,
            docker_client=client,
            gpu_source=self.gpu_source,
            leases=self.leases,
            drain=self.drain,
            cordons=self.health.cordons,
            started_monotonic=self._started,
        )
        agent = self.agent
        agent.add_component("watchdog", sdnotify.watchdog_task)
        agent.add_component("gpu-health", self.health.run)
        agent.add_component("egress-policy", self.runtime.watch_firewall)
        agent.add_component("isolation-self-test", self._recheck_isolation)
        agent.add_component("leases", self.leases.run)
        agent.add_component("output-retention", self.outputs.run)
        agent.add_component("usage-sampler", self.sampler.run)
        agent.add_component("usage-sender", self.usage.run)
        agent.add_component("coordinator-link", self.link.run)
        agent.add_component("bandwidth-probe", self.market.run)
        agent.add_component("relay-tunnel", self.tunnel.run)
        agent.add_component("status-server", status_server.run)
        agent.add_component(
            "ready", lambda stop: announce_ready(stop, self.link, config.coordinator)
        )
        agent.add_component(
            "disconnect-guard",
            lambda stop: disconnect_guard(
                stop,
                lambda: self.link.connected,
                lambda: self.config.coordinator.stop_leases_after_disconnect,
                self.drain,
            ),
        )
        agent.on_reload = self.reload
        agent.before_stop.append(self._flush_usage)
        return agent

    def _build_attestation(self) -> AttestationResponder:
        # The Prover and its backend (numpy, maybe torch) load on the first challenge,
        # off the event loop: holding them from startup cost the idle daemon ~15 MB
        # (docs/performance.md). A backend that cannot load fails that challenge.
        name = self.config.attestation.backend
        identity = identity_from_inventory(self._inventory_pb.gpus)
        sign = self.identity.sign

        def build(device: int) -> Prover:
            from gpuagent.attest.prover import Prover

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
            await wait_any(stop, reconnected)
            if stop.is_set():
                return
            reconnected.clear()
            # The firewall watcher was poked by the same reconnect; the self-test's own
            # ensure_firewall waits for nothing more than that check.
            await self._check_isolation()

    def _retained_changed(self, count: int, size: int) -> None:
        self.telemetry.agent.set_retained_outputs(count, size)
        self._inventory_pb.retained_outputs.bytes = size
        self._inventory_pb.retained_outputs.count = count

    def _on_attestation(self, result: GpuResult) -> None:
        index = {g.uuid: g.index for g in self._inventory_pb.gpus}.get(result.gpu_uuid, -1)
        self.telemetry.agent.set_attestation(
            index,
            result.gpu_uuid,
            Attestation(result.passed, throughput_score(result), time.time()),
        )
        # agent.attestation already logs each verdict with its figures.

    async def close(self) -> None:
        """Release what the parts hold; containers keep running (they are Docker's)."""
        publisher = self.leases.publisher if hasattr(self, "leases") else None
        if isinstance(publisher, DirectPublisher):
            await publisher.close()  # the port book stays: a restart re-opens the same ports
        if self.attestation is not None:
            with contextlib.suppress(Exception):
                await self.attestation.aclose()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.outbox.close)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.backend.close)
        if self._docker_client is not None:
            with contextlib.suppress(Exception):
                self._docker_client.close()

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

        # The lease views are read on scrapes, which start with the status server.
        return build_telemetry(
            gpu_source=self.gpu_source,
            scrape_timeout=self.config.status.scrape_timeout,
            gpu_leases=lambda: self.leases.snapshot().allocations,
            gpu_health=gpu_health,
            lease_states=lambda: lease_state_counts(self.leases),
            endpoint_readiness=lambda: self.leases.endpoint_readiness(),
            usage_alert_records=self.config.metering.outbox_alert_records,
        )

    def _on_usage_records(self, records: Sequence[SignedUsageRecord]) -> None:
        self.usage.wake(records)
        self._refresh_usage_metrics()

    def _on_params(self, params: LinkParams) -> None:
        """Coordinator-set parameters apply at once (each already clamped by the link)."""
        self.sampler.set_record_interval(params.metering_interval)
        self.usage.batch_max = params.usage_batch_max

    def _refresh_usage_metrics(self) -> None:
        stats = self.sampler.stats
        if stats is not None:
            oldest = stats.oldest_pending_unix_ns
            self.telemetry.agent.set_usage_backlog(
                stats.pending, oldest / 1e9 if oldest is not None else None
            )

    # -- what the link reports ------------------------------------------------------

    def _leasable_gpus(self) -> list[str]:
        if self.drain.draining:
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
            draining=self.drain.draining,
            offer=self.market.offer(),
        )

    async def heartbeat_state(self) -> HeartbeatState:
        snapshot = self.leases.snapshot()
        allocated = set(snapshot.allocations)
        health = [h for h in self.health.snapshot() if h.uuid]
        free = [h.uuid for h in health if h.leasable and h.uuid not in allocated]
        stats = self.sampler.stats
        draining = self.drain.draining
        return HeartbeatState(
            gpu_health=[wire.gpu_health(h) for h in health],
            free_gpu_uuids=[] if draining else [u for u in free if u],
            allocated_gpu_uuids=sorted(allocated),
            leases=[wire.lease_status(v) for v in snapshot.leases],
            draining=draining,
            usage_pending=stats.pending if stats is not None else 0,
        )

    # -- leases ---------------------------------------------------------------------

    async def _on_lease_assign(self, msg: leases_pb2.LeaseAssign) -> None:
        spec = MessageToDict(msg.spec, preserving_proto_field_name=True)
        expires = msg.expires_at_unix_nanos / 1e9 if msg.expires_at_unix_nanos else None
        self._assigned_at.setdefault(msg.lease_id, time.monotonic())
        await self.leases.assign(msg.lease_id, spec, expires, gpu_uuids=list(msg.gpu_uuids) or None)
        publisher = self.leases.publisher
        if isinstance(publisher, DirectPublisher) and self.leases.holds(msg.lease_id):
            # Also for a repeat of a lease held: how a rotated token's hash arrives.
            await asyncio.to_thread(publisher.set_token, msg.lease_id, msg.endpoint_token_sha256)

    async def _on_lease_cancel(self, msg: leases_pb2.LeaseCancel) -> None:
        await self.leases.cancel(
            msg.lease_id, msg.reason or "cancelled by coordinator", msg.grace_seconds or None
        )

    async def _on_lease_update_ack(self, msg: leases_pb2.LeaseUpdateAck) -> None:
        await self.leases.ack_update(msg.lease_id, msg.update_seq)

    async def _on_lease_update(self, update: LeaseUpdate) -> None:
        """Each published lease update, in order, outside the manager's lease locks:
        start metrics, the sampler's start and final readings, then the link."""
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
            for metered in self._metered_leases():
                if metered.lease_id == update.lease_id:
                    await self.sampler.lease_started(metered)
        await self._close_usage(update)
        # Not connected (reconcile at start, an outage): the update stays in the state DB
        # and goes out with the next session's pending updates.
        with contextlib.suppress(NotConnected):
            await self.link.send(
                coordinator_pb2.AgentMessage(lease_update=wire.lease_update(update))
            )

    async def _last_usage_reading(self, update: LeaseUpdate) -> None:
        """The manager's call while an ended lease's container and network still exist:
        the sampler reads the network's counters before they go with it."""
        if _gets_final_usage(update):
            await self.sampler.last_reading(
                self._metered_view(update), end_monotonic=_monotonic_at(update.ended_at)
            )

    async def _close_usage(self, update: LeaseUpdate) -> None:
        """Write a terminal lease's final usage record (idempotent: at most one)."""
        if not _gets_final_usage(update):
            return
        view = self._metered_view(update)
        self._run_started.pop(update.lease_id, None)
        await self.sampler.close_lease(view, end_monotonic=_monotonic_at(update.ended_at))

    def _metered_view(self, update: LeaseUpdate) -> _Metered:
        return _Metered(
            update.lease_id,
            update.container_id,
            update.gpu_uuids,
            # After a restart the start is known only from the lease's record.
            self._run_started.get(update.lease_id, 0.0) or _monotonic_at(update.started_at) or 0.0,
        )

    def _metered_leases(self) -> list[MeteredLease]:
        return [
            _Metered(r.lease_id, r.container_id, r.gpu_uuids, r.started_monotonic)
            for r in self.leases.running_leases()
        ]

    async def _stop_all_leases(self, reason: str) -> None:
        await stop_all(self.leases, reason)

    # -- sessions, usage, reload ---------------------------------------------------------

    async def _on_session(self, welcome: coordinator_pb2.Welcome) -> None:
        # What the coordinator stored is safe to prune; everything after it is re-sent.
        await self.usage.on_session(welcome.acked_usage_seq)
        for update in await self.leases.pending_updates():
            # The agent may have died between storing a terminal update and writing the
            # lease's final usage record: write it now (a no-op when it exists).
            await self._close_usage(update)
            await self.link.send(
                coordinator_pb2.AgentMessage(lease_update=wire.lease_update(update))
            )
        if welcome.draining != self.drain.draining:
            self.drain.set(welcome.draining, "coordinator")

    async def _flush_usage(self) -> None:
        """At shutdown: close due intervals, then deliver what is pending."""
        await self.sampler.tick()
        await self.usage.flush()

    async def reload(self) -> None:
        """SIGHUP: the live-safe changes of the config file (agent/reload.py)."""

        def apply(config: AgentConfig) -> None:
            self.leases.update_policy(config.runtime)
            self.outputs.update_config(config)

        self.config = await reload_config(self.config_path, self.config, apply)
        # A changed price or location goes to the coordinator now, on the open session.
        await self.market.reload(self.config)


def _gets_final_usage(update: LeaseUpdate) -> bool:
    """A terminal lease that had a container gets a final usage record; one refused or
    failed before it had a container never ran and gets none (the coordinator would
    refuse one as not placed)."""
    return (
        update.state.terminal and update.state != LeaseState.REJECTED and bool(update.container_id)
    )


def _monotonic_at(unix_seconds: float | None) -> float | None:
    """A past wall-clock instant on this process's monotonic clock, or None.

    Converted with the wall/monotonic offset of now: a wall-clock step between
    that instant and now shifts it by the step, which the sampler bounds anyway
    (a final record never ends before its lease's last closed point, nor after now).
    """
    if unix_seconds is None:
        return None
    return time.monotonic() - max(0.0, time.time() - unix_seconds)
