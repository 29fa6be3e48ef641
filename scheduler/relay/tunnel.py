"""The relay's end of the agents' tunnels (the ``Tunnel`` gRPC service).

An agent opens ``Control``; the relay sends a fresh nonce, the agent signs it with
its node key (``tunnel_hello_signing_bytes``), and from then on the relay asks it for
buyer connections with ``OpenStream``. The agent answers each with its own ``Carry``
stream (first frame: the session's stream secret and the stream id) or a
``StreamRefused``. Each buyer connection is thus one HTTP/2 stream on the agent's
channel, with HTTP/2's per-stream flow control; the relay never buffers more than
the frame in hand.

A node's traffic goes only to the tunnel whose key derives that node's id, and the
relay sends a lease's connections only to the node the coordinator placed it on, so
no agent can receive another's buyers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpuagent import __version__, bounds
from gpuagent.signing import node_id_from_public_key, tunnel_hello_signing_bytes, verify_ed25519
from gpuagent.v1 import common_pb2, relay_pb2, relay_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# Frames carry what one read returned, up to this: big enough that a bulk transfer
# costs few gRPC messages, far under the channel's 4 MiB message bound.
FRAME_BYTES = 1024 * 1024
Refused = relay_pb2.StreamRefused


class TunnelError(Exception):
    """No carried stream for this connection; ``kind`` says why (maps to an HTTP status)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind  # no_tunnel | not_found | not_ready | unreachable | timeout
        super().__init__(message)


