"""The relay's buyer side: HTTP/1.1 (h11) in, each connection carried through a tunnel.

Per request: find the lease and port (host ``<lease>-<port>.<domain>`` or path
``/_lease/<lease>/<port>/...``), check the endpoint token against the cached hash,
and only then open (or reuse) a tunnel stream to the agent. Request and response
bodies stream in both directions at once, frame by frame: chunked responses and
server-sent events reach the buyer as the service writes them, a 50 GB upload never
sits in memory, and nothing caps a request's duration. A 101 turns the connection
into a byte pipe (WebSocket). Only a connection idle in both directions for
``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import h11

from gpuagent.outputs import OUTPUTS_STREAM

from .metrics import RelayMetrics
from .routes import Route, RouteCache
from .tokens import bearer, token_matches
from .tunnel import CarriedStream, TunnelError, TunnelHub

log = logging.getLogger(__name__)

PATH_PREFIX = b"/_lease/"
# A lease's output archive, from the node that signed it (gpu-scheduler output).
OUTPUTS_PREFIX = b"/_outputs/"
READ_BYTES = 1024 * 1024  # an upload moves in frames this big through the tunnel
MAX_HEAD_BYTES = 64 * 1024
_HOP_BY_HOP = frozenset({b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te"})
# Set by the relay itself: a buyer's own values would let it claim another address.
_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
_TUNNEL_STATUS = {
    "no_tunnel": (503, "the provider's tunnel is down; retry shortly"),
    "not_ready": (503, "the service is not ready"),
    "not_found": (502, "the provider does not serve this port"),
    "unreachable": (502, "the service did not accept the connection"),
    "timeout": (504, "the provider did not answer"),
}


@dataclass(frozen=True)
class HttpSettings:
    domain: str = "relay.localhost"
    idle_timeout: float = 600.0
    scheme: str = "https"


@dataclass(frozen=True)
class Target:
    lease_id: str
    port: str
    path: bytes  # what the service sees: "/" and below


def locate(host: bytes, target: bytes, domain: str) -> Target | None:
    """Which lease and port a request is for; None when it names none."""
    if target.startswith(PATH_PREFIX):
        parts = target[len(PATH_PREFIX) :].split(b"/", 2)
        if len(parts) >= 2 and parts[0] and parts[1]:
            rest = parts[1].split(b"?", 1)
            query = b"?" + rest[1] if len(rest) == 2 else b""
            path = b"/" + parts[2] if len(parts) == 3 else b"/" + query
            return Target(parts[0].decode("latin-1"), rest[0].decode("latin-1"), path)
        return None
    name = host.decode("latin-1").lower().rsplit(":", 1)[0] if host else ""
    if host.startswith(b"[") or not name.endswith("." + domain):
        return None
    label = name[: -len(domain) - 1]
    lease, dash, port = label.rpartition("-")
    if not dash or not lease or not port or "." in label:
        return None
    return Target(lease, port, target or b"/")


class Activity:
    """Last time a byte moved either way on one buyer connection."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


async def _idle_watch(activity: Activity, idle: float, writer: asyncio.StreamWriter) -> None:
    while True:
        left = activity.last + idle - time.monotonic()
        if left <= 0:
            log.info("closing an idle buyer connection", extra={"idle_timeout": idle})
            writer.transport.abort()
            return
        await asyncio.sleep(left)


class _Closing(Exception):
    """The buyer connection ends now (after an error answer or a protocol switch)."""


