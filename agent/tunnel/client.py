"""The agent dials out to the relay and carries buyers' connections to its leases.

One ``Control`` stream per relay session (signed with the node key); for each
``OpenStream`` the agent asks ``service_target(lease_id, port)`` and either opens a
``Carry`` stream to that container port or refuses. The relay can name only a lease
and a port, never an address: a request for another node's lease, an undeclared
port or anything else is refused here and logged. Reconnects follow the link's
backoff; the relay to use comes with every Welcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from gpuagent import __version__
from gpuagent.aio import run_together
from gpuagent.outputs import OUTPUTS_STREAM
from gpuagent.signing import tunnel_hello_signing_bytes
from gpuagent.v1 import coordinator_pb2, relay_pb2, relay_pb2_grpc

from ..config import CoordinatorConfig
from ..identity import NodeIdentity
from ..leases.endpoints import ServiceTarget, ServiceTargets
from ..leases.output_store import NotRetained, RetainedOutput
from ..link.backoff import Backoff
from ..link.channel import make_channel
from . import outputs_http

log = logging.getLogger(__name__)

# Frames carry what one read returned, up to this: big enough that a bulk transfer
# costs few gRPC messages, far under the channel's 4 MiB message bound.
FRAME_BYTES = 1024 * 1024
CONNECT_TIMEOUT = 5.0
# After the last response of an outputs download, how long the agent waits for the
# relay to end the stream before cancelling it (a cancel can overtake the last frames).
OUTPUTS_LINGER = 30.0
Refused = relay_pb2.StreamRefused


class _SessionEnded(Exception):
    pass


class TunnelClient:
    def __init__(
        self,
        coordinator: CoordinatorConfig,
        identity: NodeIdentity,
        targets: ServiceTargets,
        *,
        backoff: Backoff | None = None,
        outputs: Callable[[str], RetainedOutput] | None = None,
    ) -> None:
        self.coordinator = coordinator
        # A lease's retained output archive, or NotRetained (agent/leases/output_store.py).
        self.outputs = outputs
        self.identity = identity
        self.targets = targets
        self.backoff = backoff or Backoff(coordinator.reconnect_initial, coordinator.reconnect_max)
        self.relay: coordinator_pb2.RelayParams | None = None
        self._relay_changed = asyncio.Event()
        self.connected = asyncio.Event()  # set while a tunnel session is open
        self.refusals = 0  # OpenStreams refused since start (tests and `gpu-agent status`)
        self._carries: set[asyncio.Task[None]] = set()

    async def on_welcome(self, welcome: coordinator_pb2.Welcome) -> None:
        """Each Welcome names the relay (or none); a change restarts the tunnel."""
        relay = welcome.relay if welcome.HasField("relay") and welcome.relay.enabled else None
        if relay != self.relay:
            self.relay = relay
            self._relay_changed.set()

    def _channel_config(self, relay: coordinator_pb2.RelayParams) -> CoordinatorConfig:
        if not relay.address:
            return self.coordinator  # the relay inside the coordinator: same address, same TLS
        return self.coordinator.model_copy(
            update={"address": relay.address, "server_name": relay.server_name or None}
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            relay = self.relay
            if relay is None:
                await _first(stop.wait(), self._relay_changed.wait())
                self._relay_changed.clear()
                continue
            self._relay_changed.clear()
            config = self._channel_config(relay)
            channel = make_channel(config)
            try:
                session = asyncio.ensure_future(self._session(channel))
                await _first(session, stop.wait(), self._relay_changed.wait())
                if not session.done():
                    session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session  # re-raises what ended it
            except Exception as exc:
                log.warning(
                    "relay tunnel down",
                    extra={"relay": config.address, "error": _describe(exc)},
                )
            finally:
                self.connected.clear()
                for task in list(self._carries):
                    task.cancel()
                await channel.close(grace=None)
            if not stop.is_set() and not self._relay_changed.is_set():
                delay = self.backoff.next_delay()
                await _first(stop.wait(), asyncio.sleep(delay), self._relay_changed.wait())

    async def _session(self, channel: grpc.aio.Channel) -> None:
        stub = relay_pb2_grpc.TunnelStub(channel)
        call: grpc.aio.StreamStreamCall[Any, Any] = stub.Control()
        first = await _read_down(call)
        if first is None or first.WhichOneof("body") != "challenge":
            raise _SessionEnded("relay did not send a challenge")
        node_id, key = self.identity.node_id, self.identity.public_key_bytes
        signature = self.identity.sign(
            tunnel_hello_signing_bytes(bytes(first.challenge.nonce), node_id, key)
        )
        await call.write(
            relay_pb2.TunnelUp(
                hello=relay_pb2.TunnelHello(
                    node_id=node_id, public_key=key, signature=signature, agent_version=__version__
                )
            )
        )
        reply = await _read_down(call)
        if reply is None or reply.WhichOneof("body") != "welcome":
            why = reply.error.message if reply is not None else "stream closed"
            raise _SessionEnded(f"relay refused the tunnel: {why}")
        welcome = reply.welcome
        self.backoff.reset()
        self.connected.set()
        log.info("relay tunnel open", extra={"session_id": welcome.session_id})
        write_lock = asyncio.Lock()

        async def send(message: relay_pb2.TunnelUp) -> None:
            async with write_lock:  # grpc allows one write in flight per call
                await call.write(message)

        # The relay pings every ping_interval: three missed mean a dead path (a NAT that
        # dropped the flow silently) even where TCP and HTTP/2 keepalive have not noticed.
        silence = max(3 * welcome.ping_interval_ms / 1000, 1.0)
        while True:
            try:
                message = await asyncio.wait_for(_read_down(call), silence)
            except TimeoutError:
                raise _SessionEnded(f"relay silent for {silence:.0f}s") from None
            if message is None:
                raise _SessionEnded("relay closed the tunnel")
            kind = message.WhichOneof("body")
            if kind == "open":
                task = asyncio.create_task(self._carry(stub, welcome, message.open, send))
                self._carries.add(task)
                task.add_done_callback(self._carries.discard)
            elif kind == "ping":
                await send(relay_pb2.TunnelUp(pong=message.ping))
            elif kind == "error":
                raise _SessionEnded(f"relay error: {message.error.message[:200]}")

    async def _target(self, lease_id: str, port: str) -> ServiceTarget | None:
        return self.targets.service_target(lease_id, port)

    async def _carry(
        self,
        stub: relay_pb2_grpc.TunnelStub,
        welcome: relay_pb2.TunnelWelcome,
        request: relay_pb2.OpenStream,
        send: _Send,
    ) -> None:
        lease_id, port = request.lease_id[:128], request.port[:64]

        async def refuse(reason: Refused.Reason.ValueType, message: str) -> None:
            self.refusals += 1
            log.warning(
                "tunnel request refused",
                extra={"lease_id": lease_id, "port": port, "why": message},
            )
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await send(
                    relay_pb2.TunnelUp(
                        refused=relay_pb2.StreamRefused(
                            stream_id=request.stream_id, reason=reason, message=message
                        )
                    )
                )

        if port == OUTPUTS_STREAM:
            await self._carry_outputs(stub, welcome, request, refuse)
            return
        target = await self._target(lease_id, port)
        if target is None:
            await refuse(
                Refused.NOT_FOUND, f"no running lease {lease_id!r} here declares port {port!r}"
            )
            return
        if not target.ready:
            await refuse(Refused.NOT_READY, f"lease {lease_id} port {port} is not ready")
            return
        try:
            reader, writer = await asyncio.wait_for(
                # A read buffer of two frames: a bulk response moves in 1 MiB frames
                # (few gRPC messages), while a small write still goes out at once.
                asyncio.open_connection(target.host, target.port, limit=2 * FRAME_BYTES),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            await refuse(Refused.UNREACHABLE, f"container port {target.port}: {exc}")
            return
        call: grpc.aio.StreamStreamCall[Any, Any] = stub.Carry()  # type: ignore[call-arg,assignment]
        try:
            await call.write(
                relay_pb2.Frame(
                    attach=relay_pb2.StreamAttach(
                        session_id=welcome.session_id,
                        stream_id=request.stream_id,
                        stream_secret=welcome.stream_secret,
                    )
                )
            )
            await _pump(reader, writer, call)
        except (grpc.aio.AioRpcError, ConnectionError, asyncio.InvalidStateError):
            pass  # either side went away: the relay tells the buyer
        finally:
            call.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _carry_outputs(
        self,
        stub: relay_pb2_grpc.TunnelStub,
        welcome: relay_pb2.TunnelWelcome,
        request: relay_pb2.OpenStream,
        refuse: Callable[[Refused.Reason.ValueType, str], Awaitable[None]],
    ) -> None:
        """The relay asks for a lease's output archive: served from this agent's own
        store (never a container), so only outputs this node signed can be read."""
        lease_id = request.lease_id[:128]
        if self.outputs is None:
            await refuse(Refused.NOT_FOUND, "this agent keeps no outputs")
            return
        try:
            output = await asyncio.to_thread(self.outputs, lease_id)
        except NotRetained as exc:
            await refuse(Refused.NOT_FOUND, str(exc))
            return
        except ValueError as exc:  # not a lease id at all
            await refuse(Refused.NOT_FOUND, f"outputs of {lease_id!r}: {exc}")
            return
        call: grpc.aio.StreamStreamCall[Any, Any] = stub.Carry()  # type: ignore[call-arg,assignment]

        async def read() -> bytes:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    return b""
                assert isinstance(frame, relay_pb2.Frame)
                if frame.data:
                    return bytes(frame.data)
                if frame.eof:
                    return b""

        async def write(data: bytes) -> None:
            if data:
                await call.write(relay_pb2.Frame(data=data))

        log.info("serving outputs", extra={"lease_id": lease_id, "bytes": output.size})
        try:
            await call.write(
                relay_pb2.Frame(
                    attach=relay_pb2.StreamAttach(
                        session_id=welcome.session_id,
                        stream_id=request.stream_id,
                        stream_secret=welcome.stream_secret,
                    )
                )
            )
            await outputs_http.serve(outputs_http.ByteStream(read, write), output)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                await call.done_writing()
                # Cancelling now would reset the stream, and the relay may not have
                # read the last response yet (a 416 or 404 then reached the buyer as a
                # cut connection): let the relay end the stream once it has it all.
                await asyncio.wait_for(_until_end(call), OUTPUTS_LINGER)
        except (grpc.aio.AioRpcError, ConnectionError, asyncio.InvalidStateError):
            pass  # the buyer or the relay went away; the CLI resumes
        except Exception as exc:  # h11 protocol errors and the like: this download only
            log.warning("outputs download failed", extra={"lease_id": lease_id, "error": str(exc)})
        finally:
            call.cancel()


class _Send(Protocol):
    async def __call__(self, message: relay_pb2.TunnelUp) -> None: ...


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    call: grpc.aio.StreamStreamCall[Any, Any],
) -> None:
    async def up() -> None:
        while data := await reader.read(FRAME_BYTES):
            await call.write(relay_pb2.Frame(data=data))
        await call.done_writing()
        await asyncio.Event().wait()  # half-closed: the relay ends the stream

    async def down() -> None:
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                return
            assert isinstance(frame, relay_pb2.Frame)
            if frame.data:
                writer.write(frame.data)
                await writer.drain()
            if frame.eof and writer.can_write_eof():
                writer.write_eof()

    await run_together(up(), down())


async def _until_end(call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
    """Read (and drop) until the relay ends the stream."""
    while await call.read() is not grpc.aio.EOF:
        pass


async def _read_down(call: grpc.aio.StreamStreamCall[Any, Any]) -> relay_pb2.TunnelDown | None:
    message = await call.read()
    if message is grpc.aio.EOF:
        return None
    assert isinstance(message, relay_pb2.TunnelDown)
    return message


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the others it created."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task, given in zip(tasks, aws, strict=True):
            if task is not given and not task.done():
                task.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
