"""The scheduler's gRPC server: Coordinator, Nodes, health and reflection.

``SchedulerServer`` owns the database, the registry and the grpc.aio server;
``run(stop)`` serves until ``stop`` is set. The clock is injectable so tests
drive liveness without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpuagent.v1 import (
    acl_pb2,
    acl_pb2_grpc,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
)

from . import secretbox, tlsgen
from .attestation import AttestationManager
from .auth import policy
from .auth.interceptor import Authenticator, AuthInterceptor
from .auth.service import AclService
from .config import SchedulerConfig
from .coordinator_service import CoordinatorService
from .db import Database
from .endpoint_tokens import EndpointTokens
from .gcpolicy import GcPolicy
from .lease_dispatch import DispatchSettings, LeaseDispatcher
from .leases_service import LeasesService
from .leases_store import LeaseStore
from .ledger import LeaseHooks
from .ledger_service import LedgerService
from .liveness import Liveness, LivenessPolicy
from .metrics import MetricsSecurity, MetricsServer, SchedulerMetrics, start_metrics_server
from .nodes_service import NodesService
from .registry import HEARTBEAT_FLUSH_EVERY, Clock, Registry
from .relay.directory import DirectoryService, StoreRoutes
from .relay.server import Relay, RelayStartError
from .secretbox import SecretBox
from .tlsfiles import tls_dir
from .usage_ingest import UsageIngest

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["Nodes"].full_name,
    leases_pb2.DESCRIPTOR.services_by_name["Leases"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].full_name,
    acl_pb2.DESCRIPTOR.services_by_name["Acl"].full_name,
    relay_pb2.DESCRIPTOR.services_by_name["Tunnel"].full_name,
    relay_pb2.DESCRIPTOR.services_by_name["RelayDirectory"].full_name,
)
_DESCRIPTORS = (coordinator_pb2, nodes_pb2, leases_pb2, ledger_pb2, acl_pb2, relay_pb2)


def served_methods() -> list[str]:
    """Every method path this server registers (health and reflection included)."""
    methods = [
        f"/{service.full_name}/{method.name}"
        for module in (*_DESCRIPTORS, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    return [*methods, f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"]


class ServerStartError(Exception):
    """The server cannot start (port taken, bad certificate); the message says which."""


def server_options(config: SchedulerConfig) -> list[tuple[str, int]]:
    s = config.server
    return [
        ("grpc.keepalive_time_ms", int(s.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Agents ping every 20 s by default; allow down to 5 s before calling it abuse.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
    ]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServerStartError(f"server.{what}: cannot read {path}: {exc.strerror}") from None


def server_credentials(config: SchedulerConfig) -> grpc.ServerCredentials:
    s = config.server
    if s.cert_file is not None and s.key_file is not None:
        cert, key = _read(s.cert_file, "cert_file"), _read(s.key_file, "key_file")
    else:
        files = tlsgen.ensure(tls_dir(config))
        cert, key = files.server_cert.read_bytes(), files.server_key.read_bytes()
    client_ca = _read(s.client_ca_file, "client_ca_file") if s.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def metrics_security(config: SchedulerConfig) -> MetricsSecurity:
    m = config.metrics
    password = None
    if m.basic_auth_password_file is not None:
        try:
            password = m.basic_auth_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ServerStartError(
                f"metrics.basic_auth_password_file: cannot read "
                f"{m.basic_auth_password_file}: {exc.strerror}"
            ) from None
        if not password:
            raise ServerStartError(
                f"metrics.basic_auth_password_file: {m.basic_auth_password_file} is empty"
            )
    return MetricsSecurity(m.cert_file, m.key_file, m.basic_auth_user, password)


class SchedulerServer:
    def __init__(self, config: SchedulerConfig, *, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        lv = config.liveness
        self.policy = LivenessPolicy(
            lv.heartbeat_interval, lv.suspect_after_missed, lv.offline_grace, lv.restart_grace
        )
        self.db = Database(config.database.path)
        self.registry = Registry(self.db, self.policy, clock)
        self.authenticator = Authenticator(self.db, config.auth.client_cert_accounts, clock)
        self.acl = AclService(self.db, self.authenticator, clock)
        self.coordinator = CoordinatorService(
            self.registry,
            common_pb2.NodeParams(heartbeat_interval_ms=int(lv.heartbeat_interval * 1000)),
            authenticator=self.authenticator,
            registration=config.auth.registration,
        )
        self.attestation = AttestationManager(
            config.attestation, self.registry, self.db, clock=clock
        )
        self.attestation.install(self.coordinator)
        self.coordinator.params.attestation.CopyFrom(self.attestation.policy())
        self.nodes = NodesService(self.registry, self.attestation)
        pc = config.placement
        self.leases_store = LeaseStore(
            self.db, clock, SecretBox(config.database.path.parent / secretbox.KEY_FILE)
        )
        self.dispatcher = LeaseDispatcher(
            self.leases_store,
            self.registry,
            DispatchSettings(
                assign_timeout=pc.assign_timeout,
                max_attempts=pc.max_attempts,
                retry_interval=pc.retry_interval,
                default_ask_micros=pc.default_price_micros_per_gpu_hour,
                price_label=pc.price_label,
                require_isolation=pc.require_isolation,
            ),
            gpu_eligible=self.attestation.gpu_eligible,
        )
        # A GPU that just passed may be what a pending lease waits for.
        self.attestation.add_listener(lambda _node_id: self.dispatcher.kick())
        self.coordinator.on("lease_update", self.dispatcher.on_update)
        self.coordinator.on_connect(self.dispatcher.on_connect)
        self.coordinator.on_heartbeat(self.dispatcher.on_heartbeat)
        self.coordinator.known_leases = self.dispatcher.known_lease_ids
        # Service endpoints (docs/services.md): a token per lease, made in Submit's txn.
        self.endpoint_tokens = EndpointTokens(
            self.db, SecretBox(config.database.path.parent / secretbox.KEY_FILE), clock
        )
        self.endpoint_tokens.register(self.leases_store)
        self.leases = LeasesService(
            self.leases_store, self.dispatcher, self.registry, tokens=self.endpoint_tokens
        )
        # Ledger (docs/ledger.md): escrow rides the lease store's transactions, usage
        # reports settle it, and placement skips nodes without enough collateral.
        self.ledger = LedgerService(self.db, self.registry, config.ledger, clock)
        if config.ledger.escrow:
            hooks = LeaseHooks(self.ledger.policy, lambda: round(clock() * 1e9))
            hooks.register(self.leases_store)
        self.usage = UsageIngest(self.db, self.registry, self.ledger.policy, clock)
        self.coordinator.on("usage_report", self.usage.handle)
        attested = self.dispatcher.gpu_eligible
        self.dispatcher.gpu_eligible = lambda node, gpu: (
            self.ledger.node_eligible(node) and (attested is None or attested(node, gpu))
        )
        self.ledger.on_eligibility_change = self.dispatcher.kick
        self._wire_metrics()
        self._build_relay()
        self._verdicts_seen: set[tuple[str, str, str]] = set()
        self._slash_tasks: set[asyncio.Task[int]] = set()
        self.attestation.add_listener(self._on_verdicts)
        self._metrics_server: MetricsServer | None = None
        self._ledger_stop = asyncio.Event()
        self._flush_stop = asyncio.Event()
        self._flush_task: asyncio.Task[None] | None = None
        self._ledger_task: asyncio.Task[None] | None = None
        self._dispatch_stop = asyncio.Event()
        self._dispatch_task: asyncio.Task[None] | None = None
        self._attest_stop = asyncio.Event()
        self._attest_task: asyncio.Task[None] | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def _wire_metrics(self) -> None:
        def node_states() -> dict[str, int]:
            counts = {state.value: 0 for state in Liveness}
            for record in self.registry.nodes.values():
                counts[self.registry.liveness(record).value] += 1
            return counts

        self.metrics = SchedulerMetrics(
            nodes=node_states, leases=lambda: {k: v for k, v in self.leases_store.counts.items()}
        )
        self.dispatcher.observe_placement = self.metrics.placement
        self.usage.on_counts = lambda r: self.metrics.usage_records(r.stored, r.duplicates)

        async def count_heartbeat(_session: Any, _heartbeat: Any) -> None:
            self.metrics.heartbeat()

        self.coordinator.on_heartbeat(count_heartbeat)

    def _build_relay(self) -> None:
        """The relay inside ``serve`` (relay.mode embedded), its tunnel on this gRPC server;
        with mode external agents are only told where ``gpu-scheduler relay`` runs."""
        routes = StoreRoutes(self.leases_store, self.endpoint_tokens)
        self.relay_directory = DirectoryService(routes)
        self.relay: Relay | None = None
        rc = self.config.relay
        if rc.mode == "off":
            return
        self.coordinator.relay = coordinator_pb2.RelayParams(
            enabled=True, address=rc.tunnel_address, server_name=rc.tunnel_server_name
        )
        if rc.mode == "external":
            return
        self.relay = Relay(rc, routes, tls_dir=tls_dir(self.config), registry=self.metrics.registry)
        relay = self.relay
        self.endpoint_tokens.on_rotate.append(relay.routes.invalidate)

        on_update = self.dispatcher.on_update

        async def update_then_forget_route(session: Any, update: Any) -> None:
            await on_update(session, update)
            relay.routes.invalidate(update.lease_id)  # running or ended: ask again

        self.coordinator.on("lease_update", update_then_forget_route)

    def _on_verdicts(self, node_id: str) -> None:
        """Count each new verdict once; a failed one slashes the node's collateral."""
        for record in self.attestation.latest(node_id):
            key = (node_id, record.gpu_uuid, record.challenge_id or str(record.created_ns))
            if key in self._verdicts_seen:
                continue
            self._verdicts_seen.add(key)
            self.metrics.attestation("passed" if record.passed else "failed")
            if not record.passed and record.challenge_id:
                # The ledger slashes at most once per challenge (docs/ledger.md).
                task = asyncio.get_running_loop().create_task(
                    self.ledger.attestation_failed(node_id, record.reason, record.challenge_id)
                )
                self._slash_tasks.add(task)
                task.add_done_callback(self._slash_tasks.discard)

    async def start(self) -> int:
        """Open the database, bind and start serving; returns the bound port."""
        policy.check_complete(served_methods())
        security = metrics_security(self.config)  # a bad file fails before anything starts
        await self.db.open()
        await self.registry.load()
        await self.attestation.load()
        await self.leases_store.load()
        await self.ledger.load()
        server = grpc.aio.server(
            options=server_options(self.config),
            interceptors=[AuthInterceptor(self.authenticator)],
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self.coordinator, server)
        acl_pb2_grpc.add_AclServicer_to_server(self.acl, server)
        nodes_pb2_grpc.add_NodesServicer_to_server(self.nodes, server)
        leases_pb2_grpc.add_LeasesServicer_to_server(self.leases, server)
        ledger_pb2_grpc.add_LedgerServicer_to_server(self.ledger, server)
        relay_pb2_grpc.add_RelayDirectoryServicer_to_server(self.relay_directory, server)
        if self.relay is not None:
            relay_pb2_grpc.add_TunnelServicer_to_server(self.relay.hub, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        listen = self.config.server.listen
        try:
            if self.config.server.insecure:
                log.warning(
                    "serving plaintext gRPC (server.insecure: true)", extra={"listen": listen}
                )
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, server_credentials(self.config))
        except RuntimeError as exc:
            raise ServerStartError(f"server.listen: cannot bind {listen}: {exc}") from None
        if port == 0:
            raise ServerStartError(f"server.listen: cannot bind {listen}")
        await server.start()
        if self.relay is not None:
            try:
                await self.relay.start()
            except RelayStartError as exc:
                await server.stop(0)
                raise ServerStartError(str(exc)) from None
        self._dispatch_stop.clear()
        self._dispatch_task = asyncio.create_task(
            self.dispatcher.run(self._dispatch_stop), name="lease-dispatch"
        )
        self._attest_stop.clear()
        self._attest_task = asyncio.create_task(
            self.attestation.run(self._attest_stop), name="attestation"
        )
        self._ledger_stop.clear()
        self._ledger_task = asyncio.create_task(self.ledger.run(self._ledger_stop), name="ledger")
        self._flush_stop.clear()
        self._flush_task = asyncio.create_task(
            self.registry.flush_forever(self._flush_stop, HEARTBEAT_FLUSH_EVERY),
            name="heartbeat-flush",
        )
        self._server = server
        self.port = port
        if self.config.metrics.listen:
            try:
                self._metrics_server = start_metrics_server(
                    self.config.metrics.listen, self.metrics, security
                )
            except (ValueError, OSError) as exc:
                await self.stop()
                raise ServerStartError(
                    f"metrics.listen: cannot serve on {self.config.metrics.listen}: {exc}"
                ) from None
        log.info(
            "scheduler serving",
            extra={
                "listen": listen,
                "port": port,
                "tls": not self.config.server.insecure,
                "database": str(self.config.database.path),
                "nodes": len(self.registry.nodes),
            },
        )
        return port

    async def stop(self, grace: float = 2.0) -> None:
        if self.relay is not None:
            await self.relay.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._dispatch_task is not None:
            self._dispatch_stop.set()
            await self._dispatch_task
            self._dispatch_task = None
        if self._attest_task is not None:
            self._attest_stop.set()
            await self._attest_task
            self._attest_task = None
        if self._ledger_task is not None:
            self._ledger_stop.set()
            await self._ledger_task
            self._ledger_task = None
        await self.attestation.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._flush_task is not None:
            # After the server: no heartbeat arrives any more, the last ones are written.
            self._flush_stop.set()
            await self._flush_task
            self._flush_task = None
        await self.db.close()

    async def sweep(self) -> None:
        """Re-evaluate liveness; leases on offline nodes are lost (or re-placed)."""
        changes = self.registry.sweep()
        await self.dispatcher.on_liveness(changes)

    async def _sweep_forever(self) -> None:
        prune_every = 3600.0
        last_prune = self.clock()
        while True:
            await asyncio.sleep(max(1.0, self.policy.heartbeat_interval / 2))
            await self.sweep()
            if self.clock() - last_prune >= prune_every:
                last_prune = self.clock()
                await self.registry.prune_coverage()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        await self.serve_until(stop)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """After ``start()``: sweep liveness until ``stop``, then stop serving."""
        sweeper = asyncio.create_task(self._sweep_forever(), name="liveness-sweeper")
        collector = asyncio.create_task(GcPolicy().run(), name="gc-policy")
        try:
            await stop.wait()
        finally:
            for task in (sweeper, collector):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.stop()