class _Upstream:
    """A tunnel stream to one lease port, with the HTTP/1.1 client state toward it."""

    def __init__(self, lease_id: str, port: str, stream: CarriedStream) -> None:
        self.key = (lease_id, port)
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    def reusable(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    def close(self) -> None:
        self.stream.close()


class BuyerConnection:
    def __init__(
        self,
        relay: HttpRelay,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.relay = relay
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.activity = Activity()
        self.upstream: _Upstream | None = None
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.lease_id = ""  # the lease this connection counts against in metrics

    async def _receive(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_BYTES)
                self.activity.touch()
                self.conn.receive_data(data)
                continue
            return cast("h11.Event | type[h11.PAUSED]", event)

    async def _send(self, event: h11.Event) -> int:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()
            self.activity.touch()
        return len(data or b"")

    def _queue(self, event: h11.Event) -> None:
        """Write without waiting; ``_flush`` waits once for what was queued."""
        data = self.conn.send(event)
        if data:
            self.writer.write(data)

    async def _flush(self) -> None:
        await self.writer.drain()
        self.activity.touch()

    async def _error(self, status: int, text: str, lease_id: str = "", **headers: str) -> None:
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
        if lease_id:
            self.relay.metrics.request(lease_id, status)
        raise _Closing

    async def run(self) -> None:
        watch = asyncio.create_task(
            _idle_watch(self.activity, self.relay.settings.idle_timeout, self.writer)
        )
        try:
            while True:
                event = await self._receive()
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
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
                self.upstream.close()
            if self.lease_id:
                self.relay.metrics.active.labels(self.lease_id).dec()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _route(self, request: h11.Request) -> tuple[Target, Route]:
        # h11 bounds only a head still arriving; one that came whole in one read is
        # bounded here, so no buyer makes the relay or the service hold a huge head.
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > MAX_HEAD_BYTES:
            await self._error(431, f"request head is {size} bytes; at most {MAX_HEAD_BYTES}")
        if request.target.startswith(OUTPUTS_PREFIX):
            return await self._output_route(request)
        headers = dict(request.headers)
        target = locate(headers.get(b"host", b""), request.target, self.relay.settings.domain)
        if target is None:
            await self._error(
                404,
                f"no service here: use https://<lease-id>-<port>.{self.relay.settings.domain}/ "
                "or /_lease/<lease-id>/<port>/",
            )
        assert target is not None
        try:
            route = await self.relay.routes.get(target.lease_id)
        except Exception as exc:  # a standalone relay whose coordinator is away
            log.warning(
                "relay cannot look up a route",
                extra={"lease_id": target.lease_id[:128], "error": str(exc)[:300]},
            )
            await self._error(503, "the relay cannot reach its coordinator; retry shortly")
        # Unknown lease, undeclared port and wrong token all look alike to a stranger: 401
        # without a valid token, so nobody can probe which lease ids exist.
        if route is None or route.port(target.port) is None:
            if route is not None and (route.public or _authorized(request, route)):
                await self._error(404, f"lease {target.lease_id} declares no port {target.port}")
            await self._unauthorized(target.lease_id if route else "")
        assert route is not None
        if not route.public and not _authorized(request, route):
            await self._unauthorized(route.lease_id)
        port = route.port(target.port)
        if port is not None and port.protocol != "http":
            await self._error(
                404,
                f"lease {target.lease_id} port {target.port} is {port.protocol}, not http: "
                "use the relay's TCP listener (docs/services.md)",
                target.lease_id,
            )
        return target, route

    async def _output_route(self, request: h11.Request) -> tuple[Target, Route]:
        """``/_outputs/<lease-id>``: the bearer is an output ticket (Leases.OutputTicket),
        checked by the coordinator; the agent serves the archive with Range support."""
        rest = request.target[len(OUTPUTS_PREFIX) :].split(b"?", 1)[0]
        lease_id = rest.decode("latin-1").strip("/")
        if not lease_id or "/" in lease_id or len(lease_id) > 128:
            await self._error(404, "use /_outputs/<lease-id> (gpu-scheduler output prints it)")
        if request.method not in (b"GET", b"HEAD"):
            await self._error(405, "outputs are read with GET or HEAD", allow="GET, HEAD")
        ticket = bearer(dict(request.headers).get(b"authorization"))
        route = None
        if ticket:
            try:
                route = await self.relay.routes.source.output_route(lease_id, ticket)
            except Exception as exc:  # a standalone relay whose coordinator is away
                log.warning(
                    "relay cannot check an output ticket",
                    extra={"lease_id": lease_id, "error": str(exc)[:300]},
                )
                await self._error(503, "the relay cannot reach its coordinator; retry shortly")
        if route is None:
            await self._error(
                401,
                "output ticket missing, wrong or expired: `gpu-scheduler output LEASE` asks "
                "the coordinator for one (only the lease's buyer gets it)",
                www_authenticate='Bearer realm="gpu-relay-outputs"',
            )
        assert route is not None
        return Target(lease_id, OUTPUTS_STREAM, b"/"), route

    async def _unauthorized(self, lease_id: str) -> None:
        await self._error(
            401,
            "endpoint token missing or wrong: send Authorization: Bearer <token> "
            "(gpu-scheduler lease show prints it to the lease's buyer)",
            lease_id,
            www_authenticate='Bearer realm="gpu-relay"',
        )

    async def _upstream(self, target: Target, route: Route) -> _Upstream:
        key = (target.lease_id, target.port)
        if self.upstream is not None and (self.upstream.key != key or not self.upstream.reusable()):
            self.upstream.close()
            self.upstream = None
        if self.upstream is None:
            try:
                stream = await self.relay.hub.open_stream(
                    route.node_id, target.lease_id, target.port
                )
            except TunnelError as exc:
                if exc.kind == "no_tunnel":
                    await self._redirect_elsewhere(target, route)
                status, text = _TUNNEL_STATUS.get(exc.kind, (502, "bad gateway"))
                if target.port == OUTPUTS_STREAM and exc.kind == "not_found":
                    # The provider says why (retention over, disk lost): the buyer's 404.
                    status, text = 404, "the provider no longer has these outputs"
                log.info(
                    "relay could not reach a service",
                    extra={"lease_id": target.lease_id, "port": target.port, "why": str(exc)},
                )
                await self._error(status, f"{text} ({exc})", target.lease_id)
            self.upstream = _Upstream(target.lease_id, target.port, stream)
        if self.lease_id != target.lease_id:
            if self.lease_id:
                self.relay.metrics.active.labels(self.lease_id).dec()
            self.lease_id = target.lease_id
            self.relay.metrics.active.labels(self.lease_id).inc()
        return self.upstream

    async def _redirect_elsewhere(self, target: Target, route: Route) -> None:
        """Several replicas: the node's tunnel is on another replica's relay; send the
        buyer there (307 keeps method and body), in the path form, which any host
        name of that relay serves. Returns when no other replica holds it."""
        if self.relay.elsewhere is None:
            return
        try:
            base = await self.relay.elsewhere(route.node_id)
        except Exception as exc:  # the registry is advice: without it, the 503 stands
            log.warning("relay cannot ask the replica registry", extra={"error": str(exc)[:200]})
            return
        if not base:
            return
        if target.port == OUTPUTS_STREAM:
            location = f"{base.rstrip('/')}/_outputs/{target.lease_id}"
        else:
            location = (
                f"{base.rstrip('/')}/_lease/{target.lease_id}/{target.port}"
                f"{target.path.decode('latin-1')}"
            )
        await self._error(
            307,
            f"this lease is served by another replica's relay: {location}",
            target.lease_id,
            location=location,
        )

    async def _exchange(self, request: h11.Request) -> None:
        started = time.monotonic()
        target, route = await self._route(request)
        upstream = await self._upstream(target, route)
        headers = [
            (name, value)
            for name, value in request.headers
            if name not in _HOP_BY_HOP
            and name not in _FORWARDED
            and not (name == b"authorization" and not route.public)
        ]
        headers += [
            (b"x-forwarded-for", self.peer.encode()),
            (b"x-forwarded-proto", self.relay.settings.scheme.encode()),
        ]
        out = h11.Request(
            method=request.method,
            target=target.path,
            headers=headers,
            http_version=request.http_version,
        )
        head = upstream.conn.send(out) or b""
        sent = _Counter()
        received = _Counter()
        # A request without a body (most GETs) is already complete in the buffer: send
        # head and end as one frame, with no task to pump a body that does not exist.
        first = self.conn.next_event()
        if isinstance(first, h11.EndOfMessage):
            await upstream.stream.write(head + (upstream.conn.send(first) or b""))
            pump_up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            pump_up.set_result(None)
        else:
            await upstream.stream.write(head)
            pump_up = asyncio.ensure_future(self._pump_request(upstream, sent, first))
        try:
            status = await self._pump_response(upstream, received, started, target.lease_id)
        finally:
            if not pump_up.done():
                pump_up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump_up
            self.relay.metrics.carried(target.lease_id, sent.n, received.n)
        if status == 101:
            await self._pipe(upstream, target.lease_id)
            raise _Closing

    async def _pump_request(
        self, upstream: _Upstream, sent: _Counter, first: object = h11.NEED_DATA
    ) -> None:
        while True:
            event = first if first is not h11.NEED_DATA else await self._receive()
            first = h11.NEED_DATA
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Data):
                sent.n += len(event.data)
                await upstream.stream.write(upstream.conn.send(event) or b"")
            elif isinstance(event, h11.EndOfMessage):
                await upstream.stream.write(upstream.conn.send(event) or b"")
                return
            else:
                return  # the buyer went away mid-body: the response side sees it

    async def _pump_response(
        self, upstream: _Upstream, received: _Counter, started: float, lease_id: str
    ) -> int:
        """Events parsed from one tunnel frame go out as one write and one drain; before
        waiting for the next frame everything parsed so far is flushed, so a streamed
        response reaches the buyer frame by frame as the service wrote it."""
        status = 0
        client = upstream.conn
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                await self._flush()
                data = await upstream.stream.read()
                self.activity.touch()
                try:
                    client.receive_data(data)
                except h11.RemoteProtocolError:
                    await self._bad_gateway(status, lease_id)
                continue
            if event is h11.PAUSED:
                await self._flush()
                return status
            if isinstance(event, h11.ConnectionClosed):
                await self._bad_gateway(status, lease_id)
            if isinstance(event, h11.InformationalResponse | h11.Response):
                if event.status_code == 101 or isinstance(event, h11.Response):
                    status = event.status_code
                    self.relay.metrics.request(lease_id, status, time.monotonic() - started)
                self._queue(
                    type(event)(
                        status_code=event.status_code,
                        headers=[(k, v) for k, v in event.headers if k not in _HOP_BY_HOP],
                        reason=event.reason,
                    )
                )
                if event.status_code == 101:
                    await self._flush()
                    return 101
            elif isinstance(event, h11.Data):
                received.n += len(event.data)
                self._queue(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._queue(h11.EndOfMessage(headers=event.headers))
                await self._flush()
                if client.our_state is h11.DONE and client.their_state is h11.DONE:
                    client.start_next_cycle()
                return status

    async def _bad_gateway(self, status: int, lease_id: str) -> None:
        if status:  # the head went out: all the buyer can learn is a cut connection
            self.writer.transport.abort()
            raise _Closing
        await self._error(502, "the service closed the connection without answering", lease_id)

    async def _pipe(self, upstream: _Upstream, lease_id: str) -> None:
        """After a 101: bytes both ways until each side has closed its half."""
        buyer_rest, _ = self.conn.trailing_data
        service_rest, _ = upstream.conn.trailing_data
        counts = [0, 0]

        async def up() -> None:
            if buyer_rest:
                await upstream.stream.write(buyer_rest)
            while data := await self.reader.read(READ_BYTES):
                self.activity.touch()
                counts[0] += len(data)
                await upstream.stream.write(data)
            await upstream.stream.write_eof()

        async def down() -> None:
            if service_rest:
                self.writer.write(service_rest)
            while data := await upstream.stream.read():
                self.activity.touch()
                counts[1] += len(data)
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()

        await _both(up(), down())
        self.relay.metrics.carried(lease_id, counts[0], counts[1])


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _authorized(request: h11.Request, route: Route) -> bool:
    token = bearer(dict(request.headers).get(b"authorization"))
    return token_matches(token, route.token_sha256)


async def _both(a: Awaitable[None], b: Awaitable[None]) -> None:
    """Run both; when one fails, the other is cancelled (a cut connection ends the pipe)."""
    tasks = [asyncio.ensure_future(a), asyncio.ensure_future(b)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class HttpRelay:
    """The buyer-facing listener's handler: one ``BuyerConnection`` per TCP connection."""

    def __init__(
        self,
        hub: TunnelHub,
        routes: RouteCache,
        settings: HttpSettings,
        metrics: RelayMetrics,
        *,
        tunnel_opened: Callable[[], None] | None = None,
    ) -> None:
        self.hub = hub
        self.routes = routes
        self.settings = settings
        self.metrics = metrics
        # Several replicas (scheduler/replicas.py): the relay URL of the replica holding
        # a node's tunnel, "" for none; None on a single scheduler.
        self.elsewhere: Callable[[str], Awaitable[str]] | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Keepalives: a NAT between buyer and relay keeps an idle stream's mapping,
            # and a vanished buyer is noticed without waiting for the idle timeout.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await BuyerConnection(self, reader, writer).run()
