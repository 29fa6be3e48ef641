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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpuagent.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from . import tlsgen
from .config import SchedulerConfig
from .coordinator_service import CoordinatorService
from .db import Database
from .liveness import LivenessPolicy
from .nodes_service import NodesService
from .registry import Clock, Registry

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["Nodes"].full_name,
)


class ServerStartError(Exception):
    """The server cannot start (port taken, bad certificate); the message says which."""


def tls_dir(config: SchedulerConfig) -> Path:
    """Where the auto-generated CA and certificate live (beside the database)."""
    return config.database.path.parent / "tls"


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
        self.coordinator = CoordinatorService(
            self.registry,
            common_pb2.NodeParams(heartbeat_interval_ms=int(lv.heartbeat_interval * 1000)),
        )
        self.nodes = NodesService(self.registry)
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Open the database, bind and start serving; returns the bound port."""
        await self.db.open()
        await self.registry.load()
        server = grpc.aio.server(options=server_options(self.config))
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self.coordinator, server)
        nodes_pb2_grpc.add_NodesServicer_to_server(self.nodes, server)
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
        self._server = server
        self.port = port
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
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.db.close()

    async def _sweep_forever(self) -> None:
        prune_every = 3600.0
        last_prune = self.clock()
        while True:
            await asyncio.sleep(max(1.0, self.policy.heartbeat_interval / 2))
            self.registry.sweep()
            if self.clock() - last_prune >= prune_every:
                last_prune = self.clock()
                await self.registry.prune_coverage()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        sweeper = asyncio.create_task(self._sweep_forever(), name="liveness-sweeper")
        try:
            await stop.wait()
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await self.stop()
