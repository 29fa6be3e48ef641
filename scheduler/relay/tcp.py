"""The relay's TCP listener for ``tcp`` ports: one handshake line, then a byte pipe.

The buyer's first line is ``RELAY1 <lease-id> <port> <token>\\n`` (``-`` as the token
of a public lease; at most 1 KiB). The relay answers ``OK\\n`` once the agent has
connected to the container, or ``ERR <status> <text>\\n`` and closes: 401 for a
missing or wrong token, 404 for an unknown port, 502/503/504 as for HTTP. Nothing
reaches the provider before the token checks out. Under TLS (the default) the line
and the token are encrypted like an HTTP request's header. A stream with no byte
either way for ``idle_timeout`` (the relay's ``idle_timeout``, as for HTTP) is closed
on both sides: the buyer's connection and the tunnel stream (the agent then closes
its connection to the container).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gpuagent.aio import run_together

from .metrics import RelayMetrics
from .routes import RouteCache
from .tokens import token_matches
from .tunnel import CarriedStream, TunnelError, TunnelHub

log = logging.getLogger(__name__)

MAGIC = "RELAY1"
MAX_LINE = 1024
READ_BYTES = 64 * 1024
_STATUS = {"no_tunnel": 503, "not_ready": 503, "not_found": 502, "unreachable": 502, "timeout": 504}


class TcpRelay:
    def __init__(
        self, hub: TunnelHub, routes: RouteCache, metrics: RelayMetrics, *, idle_timeout: float
    ) -> None:
        self.hub = hub
        self.routes = routes
        self.metrics = metrics
        self.idle_timeout = idle_timeout

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        writer.write(f"ERR {status} {text}\n".encode())
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                line = await reader.readuntil(b"\n")
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            await self._refuse(writer, 400, f"expected '{MAGIC} <lease-id> <port> <token>'")
            return
        parts = line[:MAX_LINE].decode("latin-1").split()
        if len(line) > MAX_LINE or len(parts) != 4 or parts[0] != MAGIC:
            await self._refuse(writer, 400, f"expected '{MAGIC} <lease-id> <port> <token>'")
            return
        _, lease_id, port, token = parts
        route = await self.routes.get(lease_id)
        authorized = route is not None and (
            route.public or token_matches(token, route.token_sha256)
        )
        if route is None or not authorized:
            await self._refuse(writer, 401, "endpoint token missing or wrong")
            if route is not None:
                self.metrics.request(lease_id, 401)
            return
        if route.port(port) is None:
            await self._refuse(writer, 404, f"lease {lease_id} declares no port {port}")
            return
        started = time.monotonic()
        try:
            stream = await self.hub.open_stream(route.node_id, lease_id, port)
        except TunnelError as exc:
            status = _STATUS.get(exc.kind, 502)
            await self._refuse(writer, status, str(exc))
            self.metrics.request(lease_id, status)
            return
        self.metrics.request(lease_id, 200, time.monotonic() - started)
        self.metrics.active.labels(lease_id).inc()
        try:
            writer.write(b"OK\n")
            await writer.drain()
            await pipe(reader, writer, stream, self.metrics, lease_id, idle=self.idle_timeout)
        finally:
            stream.close()
            self.metrics.active.labels(lease_id).dec()


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: CarriedStream,
    metrics: RelayMetrics,
    lease_id: str,
    *,
    idle: float,
) -> None:
    """Bytes both ways until both halves closed, one side broke, or nothing moved
    either way for ``idle`` seconds (the caller then closes both sides)."""
    last = time.monotonic()

    async def up() -> None:
        nonlocal last
        while data := await reader.read(READ_BYTES):
            last = time.monotonic()
            metrics.carried(lease_id, len(data), 0)
            await stream.write(data)
        await stream.write_eof()

    async def down() -> None:
        nonlocal last
        while data := await stream.read():
            last = time.monotonic()
            metrics.carried(lease_id, 0, len(data))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def both_ways() -> None:
        await run_together(up(), down(), return_when=asyncio.FIRST_EXCEPTION)

    async def idle_watch() -> None:
        while True:  # a deadline that moves with traffic: no event to wait on
            left = last + idle - time.monotonic()
            if left <= 0:
                log.info("closing an idle tcp stream", extra={"lease_id": lease_id})
                return
            await asyncio.sleep(left)

    # Whichever ends first ends the pipe: both directions done, or the idle timeout
    # (which cancels both directions; the caller closes the buyer and the stream).
    await run_together(both_ways(), idle_watch())
