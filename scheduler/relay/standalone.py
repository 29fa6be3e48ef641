"""``gpu-scheduler relay``: the relay as its own process, to scale apart from the coordinator.

Agents' tunnels arrive on ``relay.tunnel_listen`` (gRPC, TLS with the scheduler's
generated certificate or ``server.cert_file``); routes and token hashes come from the
coordinator's ``RelayDirectory`` (``relay.coordinator``, an admin token), cached like
the embedded relay's. The coordinator runs with ``relay.mode: external`` and
``relay.tunnel_address`` set to where agents reach this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from gpuagent.v1 import relay_pb2_grpc

from ..config import SchedulerConfig
from ..metrics import SchedulerMetrics
from ..tlsfiles import tls_dir
from .directory import RemoteRoutes
from .server import Relay, RelayStartError

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RelayStartError(f"{what}: cannot read {path}: {exc.strerror}") from None


def coordinator_channel(config: SchedulerConfig) -> tuple[grpc.aio.Channel, str]:
    rc = config.relay.coordinator
    if rc.token_file is None:
        raise RelayStartError(
            "relay.coordinator.token_file: a standalone relay needs an admin token to read routes"
        )
    token = _read(rc.token_file, "relay.coordinator.token_file").decode().strip()
    if rc.insecure:
        return grpc.aio.insecure_channel(rc.address), token
    root = _read(rc.ca_file, "relay.coordinator.ca_file") if rc.ca_file else None
    return grpc.aio.secure_channel(rc.address, grpc.ssl_channel_credentials(root)), token


class StandaloneRelay:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        channel, token = coordinator_channel(config)
        self.channel = channel
        self.metrics = SchedulerMetrics()
        self.relay = Relay(
            config.relay,
            RemoteRoutes(channel, token),
            tls_dir=tls_dir(config),
            registry=self.metrics.registry,
        )
        self.grpc: grpc.aio.Server | None = None
        self.tunnel_port = 0

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.config.server
        if self.config.server.insecure:
            return None
        if s.cert_file is not None and s.key_file is not None:
            cert, key = _read(s.cert_file, "server.cert_file"), _read(s.key_file, "server.key_file")
        else:
            from ..tlsgen import ensure

            files = ensure(tls_dir(self.config))
            cert, key = files.server_cert.read_bytes(), files.server_key.read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ]
        )
        relay_pb2_grpc.add_TunnelServicer_to_server(self.relay.hub, server)
        listen = self.config.relay.tunnel_listen
        credentials = self._credentials()
        try:
            if credentials is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, credentials)
        except RuntimeError as exc:
            raise RelayStartError(f"relay.tunnel_listen: cannot bind {listen}: {exc}") from None
        await server.start()
        self.grpc = server
        self.tunnel_port = port
        try:
            await self.relay.start()
        except RelayStartError:
            await self.stop()
            raise
        log.info("standalone relay serving", extra={"tunnel_port": port, "port": self.relay.port})

    async def stop(self) -> None:
        await self.relay.stop()
        if self.grpc is not None:
            await self.grpc.stop(1.0)
            self.grpc = None
        await self.channel.close()
