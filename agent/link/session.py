"""``CoordinatorLink``: one Connect stream at a time, reconnected forever.

A session: the coordinator sends a nonce (HelloChallenge), the agent answers with
a Hello signed over it, the coordinator replies Welcome (or a fatal
ProtocolError). Then heartbeats flow up every ``heartbeat_interval_ms`` and
coordinator messages are dispatched on the envelope's ``oneof`` to the handlers
other parts registered with ``on()``. gRPC never resumes a stream, so nothing
is queued while disconnected: the next Hello carries the current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from gpuagent import PROTOCOL_VERSION, __version__
from gpuagent.aio import TaskSet
from gpuagent.signing import hello_signing_bytes
from gpuagent.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

from ..config import CoordinatorConfig
from ..identity import NodeIdentity
from .backoff import Backoff
from .channel import ChannelConfigError, make_channel
from .reporter import NodeReporter
from .targets import Target, TargetCycle

log = logging.getLogger(__name__)

# A handler gets the message inside the envelope (e.g. a LeaseAssign).
Handler = Callable[[Any], Awaitable[None]]
ParamsListener = Callable[["LinkParams"], None]


class LinkObserver(Protocol):
    """What the link tells metrics (``AgentMetrics`` implements it)."""

    def set_connected(self, connected: bool) -> None: ...
    def reconnected(self) -> None: ...
    def heartbeat_sent(self, at: float | None = None) -> None: ...
    def heartbeat_failed(self) -> None: ...


SessionListener = Callable[[coordinator_pb2.Welcome], Awaitable[None]]


class ChannelFactory(Protocol):
    """``make_channel``'s shape: ``authority`` is the name when the address is its IP."""

    def __call__(
        self, config: CoordinatorConfig, authority: str | None = None
    ) -> grpc.aio.Channel: ...


# Messages the session itself consumes; nobody else may register for them.
_SESSION_KINDS = frozenset({"hello_challenge", "welcome", "params_update", "error"})
_COORDINATOR_KINDS = frozenset(
    f.name for f in coordinator_pb2.CoordinatorMessage.DESCRIPTOR.oneofs_by_name["body"].fields
)
Error = common_pb2.ProtocolError


@dataclass(frozen=True)
class LinkParams:
    """Coordinator-set parameters in effect (seconds)."""

    heartbeat_interval: float = 10.0
    metering_interval: float = 60.0
    usage_batch_max: int = 0  # 0: the agent's metering.batch_size


# What a coordinator may set (PROTOCOL.md "NodeParams"): a value outside is clamped
# to the nearest bound and logged. A coordinator is untrusted input too: a 1 ms
# heartbeat would spin every agent of the network, a day-long one would mark them
# all offline.
HEARTBEAT_INTERVAL_RANGE = (0.1, 300.0)
METERING_INTERVAL_RANGE = (1.0, 3600.0)
USAGE_BATCH_MAX_RANGE = (1, 10_000)


