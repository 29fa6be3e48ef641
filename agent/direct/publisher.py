"""Direct mode (``services.mode: direct``): the agent serves a service lease's ports on
its own advertise address, for providers with a public address (docs/services.md).

The lease manager calls ``publish`` before a service lease is reported running (also
when a restarted agent re-adopts it), ``withdraw`` when it ends and ``retain`` after
reconciling; ``address`` is what its endpoints report. Listeners bind the advertise
address only (never 0.0.0.0 or ::), one per http/tcp port on a port of
``services.port_range`` kept in the port book; udp ports are not served here (Docker
publishes them on ``isolation.publish_address`` as in relay mode).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from agent.config import ServicesConfig
from agent.leases.endpoints import ServiceTargets
from gpuagent import leaserules

from .front import FrontPort, HttpFront, TcpFront
from .ports import Address, PortBook, PortsExhausted

log = logging.getLogger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class DirectModeError(Exception):
    """Direct mode cannot run as configured (the message names the key)."""


def check_advertise_address(address: Address) -> None:
    """Refuse an address that is not one of this host's: binding it is the test the
    kernel itself applies (EADDRNOTAVAIL), so no interface table is parsed here."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            why = "not an address of this host" if exc.errno == errno.EADDRNOTAVAIL else str(exc)
            raise DirectModeError(
                f"services.advertise_address {address}: {why}; name an address one of "
                "this host's interfaces has (ip -brief address)"
            ) from None


def _tls(config: ServicesConfig) -> ssl.SSLContext | None:
    if config.cert_file is None or config.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise DirectModeError(
            f"services.cert_file/key_file ({config.cert_file}, {config.key_file}): {exc}"
        ) from None
    return context


class DirectPublisher:
    def __init__(self, config: ServicesConfig, state_dir: Path, targets: ServiceTargets) -> None:
        if config.advertise_address is None:
            raise DirectModeError("services.advertise_address is required in direct mode")
        self.config = config
        self.address: Address = config.advertise_address
        check_advertise_address(self.address)
        self.tls = _tls(config)
        self.book = PortBook(state_dir, self.address, config.ports())
        self.targets = targets
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._listening: dict[str, dict[str, int]] = {}  # lease -> port name -> host port
        self._connections: dict[str, set[asyncio.StreamWriter]] = {}  # open buyer connections
        host = config.advertise_host or str(self.address)
        self._host = f"[{host}]" if ":" in host else host

    # -- what the lease manager calls ------------------------------------------------

    def set_token(self, lease_id: str, token_sha256: bytes) -> None:
        """The lease's endpoint token hash (LeaseAssign, and again after a rotation)."""
        self.book.set_token(lease_id, token_sha256 if len(token_sha256) == 32 else b"")

    async def publish(self, lease_id: str, ports: Sequence[leaserules.Port], public: bool) -> None:
        """Listen for the lease's http and tcp ports (the same host ports as before a
        restart); idempotent. A port that cannot be had is logged, and its endpoint then
        reports no direct address: the relay still serves it."""
        if lease_id in self._servers:
            return
        served = [p for p in ports if leaserules.port_protocol(p) in ("http", "tcp")]
        names = [leaserules.port_name(p) for p in served]
        try:
            host_ports = await asyncio.to_thread(self.book.allocate, lease_id, names)
        except PortsExhausted as exc:
            log.error("direct mode: %s", exc, extra={"lease_id": lease_id})
            return
        servers: list[asyncio.Server] = []
        self._servers[lease_id] = servers
        for port, name in zip(served, names, strict=True):
            protocol = leaserules.port_protocol(port)
            front = FrontPort(
                lease_id=lease_id,
                name=name,
                protocol=protocol,
                public=public,
                token_sha256=lambda: self.book.token(lease_id),
                targets=self.targets,
                scheme="https" if self.tls else "http",
                idle_timeout=self.config.idle_timeout,
            )
            handler = HttpFront(front).handle if protocol == "http" else TcpFront(front).handle
            try:
                server = await asyncio.start_server(
                    self._tracked(lease_id, handler),
                    str(self.address),
                    host_ports[name],
                    ssl=self.tls,
                    reuse_address=True,
                )
            except OSError as exc:
                log.error(
                    "direct mode: cannot listen",
                    extra={"lease_id": lease_id, "port": name, "error": str(exc)},
                )
                continue
            servers.append(server)
            self._listening.setdefault(lease_id, {})[name] = host_ports[name]
            log.info(
                "direct endpoint listening",
                extra={
                    "lease_id": lease_id,
                    "port": name,
                    "address": self.address_of_port(host_ports[name]),
                },
            )

    def _tracked(self, lease_id: str, handler: Handler) -> Handler:
        open_now = self._connections.setdefault(lease_id, set())

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            open_now.add(writer)
            try:
                await handler(reader, writer)
            finally:
                open_now.discard(writer)

        return tracked

    def _cut(self, lease_id: str) -> None:
        """Close the lease's listeners and the buyer connections they accepted."""
        self._listening.pop(lease_id, None)
        for server in self._servers.pop(lease_id, []):
            server.close()
        for writer in self._connections.pop(lease_id, set()):
            writer.transport.abort()

    async def withdraw(self, lease_id: str) -> None:
        """Stop listening and free the lease's host ports (it ended)."""
        self._cut(lease_id)  # a buyer connection to an ended lease ends too
        await asyncio.to_thread(self.book.release, lease_id)

    async def retain(self, lease_ids: Iterable[str]) -> None:
        """After reconciling: forget ports of leases that ended while the agent was down."""
        keep = set(lease_ids)
        for lease_id in [known for known in self._servers if known not in keep]:
            await self.withdraw(lease_id)
        await asyncio.to_thread(self.book.retain, keep)

    def address_of(self, lease_id: str, name: str) -> tuple[str, bool]:
        """``("host:port", tls)`` where the port is served directly; ``("", False)``
        when it is not (not published yet, a udp port, no port free)."""
        port = self._listening.get(lease_id, {}).get(name)
        return (self.address_of_port(port), self.tls is not None) if port else ("", False)

    def address_of_port(self, port: int) -> str:
        return f"{self._host}:{port}"

    async def close(self) -> None:
        """Agent shutdown: stop listening, keep the book (a restart re-opens the same ports)."""
        for lease_id in list(self._servers):
            self._cut(lease_id)
