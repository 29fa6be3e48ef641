"""The agent's own listeners in direct mode: one per declared port of a service lease.

Each listener serves exactly one (lease, port), so nothing in a request chooses where
it goes; the container is found through ``ServiceTargets`` like the tunnel's streams.

- ``http``: a small HTTP/1.1 proxy (h11) that checks ``Authorization: Bearer`` of
  every request against the lease's token hash before anything reaches the container
  (401 otherwise), removes that header, sets ``X-Forwarded-For``/``-Proto``, streams
  bodies both ways, and turns into a byte pipe after a 101 (WebSocket).
- ``tcp``: the relay's TCP handshake (``RELAY1 <lease-id> <port> <token>\\n`` ->
  ``OK\\n`` or ``ERR <status> <text>\\n``), then a byte pipe; so a tcp port is no
  less authenticated here than at the relay, and one client wrapper serves both.

A connection idle both ways for ``idle_timeout`` is closed, as at the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import h11

from agent.leases.endpoints import ServiceTarget, ServiceTargets
from gpuagent.aio import run_together
from gpuagent.endpoint_tokens import bearer, token_matches

log = logging.getLogger(__name__)

READ_BYTES = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024
MAX_LINE = 1024
MAGIC = "RELAY1"
_HOP_BY_HOP = frozenset({b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te"})
_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)


@dataclass(frozen=True)
class FrontPort:
    """What one listener serves, and how it checks buyers."""

    lease_id: str
    name: str
    protocol: str  # http | tcp
    public: bool
    token_sha256: Callable[[], bytes]  # read per request: a rotated token applies at once
    targets: ServiceTargets
    scheme: str = "https"
    idle_timeout: float = 600.0

    def authorized(self, token: str) -> bool:
        # Not public and no hash (yet): nobody gets in (fail closed).
        return self.public or token_matches(token, self.token_sha256())

    def target(self) -> tuple[ServiceTarget | None, int, str]:
        """The container port now, or the status and text that refuse the connection."""
        found = self.targets.service_target(self.lease_id, self.name)
        if found is None:
            return None, 502, "the lease does not serve this port now"
        if not found.ready:
            return None, 503, "the service is not ready"
        return found, 0, ""


class _Closing(Exception):
    """The buyer connection ends now."""


class Idle:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def watch(self) -> None:
        """Returns once nothing moved for ``limit`` seconds."""
        while True:  # a deadline that moves with traffic: no event to wait on
            left = self.last + self.limit - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)


async def _connect(target: ServiceTarget) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(10):
        return await asyncio.open_connection(target.host, target.port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _pipe(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    idle: Idle,
) -> None:
    """Bytes both ways until both halves closed, one side broke, or idle."""

    async def one_way(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(READ_BYTES):
            idle.touch()
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    async def both() -> None:
        await run_together(
            one_way(a_reader, b_writer),
            one_way(b_reader, a_writer),
            return_when=asyncio.FIRST_EXCEPTION,
        )

    await run_together(both(), idle.watch())


class TcpFront:
    def __init__(self, port: FrontPort) -> None:
        self.port = port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            await _close(writer)

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        writer.write(f"ERR {status} {text}\n".encode())
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        usage = f"expected '{MAGIC} <lease-id> <port> <token>'"
        try:
            async with asyncio.timeout(30):
                line = await reader.readuntil(b"\n")
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            await self._refuse(writer, 400, usage)
            return
        parts = line[:MAX_LINE].decode("latin-1").split()
        if len(line) > MAX_LINE or len(parts) != 4 or parts[0] != MAGIC:
            await self._refuse(writer, 400, usage)
            return
        _, lease_id, name, token = parts
        # This listener serves one lease port: naming another is a wrong address, and
        # answers like a wrong token so lease ids cannot be probed through it.
        if lease_id != self.port.lease_id or not self.port.authorized(token):
            await self._refuse(writer, 401, "endpoint token missing or wrong")
            return
        if name != self.port.name:
            await self._refuse(writer, 404, f"this address serves port {self.port.name} only")
            return
        target, status, text = self.port.target()
        if target is None:
            await self._refuse(writer, status, text)
            return
        try:
            up_reader, up_writer = await _connect(target)
        except (OSError, TimeoutError):
            await self._refuse(writer, 502, "the service did not accept the connection")
            return
        try:
            writer.write(b"OK\n")
            await writer.drain()
            await _pipe(reader, writer, up_reader, up_writer, Idle(self.port.idle_timeout))
        finally:
            await _close(up_writer)


class _Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    def reusable(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()


class HttpFront:
    def __init__(self, port: FrontPort) -> None:
        self.port = port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _HttpConnection(self.port, reader, writer).run()


class _HttpConnection:
    def __init__(
        self, port: FrontPort, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.port = port
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle = Idle(port.idle_timeout)
        self.upstream: _Upstream | None = None
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""

    async def run(self) -> None:
        watch = asyncio.ensure_future(self.idle.watch())
        # Idle past the limit: cut the connection (the read in progress then fails).
        watch.add_done_callback(self._cut_if_idle)
        try:
            while True:
                event = await self._receive()
                if not isinstance(event, h11.Request):
                    return
                await self._exchange(event)
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except _Closing:
            pass
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(_Closing, h11.LocalProtocolError, ConnectionError):
                await self._error(exc.error_status_hint, f"bad request: {exc}")
        except (ConnectionError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            pass
        finally:
            watch.cancel()
            if self.upstream is not None:
                await _close(self.upstream.writer)
            await _close(self.writer)

    def _cut_if_idle(self, watch: asyncio.Future[None]) -> None:
        if not watch.cancelled():
            self.writer.transport.abort()

    async def _receive(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_BYTES)
                self.idle.touch()
                self.conn.receive_data(data)
                continue
            return cast("h11.Event | type[h11.PAUSED]", event)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()
            self.idle.touch()

    async def _error(self, status: int, text: str, **headers: str) -> None:
        """Answer with an error and close: the request body (if any) is never read."""
        body = (text + "\n").encode()
        extra = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *extra,
                    ],
                )
            )
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        raise _Closing

    async def _check(self, request: h11.Request) -> ServiceTarget:
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > MAX_HEAD_BYTES:
            await self._error(431, f"request head is {size} bytes; at most {MAX_HEAD_BYTES}")
        if not self.port.authorized(bearer(dict(request.headers).get(b"authorization"))):
            log.info(
                "direct request refused: endpoint token missing or wrong",
                extra={"lease_id": self.port.lease_id, "port": self.port.name},
            )
            await self._error(
                401,
                "endpoint token missing or wrong: send Authorization: Bearer <token> "
                "(gpu-scheduler lease show prints it to the lease's buyer)",
                www_authenticate='Bearer realm="gpu-agent"',
            )
        target, status, text = self.port.target()
        if target is None:
            await self._error(status, text)
        assert target is not None
        return target

    async def _upstream_for(self, target: ServiceTarget) -> _Upstream:
        if self.upstream is not None and not self.upstream.reusable():
            await _close(self.upstream.writer)
            self.upstream = None
        if self.upstream is None:
            try:
                self.upstream = _Upstream(*await _connect(target))
            except (OSError, TimeoutError):
                await self._error(502, "the service did not accept the connection")
        assert self.upstream is not None
        return self.upstream

    async def _exchange(self, request: h11.Request) -> None:
        target = await self._check(request)
        upstream = await self._upstream_for(target)
        headers = [
            (name, value)
            for name, value in request.headers
            if name not in _HOP_BY_HOP
            and name not in _FORWARDED
            and not (name == b"authorization" and not self.port.public)
        ]
        headers += [
            (b"x-forwarded-for", self.peer.encode()),
            (b"x-forwarded-proto", self.port.scheme.encode()),
        ]
        await upstream.send(
            h11.Request(
                method=request.method,
                target=request.target,
                headers=headers,
                http_version=request.http_version,
            )
        )
        pump = asyncio.ensure_future(self._pump_request(upstream))
        try:
            status = await self._pump_response(upstream)
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if status == 101:
            buyer_rest, _ = self.conn.trailing_data
            service_rest, _ = upstream.conn.trailing_data
            if buyer_rest:
                upstream.writer.write(buyer_rest)
            if service_rest:
                self.writer.write(service_rest)
            await _pipe(self.reader, self.writer, upstream.reader, upstream.writer, self.idle)
            raise _Closing

    async def _pump_request(self, upstream: _Upstream) -> None:
        while True:
            event = await self._receive()
            if isinstance(event, h11.Data | h11.EndOfMessage):
                await upstream.send(event)
                if isinstance(event, h11.EndOfMessage):
                    return
            else:
                return  # the buyer went away mid-body (or a 101 paused it)

    async def _pump_response(self, upstream: _Upstream) -> int:
        status = 0
        client = upstream.conn
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                await self.writer.drain()
                data = await upstream.reader.read(READ_BYTES)
                self.idle.touch()
                try:
                    client.receive_data(data)
                except h11.RemoteProtocolError:
                    await self._bad_gateway(status)
                continue
            if event is h11.PAUSED:
                return status
            if isinstance(event, h11.ConnectionClosed):
                await self._bad_gateway(status)
            if isinstance(event, h11.InformationalResponse | h11.Response):
                if event.status_code == 101 or isinstance(event, h11.Response):
                    status = event.status_code
                data = self.conn.send(
                    type(event)(
                        status_code=event.status_code,
                        headers=[(k, v) for k, v in event.headers if k not in _HOP_BY_HOP],
                        reason=event.reason,
                    )
                )
                self.writer.write(data or b"")
                if event.status_code == 101:
                    await self.writer.drain()
                    return 101
            elif isinstance(event, h11.Data):
                self.writer.write(self.conn.send(h11.Data(data=event.data)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                self.writer.write(self.conn.send(h11.EndOfMessage(headers=event.headers)) or b"")
                await self.writer.drain()
                if client.our_state is h11.DONE and client.their_state is h11.DONE:
                    client.start_next_cycle()
                return status

    async def _bad_gateway(self, status: int) -> None:
        if status:  # the head went out: all the buyer can learn is a cut connection
            self.writer.transport.abort()
            raise _Closing
        await self._error(502, "the service closed the connection without answering")