class CarriedStream:
    """One buyer connection's bytes over one Carry stream (the relay's side)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.done = asyncio.Event()
        self._eof = False

    async def read(self) -> bytes:
        """The next bytes from the container; b"" once the agent closed its side."""
        while not self._eof:
            try:
                frame = await self._context.read()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.RpcError):
                frame = grpc.aio.EOF
            if frame is grpc.aio.EOF:
                self._eof = True
                break
            if frame.data:
                return bytes(frame.data)
        return b""

    async def write(self, data: bytes) -> None:
        """Send to the container; waits while HTTP/2 flow control holds the stream."""
        view = memoryview(data)
        for start in range(0, len(view), FRAME_BYTES):
            await self._context.write(
                relay_pb2.Frame(data=bytes(view[start : start + FRAME_BYTES]))
            )

    async def write_eof(self) -> None:
        with contextlib.suppress(Exception):
            await self._context.write(relay_pb2.Frame(eof=True))

    def close(self) -> None:
        self.done.set()


@dataclass
class TunnelSession:
    node_id: str
    session_id: str
    secret: bytes
    outbox: asyncio.Queue[relay_pb2.TunnelDown] = field(default_factory=asyncio.Queue)
    pending: dict[int, asyncio.Future[CarriedStream]] = field(default_factory=dict)
    next_stream: int = 1
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class TunnelHub(relay_pb2_grpc.TunnelServicer):
    """Agents' tunnels by node id; ``open_stream`` gets a buyer connection carried."""

    def __init__(self, *, ping_interval: float = 20.0, open_timeout: float = 10.0) -> None:
        self.ping_interval = ping_interval
        self.open_timeout = open_timeout
        self.sessions: dict[str, TunnelSession] = {}
        # Called with the number of open tunnels whenever one comes or goes (metrics).
        self.on_change: Callable[[int], None] | None = None

    def connected(self, node_id: str) -> bool:
        return node_id in self.sessions

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self.sessions))

    async def open_stream(self, node_id: str, lease_id: str, port: str) -> CarriedStream:
        session = self.sessions.get(node_id)
        if session is None:
            raise TunnelError("no_tunnel", f"node {node_id} has no tunnel to this relay")
        stream_id = session.next_stream
        session.next_stream += 1
        future: asyncio.Future[CarriedStream] = asyncio.get_running_loop().create_future()
        session.pending[stream_id] = future
        session.outbox.put_nowait(
            relay_pb2.TunnelDown(
                open=relay_pb2.OpenStream(stream_id=stream_id, lease_id=lease_id, port=port)
            )
        )
        closed: asyncio.Future[Any] = asyncio.ensure_future(session.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {future, closed}, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            session.pending.pop(stream_id, None)
        if future in done:
            return future.result()  # raises the TunnelError a refusal set
        future.cancel()
        if session.closed.is_set():
            raise TunnelError("no_tunnel", f"node {node_id}'s tunnel closed")
        raise TunnelError("timeout", f"node {node_id} did not answer within {self.open_timeout}s")

    # -- Control --------------------------------------------------------------------------

    async def Control(
        self, request_iterator: AsyncIterator[relay_pb2.TunnelUp], context: Context
    ) -> AsyncIterator[relay_pb2.TunnelDown]:
        nonce = os.urandom(32)
        yield relay_pb2.TunnelDown(
            challenge=relay_pb2.TunnelChallenge(nonce=nonce, relay_version=__version__)
        )
        first = await anext(aiter(request_iterator), None)
        hello, problem = _check_hello(first, nonce)
        if hello is None:
            log.warning("tunnel refused", extra={"peer": context.peer(), "reason": problem})
            yield relay_pb2.TunnelDown(
                error=common_pb2.ProtocolError(
                    code=common_pb2.ProtocolError.BAD_SIGNATURE, message=problem, fatal=True
                )
            )
            return
        session = TunnelSession(hello.node_id, uuid.uuid4().hex, os.urandom(32))
        old = self.sessions.get(session.node_id)
        if old is not None:
            old.closed.set()  # the newer tunnel of the same node wins (a reconnect)
        self.sessions[session.node_id] = session
        self._notify()
        log.info(
            "tunnel open", extra={"node_id": session.node_id, "session_id": session.session_id}
        )
        reader = asyncio.create_task(self._read_control(request_iterator, session))
        try:
            yield relay_pb2.TunnelDown(
                welcome=relay_pb2.TunnelWelcome(
                    session_id=session.session_id,
                    stream_secret=session.secret,
                    ping_interval_ms=int(self.ping_interval * 1000),
                )
            )
            ping = 0
            while not session.closed.is_set():
                getter = asyncio.ensure_future(session.outbox.get())
                closed = asyncio.ensure_future(session.closed.wait())
                done, _ = await asyncio.wait(
                    {getter, closed},
                    timeout=self.ping_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                closed.cancel()
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                if not done:
                    ping += 1
                    yield relay_pb2.TunnelDown(ping=relay_pb2.TunnelPing(seq=ping))
        finally:
            session.closed.set()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for future in session.pending.values():
                if not future.done():
                    future.set_exception(TunnelError("no_tunnel", "tunnel closed"))
            if self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]
                self._notify()
            log.info(
                "tunnel closed",
                extra={"node_id": session.node_id, "session_id": session.session_id},
            )

    async def _read_control(
        self, request_iterator: AsyncIterator[relay_pb2.TunnelUp], session: TunnelSession
    ) -> None:
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("body")
                if kind == "refused":
                    refused = message.refused
                    future = session.pending.get(refused.stream_id)
                    if future is not None and not future.done():
                        future.set_exception(_refusal(refused))
                elif kind == "error":
                    log.warning(
                        "tunnel error from agent",
                        extra={"node_id": session.node_id, "error": message.error.message[:512]},
                    )
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            session.closed.set()

    # -- Carry ----------------------------------------------------------------------------

    async def Carry(  # type: ignore[override]
        self, request_iterator: AsyncIterator[relay_pb2.Frame], context: Context
    ) -> None:
        """A coroutine handler (context.read/write) rather than a generator: the buyer's
        side reads and writes this stream directly while the handler waits."""
        first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("attach"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first frame must attach")
            return
        attach = first.attach
        session = next(
            (s for s in self.sessions.values() if s.session_id == attach.session_id), None
        )
        if session is None or not hmac.compare_digest(bytes(attach.stream_secret), session.secret):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no such tunnel session")
            return
        future = session.pending.get(attach.stream_id)
        if future is None or future.done():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no open stream {attach.stream_id}")
            return
        stream = CarriedStream(context)
        future.set_result(stream)
        closed = asyncio.ensure_future(session.closed.wait())
        done = asyncio.ensure_future(stream.done.wait())
        try:
            await asyncio.wait({closed, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            done.cancel()


def _refusal(refused: relay_pb2.StreamRefused) -> TunnelError:
    kind = {
        Refused.NOT_FOUND: "not_found",
        Refused.NOT_READY: "not_ready",
        Refused.UNREACHABLE: "unreachable",
    }.get(refused.reason, "unreachable")
    return TunnelError(kind, refused.message[:512] or kind)


def _check_hello(
    message: relay_pb2.TunnelUp | None, nonce: bytes
) -> tuple[relay_pb2.TunnelHello | None, str]:
    if message is None or message.WhichOneof("body") != "hello":
        return None, "expected hello as the first message"
    hello = message.hello
    try:
        bounds.check(hello, "hello")
    except bounds.BoundsError as exc:
        return None, str(exc)
    try:
        derived = node_id_from_public_key(bytes(hello.public_key))
    except ValueError as exc:
        return None, str(exc)
    if derived != hello.node_id:
        return None, f"node_id {hello.node_id[:80]!r} does not derive from public_key"
    signed = tunnel_hello_signing_bytes(nonce, hello.node_id, bytes(hello.public_key))
    if not verify_ed25519(bytes(hello.public_key), bytes(hello.signature), signed):
        return None, "signature does not verify with public_key over this stream's nonce"
    return hello, ""