def _clamped(name: str, value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    if low <= value <= high:
        return value
    bounded = min(max(value, low), high)
    log.warning(
        "coordinator parameter out of range; clamped",
        extra={"param": name, "sent": value, "applied": bounded, "min": low, "max": high},
    )
    return bounded


def _merge_params(current: LinkParams, update: common_pb2.NodeParams) -> LinkParams:
    # Zero means "unchanged" so a coordinator can send only what it changes.
    changes: dict[str, float | int] = {}
    if update.heartbeat_interval_ms:
        changes["heartbeat_interval"] = _clamped(
            "heartbeat_interval", update.heartbeat_interval_ms / 1000, HEARTBEAT_INTERVAL_RANGE
        )
    if update.metering_interval_ms:
        changes["metering_interval"] = _clamped(
            "metering_interval", update.metering_interval_ms / 1000, METERING_INTERVAL_RANGE
        )
    if update.usage_batch_max:
        changes["usage_batch_max"] = int(
            _clamped("usage_batch_max", update.usage_batch_max, USAGE_BATCH_MAX_RANGE)
        )
    return replace(current, **changes)  # type: ignore[arg-type]


class LinkRejected(Exception):
    """The coordinator refused this agent (fatal ProtocolError); the message says why."""


class NotConnected(Exception):
    """No session is open; callers retry later (nothing is queued)."""


class _SessionEnded(Exception):
    pass


class CoordinatorLink:
    def __init__(
        self,
        config: CoordinatorConfig,
        identity: NodeIdentity,
        reporter: NodeReporter,
        *,
        node_name: str = "",
        region: str = "",
        labels: Mapping[str, str] | None = None,
        backoff: Backoff | None = None,
        channel_factory: ChannelFactory = make_channel,
        monotonic: Callable[[], float] = time.monotonic,
        protocol_version: str = PROTOCOL_VERSION,
        agent_version: str = __version__,
        observer: LinkObserver | None = None,
        params: LinkParams | None = None,
    ) -> None:
        self.observer = observer
        self.config = config
        self.identity = identity
        self.reporter = reporter
        self.node_name = node_name
        self.region = region
        self.labels = dict(labels or {})
        self.backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self.protocol_version = protocol_version
        self.agent_version = agent_version
        # The agent's own values until a Welcome or ParamsUpdate changes them.
        self.params = params or LinkParams()
        self.session_id: str | None = None
        self.sessions_opened = 0
        self.last_error: str | None = None
        self._channel_factory = channel_factory
        # Which replica (configured address, DNS record) each attempt dials (targets.py).
        self._targets = TargetCycle(identity.node_id, timeout=config.call_timeout)
        self.target = Target(config.targets[0], config.targets[0])
        self._monotonic = monotonic
        self._started = monotonic()
        self._handlers: dict[str, Handler] = {}
        self._params_listeners: list[ParamsListener] = []
        self._session_listeners: list[SessionListener] = []
        self._listener_tasks = TaskSet()
        self.welcome: coordinator_pb2.Welcome | None = None
        self._call: grpc.aio.StreamStreamCall[Any, Any] | None = None
        # The open session's channel, for calls beside the stream (the bandwidth probe).
        self.channel: grpc.aio.Channel | None = None
        self._write_lock = asyncio.Lock()
        self._params_changed = asyncio.Event()
        self._connected = asyncio.Event()

    # -- for the rest of the agent ------------------------------------------------

    def on(self, kind: str, handler: Handler) -> None:
        """Route CoordinatorMessage field ``kind`` (e.g. "lease_assign") to ``handler``.

        Handlers run one at a time in arrival order (the protocol's ordering rule);
        one that needs long work starts a task. An exception is logged and answered
        with a ProtocolError(INTERNAL); it never ends the session.
        """
        if kind not in _COORDINATOR_KINDS:
            raise ValueError(f"{kind!r} is not a CoordinatorMessage field")
        if kind in _SESSION_KINDS:
            raise ValueError(f"{kind!r} is handled by the session itself")
        self._handlers[kind] = handler

    def on_params(self, listener: ParamsListener) -> None:
        """Called with the new LinkParams after Welcome and each ParamsUpdate."""
        self._params_listeners.append(listener)

    def on_session(self, listener: SessionListener) -> None:
        """Called (as a task) with the Welcome of every new session.

        This is where state kept across outages is re-sent: unacked lease updates
        and usage records. Heartbeats are never queued; Hello carries the state.
        """
        self._session_listeners.append(listener)

    async def _run_session_listener(
        self, listener: SessionListener, welcome: coordinator_pb2.Welcome
    ) -> None:
        try:
            await listener(welcome)
        except NotConnected:
            pass  # the session ended meanwhile; the next Welcome tries again
        except Exception:
            log.exception("session listener failed")

    @property
    def address(self) -> str:
        """The configured coordinator address of the current (or last) attempt."""
        return self.target.configured

    @property
    def dialed(self) -> str:
        """What that attempt connected to: one IP of ``address`` when it is a DNS name."""
        return self.target.dial

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def send(self, message: coordinator_pb2.AgentMessage) -> None:
        """Write one message on the open session; raises NotConnected if there is none."""
        call = self._call
        if call is None:
            raise NotConnected("no coordinator session")
        async with self._write_lock:
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
                raise NotConnected(f"session closed while sending: {exc}") from None

    # -- the reconnect loop --------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session open until ``stop`` is set; never raises for link trouble."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except LinkRejected as exc:
                self._record_error(str(exc), logging.ERROR)
            except grpc.aio.AioRpcError as exc:
                self._record_error(
                    f"coordinator {self.target}: {exc.code().name}: {exc.details()}",
                    logging.WARNING,
                )
            except (_SessionEnded, ChannelConfigError) as exc:
                self._record_error(str(exc), logging.WARNING)
            except TimeoutError:
                self._record_error(
                    f"coordinator {self.target}: no answer within "
                    f"{self.config.call_timeout}s during the handshake",
                    logging.WARNING,
                )
            except Exception as exc:  # a bug here must not take the daemon down
                log.exception("coordinator session failed")
                self.last_error = repr(exc)
            if stop.is_set():
                break
            # Several replicas: whatever ended this session (a dead replica, one cut off
            # from its database, a refused handshake), the next attempt goes to the next.
            self._targets.advance()
            delay = self.backoff.next_delay()
            log.info("reconnecting to coordinator", extra={"delay_s": round(delay, 3)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _record_error(self, message: str, level: int) -> None:
        self.last_error = message
        log.log(level, "coordinator link down: %s", message)

    async def _read(
        self, call: grpc.aio.StreamStreamCall[Any, Any], within: float | None
    ) -> coordinator_pb2.CoordinatorMessage:
        message = await asyncio.wait_for(call.read(), within)
        if message is grpc.aio.EOF:
            raise _SessionEnded("coordinator closed the stream")
        assert isinstance(message, coordinator_pb2.CoordinatorMessage)
        return message

    async def _session(self, stop: asyncio.Event) -> None:
        self.target = target = await self._targets.pick(self.config.targets)
        config = self.config
        if isinstance(config.address, tuple) or target.expanded:  # one address per attempt
            config = config.model_copy(update={"address": target.dial})
        channel = self._channel_factory(config, target.authority)
        try:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            call = stub.Connect(wait_for_ready=False)
            try:
                await self._handshake(call)
                self._call = call
                self.channel = channel
                self._connected.set()
                if self.observer is not None:
                    self.observer.set_connected(True)
                    if self.sessions_opened > 1:
                        self.observer.reconnected()
                if self.welcome is not None:
                    for listener in self._session_listeners:
                        self._listener_tasks.spawn(
                            self._run_session_listener(listener, self.welcome)
                        )
                await self._serve(call, stop)
            finally:
                self._call = None
                self.channel = None
                self._connected.clear()
                if self.observer is not None:
                    self.observer.set_connected(False)
                self.session_id = None
                call.cancel()
        finally:
            await channel.close(grace=None)

    async def _handshake(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        timeout = self.config.call_timeout
        first = await self._read(call, timeout)
        if first.WhichOneof("body") == "error":
            raise LinkRejected(_describe(first.error))
        if first.WhichOneof("body") != "hello_challenge":
            raise _SessionEnded(
                f"coordinator sent {first.WhichOneof('body')} before hello_challenge"
            )
        challenge = first.hello_challenge
        theirs = challenge.protocol_version.partition(".")[0]
        if theirs != self.protocol_version.partition(".")[0]:
            log.error(
                "coordinator speaks another protocol major version; it will refuse us",
                extra={"coordinator": challenge.protocol_version, "agent": self.protocol_version},
            )
        await call.write(coordinator_pb2.AgentMessage(hello=await self._hello(challenge.nonce)))
        reply = await self._read(call, timeout)
        kind = reply.WhichOneof("body")
        if kind == "error":
            raise LinkRejected(_describe(reply.error))
        if kind != "welcome":
            raise _SessionEnded(f"coordinator sent {kind} instead of welcome")
        welcome = reply.welcome
        self.welcome = welcome
        self.session_id = welcome.session_id
        self.sessions_opened += 1
        self.last_error = None
        # A welcomed session is a healthy one: the next outage starts at 1 s again.
        self.backoff.reset()
        log.info(
            "connected to coordinator",
            extra={
                "session_id": welcome.session_id,
                "node_id": self.identity.node_id,
                "coordinator": self.address,
                "dialed": self.dialed,
                "coordinator_version": challenge.coordinator_version,
                "heartbeat_interval_ms": welcome.params.heartbeat_interval_ms,
            },
        )
        self._apply_params(welcome.params, initial=True)

    async def _hello(self, nonce: bytes) -> coordinator_pb2.Hello:
        state = await self.reporter.hello_state()
        node_id = self.identity.node_id
        public_key = self.identity.public_key_bytes
        signature = self.identity.sign(
            hello_signing_bytes(nonce, node_id, public_key, self.protocol_version)
        )
        return coordinator_pb2.Hello(
            node_id=node_id,
            public_key=public_key,
            signature=signature,
            protocol_version=self.protocol_version,
            agent_version=self.agent_version,
            node_name=self.node_name,
            region=self.region,
            labels=self.labels,
            inventory=state.inventory,
            gpu_health=state.gpu_health,
            leases=state.leases,
            last_acked_usage_seq=state.last_acked_usage_seq,
            uptime_seconds=int(self._monotonic() - self._started),
            draining=state.draining,
            enrollment_token=self.config.enrollment(),
            offer=state.offer,
        )

    def _apply_params(self, update: common_pb2.NodeParams, *, initial: bool) -> None:
        old = self.params
        new = _merge_params(old, update)
        for name in LinkParams.__dataclass_fields__:
            before, after = getattr(old, name), getattr(new, name)
            if before != after:
                log.info(
                    "coordinator parameter %s",
                    "set" if initial else "changed",
                    extra={"param": name, "old": before, "new": after},
                )
        self.params = new
        self._params_changed.set()
        for listener in self._params_listeners:
            try:
                listener(new)
            except Exception:
                log.exception("params listener failed")

    async def _serve(self, call: grpc.aio.StreamStreamCall[Any, Any], stop: asyncio.Event) -> None:
        tasks = {
            asyncio.create_task(self._reader(call), name="link-reader"),
            asyncio.create_task(self._heartbeats(), name="link-heartbeat"),
            asyncio.create_task(stop.wait(), name="link-stop"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.done_writing()

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            self._params_changed.clear()
            with contextlib.suppress(TimeoutError):
                # A new interval applies at once rather than after the old one runs out.
                await asyncio.wait_for(self._params_changed.wait(), self.params.heartbeat_interval)
                continue
            state = await self.reporter.heartbeat_state()
            seq += 1
            heartbeat = coordinator_pb2.Heartbeat(
                seq=seq,
                uptime_seconds=int(self._monotonic() - self._started),
                sent_at_unix_nanos=time.time_ns(),
                gpu_health=state.gpu_health,
                free_gpu_uuids=state.free_gpu_uuids,
                allocated_gpu_uuids=state.allocated_gpu_uuids,
                leases=state.leases,
                draining=state.draining,
                usage_pending=state.usage_pending,
            )
            try:
                await self.send(coordinator_pb2.AgentMessage(heartbeat=heartbeat))
            except NotConnected as exc:
                if self.observer is not None:
                    self.observer.heartbeat_failed()
                raise _SessionEnded(str(exc)) from None
            if self.observer is not None:
                self.observer.heartbeat_sent()

    async def _reader(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        while True:
            message = await self._read(call, None)
            await self._dispatch(message)

    async def _reply_error(self, code: int, text: str, in_reply_to: str) -> None:
        error = Error(code=code, message=text, in_reply_to=in_reply_to)  # type: ignore[arg-type]
        with contextlib.suppress(NotConnected):
            await self.send(coordinator_pb2.AgentMessage(error=error))

    async def _dispatch(self, message: coordinator_pb2.CoordinatorMessage) -> None:
        kind = message.WhichOneof("body")
        if kind is None:
            log.warning("coordinator sent an empty message")
            await self._reply_error(Error.MALFORMED, "empty CoordinatorMessage", "")
            return
        if kind == "params_update":
            self._apply_params(message.params_update.params, initial=False)
            return
        if kind == "error":
            err = message.error
            if err.fatal:
                raise LinkRejected(_describe(err))
            log.warning(
                "coordinator reported a protocol error",
                extra={
                    "code": Error.Code.Name(err.code),
                    "detail": err.message,
                    "in_reply_to": err.in_reply_to,
                },
            )
            return
        if kind in ("hello_challenge", "welcome"):
            log.warning("coordinator sent %s mid-session; ignored", kind)
            await self._reply_error(
                Error.OUT_OF_ORDER, f"{kind} is only valid at session start", kind
            )
            return
        handler = self._handlers.get(kind)
        if handler is None:
            log.warning("no handler for coordinator message %s; refused", kind)
            await self._reply_error(Error.REJECTED, f"this agent does not handle {kind}", kind)
            return
        try:
            await handler(getattr(message, kind))
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("handler for %s failed", kind, extra={"ref": ref})
            await self._reply_error(
                Error.INTERNAL, f"agent failed handling {kind} (ref {ref})", kind
            )


def _describe(error: common_pb2.ProtocolError) -> str:
    return f"coordinator refused: {Error.Code.Name(error.code)}: {error.message}"
