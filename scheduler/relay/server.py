"""The relay as one part: tunnel hub, route cache, buyer HTTP(S) and TCP listeners.

``SchedulerServer`` builds one and adds ``hub`` to its own gRPC server (agents reach
the tunnel at the coordinator's address); ``gpu-scheduler relay`` builds one with its
own gRPC server for the hub and a ``RemoteRoutes`` source (scheduler/relay/remote.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

from prometheus_client import CollectorRegistry

from ..config import RelayConfig
from .http import HttpRelay, HttpSettings
from .metrics import RelayMetrics
from .routes import RouteCache, RouteSource
from .tcp import TcpRelay
from .tunnel import TunnelHub

log = logging.getLogger(__name__)


class RelayStartError(Exception):
    """The relay cannot start (port taken, bad certificate); the message says which."""


def _split(listen: str, what: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise RelayStartError(f"relay.{what}: expected host:port, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - the operator's choice


def outputs_url(config: RelayConfig, lease_id: str, *, listen_port: int = 0) -> str:
    """Where a lease's output archive is downloaded (path form: any relay host name)."""
    scheme = "http" if config.insecure_http else "https"
    number = config.public_port or listen_port or _split(config.listen, "listen")[1]
    default = 80 if scheme == "http" else 443
    suffix = "" if number == default else f":{number}"
    return f"{scheme}://{config.domain}{suffix}/_outputs/{lease_id}"


def buyer_url(config: RelayConfig, lease_id: str, port: str, *, listen_port: int = 0) -> str:
    """The URL a buyer uses for one port of a lease (host-based; path-based when the
    lease id is no DNS label)."""
    scheme = "http" if config.insecure_http else "https"
    number = config.public_port or listen_port or _split(config.listen, "listen")[1]
    default = 80 if scheme == "http" else 443
    suffix = "" if number == default else f":{number}"
    host_ok = lease_id.replace("-", "").isalnum() and lease_id.islower() and len(lease_id) <= 50
    if host_ok and port.isalnum():
        return f"{scheme}://{lease_id}-{port}.{config.domain}{suffix}/"
    return f"{scheme}://{config.domain}{suffix}/_lease/{lease_id}/{port}/"


class Relay:
    def __init__(
        self,
        config: RelayConfig,
        source: RouteSource,
        *,
        tls_dir: Path,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.tls_dir = tls_dir
        self.metrics = RelayMetrics(registry)
        self.hub = TunnelHub(ping_interval=config.ping_interval, open_timeout=config.open_timeout)
        self.hub.on_change = self.metrics.tunnels.set
        self.routes = RouteCache(source, ttl=config.route_ttl)
        self.http = HttpRelay(
            self.hub,
            self.routes,
            HttpSettings(
                domain=config.domain,
                idle_timeout=config.idle_timeout,
                scheme="http" if config.insecure_http else "https",
            ),
            self.metrics,
        )
        self.tcp = TcpRelay(self.hub, self.routes, self.metrics, idle_timeout=config.idle_timeout)
        self._servers: list[asyncio.Server] = []
        self.port = 0
        self.tcp_port = 0

    def url(self, lease_id: str, port: str) -> str:
        return buyer_url(self.config, lease_id, port, listen_port=self.port)

    def outputs_url(self, lease_id: str) -> str:
        return outputs_url(self.config, lease_id, listen_port=self.port)

    def _ssl(self) -> ssl.SSLContext | None:
        if self.config.insecure_http:
            log.warning("relay serving plain HTTP (relay.insecure_http: true)")
            return None
        if self.config.cert_file is not None and self.config.key_file is not None:
            cert, key = self.config.cert_file, self.config.key_file
        else:
            cert, key = _generated(self.tls_dir, self.config.domain)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise RelayStartError(f"relay.cert_file: cannot load {cert}: {exc}") from None
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def start(self) -> int:
        context = self._ssl()
        host, port = _split(self.config.listen, "listen")
        try:
            server = await asyncio.start_server(
                self.http.handle, host, port, ssl=context, limit=2 * 1024 * 1024, backlog=1024
            )
        except OSError as exc:
            raise RelayStartError(
                f"relay.listen: cannot bind {self.config.listen}: {exc.strerror}"
            ) from None
        self._servers.append(server)
        self.port = int(server.sockets[0].getsockname()[1])
        if self.config.tcp_listen:
            host, port = _split(self.config.tcp_listen, "tcp_listen")
            try:
                tcp = await asyncio.start_server(self.tcp.handle, host, port, ssl=context)
            except OSError as exc:
                await self.stop()
                raise RelayStartError(
                    f"relay.tcp_listen: cannot bind {self.config.tcp_listen}: {exc.strerror}"
                ) from None
            self._servers.append(tcp)
            self.tcp_port = int(tcp.sockets[0].getsockname()[1])
        log.info(
            "relay serving",
            extra={
                "listen": self.config.listen,
                "port": self.port,
                "domain": self.config.domain,
                "tls": context is not None,
                "tcp_port": self.tcp_port,
            },
        )
        return self.port

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                # Open buyer connections end with the process; do not wait on them.
                await asyncio.wait_for(server.wait_closed(), 0.5)
        self._servers.clear()


def _generated(tls_dir: Path, domain: str) -> tuple[Path, Path]:
    from ..tlsgen import relay_certificate

    return relay_certificate(tls_dir, domain)
