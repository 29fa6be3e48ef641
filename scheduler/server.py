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
    market_pb2,
    market_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
)

from . import output_fetch, secretbox, tlsgen
from .attestation import AttestationManager
from .auth import policy
from .auth.interceptor import Authenticator, AuthInterceptor
from .auth.service import AclService
from .config import SchedulerConfig
from .coordinator_service import CoordinatorService
from .db import open_database
from .eligibility import Eligibility
from .endpoint_tokens import EndpointTokens
from .gcpolicy import GcPolicy
from .lease_dispatch import DispatchSettings, LeaseDispatcher
from .leases_service import LeasesService
from .leases_store import LeaseStore
from .ledger import LeaseHooks
from .ledger_service import LedgerService
from .liveness import Liveness, LivenessPolicy
from .market_service import MarketService
from .metrics import MetricsSecurity, MetricsServer, SchedulerMetrics, start_metrics_server
from .nodes_service import NodesService
from .output_fetch import OutputTickets
from .price_history import PriceHistory
from .registry import HEARTBEAT_FLUSH_EVERY, Clock, NodeRecord, Registry, Session
from .relay.directory import DirectoryService, StoreRoutes
from .relay.server import Relay, RelayStartError, buyer_url, outputs_url
from .replicas import Replicas
from .secretbox import SecretBox
from .slashing import VerdictSlasher
from .tlsfiles import tls_dir
from .usage_ingest import UsageIngest
from .verify import Verifier

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["Nodes"].full_name,
    leases_pb2.DESCRIPTOR.services_by_name["Leases"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].full_name,
    acl_pb2.DESCRIPTOR.services_by_name["Acl"].full_name,
    market_pb2.DESCRIPTOR.services_by_name["Market"].full_name,
    relay_pb2.DESCRIPTOR.services_by_name["Tunnel"].full_name,
    relay_pb2.DESCRIPTOR.services_by_name["RelayDirectory"].full_name,
)
_DESCRIPTORS = (
    coordinator_pb2,
    nodes_pb2,
    leases_pb2,
    ledger_pb2,
    acl_pb2,
    market_pb2,
    relay_pb2,
)


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
        self.db = open_database(config.database.target(), pool_size=config.database.pool_size)
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
        self.nodes = NodesService(self.registry, self.attestation)
        pc = config.placement
        self.leases_store = LeaseStore(
            self.db, clock, SecretBox(config.database.path.parent / secretbox.KEY_FILE)
        )
        self.metrics = SchedulerMetrics(
            nodes=self._node_states, leases=lambda: dict(self.leases_store.counts.items())
        )
        self.prices = PriceHistory(self.db, clock)
        self.metrics.prices = lambda: self.prices.current
        # Ledger (docs/ledger.md): escrow rides the lease store's transactions, usage
        # reports settle it, and placement skips nodes without enough collateral.
        self.ledger = LedgerService(self.db, self.registry, config.ledger, clock)
        if config.ledger.escrow:
            hooks = LeaseHooks(self.ledger.policy, lambda: round(clock() * 1e9))
            hooks.register(self.leases_store)
        eligibility = Eligibility(self.attestation, self.ledger)
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
            observe_placement=self.metrics.placement,
            eligibility=eligibility,
            on_placed=self.prices.placed,
        )
        # A GPU that just passed, or collateral that now suffices, may be what a
        # pending lease waits for.
        self.attestation.add_listener(lambda _node_id: self.dispatcher.kick())
        self.ledger.on_eligibility_change(lambda _node_id: self.dispatcher.kick())
        # Verdicts and collateral invalidate the dispatcher's cached answers.
        self.attestation.add_listener(eligibility.changed)
        self.ledger.on_eligibility_change(eligibility.changed)
        self.coordinator.on("lease_update", self.dispatcher.on_update)
        self.coordinator.on_connect(self.dispatcher.on_connect)
        self.coordinator.on_heartbeat(self.dispatcher.on_heartbeat)
        # Service endpoints (docs/services.md): a token per lease, made in Submit's txn.
        self.endpoint_tokens = EndpointTokens(
            self.db, SecretBox(config.database.path.parent / secretbox.KEY_FILE), clock
        )
        self.endpoint_tokens.register(self.leases_store)
        # Agents in direct mode check tokens themselves: the hash goes in LeaseAssign,
        # and again to the node after a rotation.
        self.dispatcher.token_hash = self.endpoint_tokens.hash_of
        self.endpoint_tokens.on_rotate.append(self.dispatcher.push_token)
        self.leases = LeasesService(
            self.leases_store,
            self.dispatcher,
            self.registry,
            escrow=config.ledger.escrow,
            tokens=self.endpoint_tokens,
        )
        # Redundant runs (docs/verification.md): copies on distinct providers, judged by
        # their output digests, paid or slashed by the ledger.
        self.verify = Verifier(
            self.leases_store, self.registry, self.ledger.policy, clock, escrow=config.ledger.escrow
        )
        self.verify.on_slashed = self.ledger.collateral_changed
        self.verify.kick = self.dispatcher.kick
        self.dispatcher.verify = self.verify
        self.leases.verify = self.verify
        self.nodes.verify_flags = self.verify.flags
        self.nodes.output_mismatches = lambda node_id: output_fetch.mismatches(self.db, node_id)
        # The market (docs/market.md): offers, the bandwidth probe, nodes' OfferUpdates.
        self.market = MarketService(
            self.registry, self.dispatcher, self.prices, self.attestation, clock
        )
        self.market.install(self.coordinator)
        self.nodes.asks = self.dispatcher.asks
        self.usage = UsageIngest(
            self.db,
            self.registry,
            self.ledger.policy,
            clock,
            on_counts=lambda r: self.metrics.usage_records(r.stored, r.duplicates),
        )
        self.coordinator.on("usage_report", self.usage.handle)
        self.coordinator.on_heartbeat(self._count_heartbeat)
        self.slasher = VerdictSlasher(self.attestation, self.ledger, self.metrics)
        self.attestation.add_listener(self.slasher.on_verdicts)
        self._wire_replicas()
        self._build_relay()
        self._metrics_server: MetricsServer | None = None
        # The background loops, members of one TaskGroup (see _run_loops).
        self._loops_stop = asyncio.Event()
        self._loops: asyncio.Task[None] | None = None
        self._loops_stopped = asyncio.Event()
        self._flush_stop = asyncio.Event()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def _wire_replicas(self) -> None:
        """Several replicas on one PostgreSQL (scheduler/replicas.py); inert on SQLite."""
        rc = self.config.replica
        self._replica_tasks: set[asyncio.Task[bool]] = set()
        self.replicas = Replicas(
            self.db,
            replica_id=rc.id,
            address=rc.advertise or self.config.server.listen,
            relay_url=rc.relay_url,
            heartbeat_interval=rc.heartbeat_interval,
            dead_after=rc.dead_after,
            clock=self.clock,
        )
        if not self.replicas.distributed:
            return
        replicas = self.replicas

        async def claim(_session: Session, record: NodeRecord) -> None:
            await self.registry.writes.write(lambda c: replicas.claim_in(c, record.node_id))

        self.coordinator.on_connect(claim)
        # Submitted on any replica: the replica that took it offers it to the nodes it
        # holds; the others offer it to theirs after replica.home_first, or as soon as
        # it says none of its nodes fits ("released"). The offer's guard makes one win.
        home_first = rc.home_first
        self.leases_store.add_hooks(
            on_submitted=lambda c, row: replicas.notify_in(
                c, "pending", f"{row.lease_id}|{replicas.replica_id}"
            )
        )

        def pending(payload: str) -> None:
            lease_id, _, home = payload.partition("|")
            if not home:  # released by its home replica, or an older replica's notice
                self.dispatcher.released(lease_id)
                return
            self.dispatcher.submitted(lease_id, home == replicas.replica_id, home_first)

        replicas.on("pending", pending)

        async def release_home(lease_id: str) -> None:
            await replicas.notify("pending", lease_id)

        self.dispatcher.release_home = release_home
        replicas.on("resync", lambda _: self.dispatcher.kick())
        replicas.on("cancel", self._remote_cancel)
        self.dispatcher.remote_nodes = replicas.nodes_held_elsewhere

        async def forward_cancel(node_id: str, lease_id: str, reason: str) -> None:
            await replicas.notify("cancel", f"{node_id}|{lease_id}|{reason}")

        self.dispatcher.forward_cancel = forward_cancel
        # A token rotated on a replica that does not hold the lease's node: the holder
        # re-sends the LeaseAssign with the new hash (and does not forward it again).
        replicas.on("token", lambda lease_id: self.dispatcher.push_token(lease_id, forward=False))

        async def forward_token(lease_id: str) -> None:
            await replicas.notify("token", lease_id)

        self.dispatcher.forward_token = forward_token
        self.ledger.is_leader = lambda: replicas.leader
        self.market.is_leader = lambda: replicas.leader
        replicas.on_cut_off(self._move_agents)

    def _remote_cancel(self, payload: str) -> None:
        node_id, lease_id, reason = [*payload.split("|", 2), "", ""][:3]
        if node_id in self.registry.sessions:
            task = asyncio.get_running_loop().create_task(
                self.dispatcher._send_cancel(node_id, lease_id, reason)
            )
            self._replica_tasks.add(task)
            task.add_done_callback(self._replica_tasks.discard)

    def _move_agents(self) -> None:
        """Cut off from the database: nothing an agent sends can be stored here, so every
        stream is closed with a retryable error and the agents reconnect elsewhere."""
        for session in list(self.registry.sessions.values()):
            session.close_code = common_pb2.ProtocolError.INTERNAL
            session.close_reason = (
                "this scheduler replica lost its database; reconnect to another replica"
            )
            session.closed.set()

    def _build_relay(self) -> None:
        """The relay inside ``serve`` (relay.mode embedded), its tunnel on this gRPC server;
        with mode external agents are only told where ``gpu-scheduler relay`` runs."""
        # Outputs downloads: stateless tickets keyed from the secret box (any replica
        # checks any replica's), through the relay from the node that signed them.
        tickets = OutputTickets(
            SecretBox(self.config.database.path.parent / secretbox.KEY_FILE),
            self.leases_store.clock,
        )
        routes = StoreRoutes(self.leases_store, self.endpoint_tokens, tickets)
        self.relay_directory = DirectoryService(routes)
        self.relay: Relay | None = None
        rc = self.config.relay
        if rc.mode == "off":
            return
        self.leases.tickets = tickets
        self.leases.outputs_url = lambda lease_id: outputs_url(rc, lease_id)
        self.coordinator.relay = coordinator_pb2.RelayParams(
            enabled=True, address=rc.tunnel_address, server_name=rc.tunnel_server_name
        )
        # Lease show's endpoints carry the buyer's URL (lease url prints the same one).
        self.leases.endpoint_url = lambda lease_id, port: buyer_url(rc, lease_id, port)
        if rc.mode == "external":
            return
        self.relay = Relay(rc, routes, tls_dir=tls_dir(self.config), registry=self.metrics.registry)
        self.leases.endpoint_url = self.relay.url  # with the port it bound
        self.leases.outputs_url = self.relay.outputs_url
        relay = self.relay
        self.endpoint_tokens.on_rotate.append(relay.routes.invalidate)
        if self.replicas.distributed:
            # A lease whose node's tunnel is on another replica: 307 to that replica.
            relay.http.elsewhere = self.replicas.relay_holding

        on_update = self.dispatcher.on_update

        async def update_then_forget_route(session: Any, update: Any) -> None:
            await on_update(session, update)
            relay.routes.invalidate(update.lease_id)  # running or ended: ask again

        self.coordinator.on("lease_update", update_then_forget_route)

    def _node_states(self) -> dict[str, int]:
        counts = {state.value: 0 for state in Liveness}
        for record in self.registry.nodes.values():
            counts[self.registry.liveness(record).value] += 1
        return counts

    async def _count_heartbeat(self, _session: Any, _heartbeat: Any) -> None:
        self.metrics.heartbeat()

    async def _run_loops(self) -> None:
        """Placement, attestation and ledger until ``stop()``; the heartbeat flush
        until after the gRPC server stopped (the last heartbeats are written)."""
        stop = self._loops_stop
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self.registry.flush_forever(self._flush_stop, HEARTBEAT_FLUSH_EVERY),
                name="heartbeat-flush",
            )
            try:
                async with asyncio.TaskGroup() as loops:
                    loops.create_task(self.dispatcher.run(stop), name="lease-dispatch")
                    loops.create_task(self.attestation.run(stop), name="attestation")
                    loops.create_task(self.ledger.run(stop), name="ledger")
                    loops.create_task(self.market.run(stop), name="price-history")
            finally:
                self._loops_stopped.set()

    async def start(self) -> int:
        """Open the database, bind and start serving; returns the bound port."""
        policy.check_complete(served_methods())
        security = metrics_security(self.config)  # a bad file fails before anything starts
        await self.db.open()
        # Other live replicas own the open sessions and offers in flight.
        others = set(await self.replicas.live()) - {self.replicas.replica_id}
        await self.registry.load(end_open_sessions=not others)
        await self.attestation.load()
        await self.leases_store.load(interrupt_offers=not others)
        await self.ledger.load()
        await self.replicas.start()
        server = grpc.aio.server(
            options=server_options(self.config),
            interceptors=[AuthInterceptor(self.authenticator)],
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self.coordinator, server)
        acl_pb2_grpc.add_AclServicer_to_server(self.acl, server)
        nodes_pb2_grpc.add_NodesServicer_to_server(self.nodes, server)
        leases_pb2_grpc.add_LeasesServicer_to_server(self.leases, server)
        ledger_pb2_grpc.add_LedgerServicer_to_server(self.ledger, server)
        market_pb2_grpc.add_MarketServicer_to_server(self.market, server)
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
        self._loops_stop.clear()
        self._loops_stopped.clear()
        self._flush_stop.clear()
        self._loops = asyncio.create_task(self._run_loops(), name="scheduler-loops")
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
                "database": self.db.display,
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
        self._loops_stop.set()
        if self._loops is not None:
            # Placement, attestation and ledger end first, as before one TaskGroup.
            await self._loops_stopped.wait()
        await self.attestation.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.replicas.stop()
        await self.slasher.close()
        if self._loops is not None:
            # After the server: no heartbeat arrives any more, the last ones are written.
            self._flush_stop.set()
            await self._loops
            self._loops = None
        await self.db.close()

    async def sweep(self) -> None:
        """Re-evaluate liveness; leases on offline nodes are lost (or re-placed).

        Several replicas: only the leader sweeps, after reading what the others wrote
        (nodes first seen there, their heartbeats), so it judges the whole fleet."""
        if not self.replicas.leader:
            return
        if self.replicas.distributed:
            await self.registry.refresh_remote()
            # Offers a dead replica left unanswered (a live one settles its own).
            stale = 2 * self.config.placement.assign_timeout + self.config.replica.dead_after
            if await self.leases_store.interrupt_stale_offers(stale):
                self.dispatcher.kick()
        changes = self.registry.sweep()
        await self.dispatcher.on_liveness(changes)

    async def _sweep_forever(self) -> None:
        prune_every = 3600.0
        last_prune = self.clock()
        while True:
            await asyncio.sleep(max(1.0, self.policy.heartbeat_interval / 2))
            await self.sweep()
            if self.clock() - last_prune >= prune_every and self.replicas.leader:
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
