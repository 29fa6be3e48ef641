"""``Coordinator.Connect``: the scheduler's end of each agent's stream.

Per stream: send a fresh nonce, verify the signed Hello (version, node id from
key, signature, bounds), register the session, send Welcome, then read until
the agent goes away or a newer session of the same node supersedes this one.
Anything malformed is answered with a ProtocolError and logged; no message an
agent can send ends anything but its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gpuagent import PROTOCOL_VERSION, __version__, bounds, leaserules
from gpuagent.direct_url import parse_direct_address
from gpuagent.signing import hello_signing_bytes, node_id_from_public_key, verify_ed25519
from gpuagent.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

from .auth import store as acl_store
from .auth.interceptor import Authenticator, Refusal
from .registry import NameTaken, NodeRecord, Registry, Session

log = logging.getLogger(__name__)

Error = common_pb2.ProtocolError
SessionHandler = Callable[[Session, Any], Awaitable[None]]
# Called after Welcome is sent (the agent is ready for pushes); must return quickly.
ConnectHook = Callable[[Session, NodeRecord], Awaitable[None]]
# Called with each ProtocolError an agent sends (after it is logged).
AgentErrorHook = Callable[[Session, common_pb2.ProtocolError], Awaitable[None]]
# Called after each Heartbeat is stored.
HeartbeatHook = Callable[[Session, coordinator_pb2.Heartbeat], Awaitable[None]]
_AGENT_KINDS = frozenset(
    f.name for f in coordinator_pb2.AgentMessage.DESCRIPTOR.oneofs_by_name["body"].fields
)


class Refused(Exception):
    """A Hello the coordinator will not accept; becomes a fatal ProtocolError."""

    def __init__(self, code: common_pb2.ProtocolError.Code.ValueType, message: str) -> None:
        self.code = code
        super().__init__(message)


def _major(version: str) -> int | None:
    head, dot, _ = version.partition(".")
    return int(head) if dot and head.isdigit() else None


def check_hello(
    message: coordinator_pb2.AgentMessage, nonce: bytes, protocol_version: str = PROTOCOL_VERSION
) -> coordinator_pb2.Hello:
    """The Hello in ``message`` if acceptable, else Refused saying what to fix."""
    kind = message.WhichOneof("body")
    if kind != "hello":
        raise Refused(Error.OUT_OF_ORDER, f"expected hello as the first message, got {kind}")
    hello = message.hello
    try:
        bounds.check(hello, "hello")
    except bounds.BoundsError as exc:
        raise Refused(Error.OVERSIZED, str(exc)) from None
    theirs, ours = _major(hello.protocol_version), _major(protocol_version)
    if theirs is None:
        raise Refused(
            Error.MALFORMED, f"protocol_version {hello.protocol_version!r} is not MAJOR.MINOR"
        )
    if theirs != ours:
        side = "the agent" if theirs < (ours or 0) else "the coordinator"
        wanted = max(theirs, ours or 0)
        raise Refused(
            Error.UNSUPPORTED_VERSION,
            f"agent speaks protocol {hello.protocol_version}, coordinator speaks "
            f"{protocol_version}: upgrade {side} to a release speaking protocol {wanted}.x",
        )
    try:
        expected = node_id_from_public_key(hello.public_key)
    except ValueError as exc:
        raise Refused(Error.MALFORMED, f"hello.public_key: {exc}") from None
    if hello.node_id != expected:
        raise Refused(
            Error.IDENTITY_MISMATCH,
            f"node_id {hello.node_id!r} does not derive from the public key (expected {expected})",
        )
    signed = hello_signing_bytes(nonce, hello.node_id, hello.public_key, hello.protocol_version)
    if not verify_ed25519(hello.public_key, hello.signature, signed):
        raise Refused(
            Error.BAD_SIGNATURE,
            "hello signature does not verify over this session's nonce with the given key",
        )
    return hello


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        registry: Registry,
        params: common_pb2.NodeParams,
        *,
        hello_timeout: float = 10.0,
        protocol_version: str = PROTOCOL_VERSION,
        authenticator: Authenticator | None = None,
        registration: str = "open",
    ) -> None:
        self.registry = registry
        # Where agents open their service tunnel (set by the server when a relay runs).
        self.relay = coordinator_pb2.RelayParams()
        # registration "token": a node joins only with an enrolment token of a provider
        # account, to which it is bound; "open": anyone's key joins (stake is the gate).
        self.authenticator = authenticator
        self.registration = registration
        self.params = params
        self.hello_timeout = hello_timeout
        self.protocol_version = protocol_version
        self._handlers: dict[str, SessionHandler] = {}
        self._connect_hooks: list[ConnectHook] = []
        self._error_hooks: list[AgentErrorHook] = []
        self._heartbeat_hooks: list[HeartbeatHook] = []

    def on(self, kind: str, handler: SessionHandler) -> None:
        """Route AgentMessage field ``kind`` (e.g. "usage_report") to ``handler``."""
        if kind not in _AGENT_KINDS or kind in ("hello", "heartbeat", "error"):
            raise ValueError(f"{kind!r} is not an AgentMessage field a handler may take")
        self._handlers[kind] = handler

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``hook(session, record)`` once per session, right after its Welcome."""
        self._connect_hooks.append(hook)

    def on_agent_error(self, hook: AgentErrorHook) -> None:
        """Run ``hook(session, error)`` for each ProtocolError the agent sends."""
        self._error_hooks.append(hook)

    def on_heartbeat(self, hook: HeartbeatHook) -> None:
        """Run ``hook(session, heartbeat)`` after each heartbeat is stored."""
        self._heartbeat_hooks.append(hook)

    async def _run_hooks(self, what: str, hooks: list[Any], *args: Any) -> None:
        for hook in hooks:
            try:
                await hook(*args)
            except Exception:
                # A failing hook is a coordinator bug; the agent's session goes on.
                log.exception("%s hook failed", what)

    async def update_params(self, params: common_pb2.NodeParams) -> None:
        """Change parameters for every node, now (ParamsUpdate) and in future Welcomes."""
        self.params.MergeFrom(params)
        update = coordinator_pb2.CoordinatorMessage(
            params_update=coordinator_pb2.ParamsUpdate(params=params)
        )
        for session in list(self.registry.sessions.values()):
            with contextlib.suppress(Exception):
                await session.send(update)

    # The reader/writer form of a streaming handler (context.read/write), not a generator.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[coordinator_pb2.AgentMessage, Any],
    ) -> None:
        peer = context.peer()
        lock = asyncio.Lock()

        async def send(message: coordinator_pb2.CoordinatorMessage) -> None:
            async with lock:  # gRPC allows one write at a time per stream
                await context.write(message)

        async def refuse(code: common_pb2.ProtocolError.Code.ValueType, text: str) -> None:
            log.warning(
                "refused agent: %s", text, extra={"peer": peer, "code": Error.Code.Name(code)}
            )
            error = Error(code=code, message=text, fatal=True)
            with contextlib.suppress(Exception):
                await send(coordinator_pb2.CoordinatorMessage(error=error))

        nonce = os.urandom(32)
        await send(
            coordinator_pb2.CoordinatorMessage(
                hello_challenge=coordinator_pb2.HelloChallenge(
                    nonce=nonce,
                    coordinator_version=__version__,
                    protocol_version=self.protocol_version,
                )
            )
        )
        try:
            first = await asyncio.wait_for(context.read(), self.hello_timeout)
        except TimeoutError:
            await refuse(Error.OUT_OF_ORDER, f"no hello within {self.hello_timeout}s")
            return
        if first is grpc.aio.EOF:  # type: ignore[comparison-overlap]  # stubs omit EOF
            return
        try:
            hello = check_hello(first, nonce, self.protocol_version)
            owner = await self._enrolment(hello)
            record, session = await self.registry.register(hello, peer, send, owner)
        except NameTaken as exc:
            await refuse(Error.REJECTED, str(exc))
            return
        except Refused as exc:
            await refuse(exc.code, str(exc))
            return
        except ValueError as exc:
            await refuse(Error.IDENTITY_MISMATCH, str(exc))
            return
        log.info(
            "node connected",
            extra={
                "node_id": record.node_id,
                "node_name": record.name,
                "peer": peer,
                "session_id": session.session_id,
                "gpus": len(record.inventory.gpus),
                "agent_version": record.agent_version,
            },
        )
        reason = "agent closed the stream"
        try:
            await send(
                coordinator_pb2.CoordinatorMessage(
                    welcome=coordinator_pb2.Welcome(
                        session_id=session.session_id,
                        node_id=record.node_id,
                        params=self.params,
                        acked_usage_seq=record.acked_usage_seq,
                        server_time_unix_nanos=time.time_ns(),
                        draining=record.draining,
                        relay=self.relay,
                    )
                )
            )
            await self._run_hooks("connect", self._connect_hooks, session, record)
            reason = await self._serve(session, context)
        except asyncio.CancelledError:
            reason = "stream cancelled"
            raise
        except Exception as exc:
            reason = f"stream failed: {exc!r}"
            log.warning(
                "session stream failed", extra={"node_id": record.node_id, "error": repr(exc)}
            )
        finally:
            log.info("node disconnected", extra={"node_id": record.node_id, "reason": reason})
            await asyncio.shield(self.registry.end_session(session, reason))

    async def _enrolment(self, hello: coordinator_pb2.Hello) -> str:
        """The provider account a verified Hello binds its node to ("" = none), or Refused."""
        known = self.registry.nodes.get(hello.node_id)
        if known is not None and known.owner:
            return known.owner  # bound for good: the key proves it is the same node
        token = hello.enrollment_token
        if not token:
            if self.registration == "open":
                return ""
            raise Refused(
                Error.REJECTED,
                "this coordinator admits only enrolled nodes: set coordinator.enrollment_token "
                "(or enrollment_token_file) in the agent config to a token from "
                "'gpu-scheduler nodes enroll', issued to the node's provider account",
            )
        if self.authenticator is None:
            raise Refused(Error.REJECTED, "this coordinator does not take enrolment tokens")
        try:
            owner = await self.authenticator.enrollment_account(token)
        except Refusal as exc:
            raise Refused(Error.REJECTED, str(exc)) from None
        log.info("node enrolled", extra={"node_id": hello.node_id, "account": owner})
        now = round(self.registry.clock() * 1e9)
        await self.registry.db.call(
            lambda conn: acl_store.audit(
                conn, now, owner, "node.enroll", hello.node_id, f"name={hello.node_name}"
            )
        )
        return owner

    async def _serve(self, session: Session, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        closed = asyncio.create_task(session.closed.wait())
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                await asyncio.wait({read, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    error = Error(
                        code=session.close_code,  # type: ignore[arg-type]
                        message=session.close_reason,
                        fatal=True,
                    )
                    with contextlib.suppress(Exception):
                        await session.send(coordinator_pb2.CoordinatorMessage(error=error))
                    return session.close_reason
                message = read.result()
                if message is grpc.aio.EOF:
                    return "agent closed the stream"
                session.last_read_mono_ns = time.monotonic_ns()
                await self._dispatch(session, message)
        finally:
            closed.cancel()

    async def _error(self, session: Session, code: Any, text: str, kind: str) -> None:
        log.warning(
            "protocol error from agent: %s",
            text,
            extra={"node_id": session.node_id, "code": Error.Code.Name(code), "in_reply_to": kind},
        )
        error = Error(code=code, message=text, in_reply_to=kind)
        await session.send(coordinator_pb2.CoordinatorMessage(error=error))

    async def _dispatch(self, session: Session, message: coordinator_pb2.AgentMessage) -> None:
        kind = message.WhichOneof("body")
        if kind is None:
            await self._error(session, Error.MALFORMED, "empty AgentMessage", "")
            return
        if kind == "lease_update":
            # Refusing an update wedges its lease (no ack, so the agent resends the same
            # one forever): clip what can be clipped, fail the lease on what cannot.
            salvage_lease_update(message.lease_update)
        try:
            bounds.check(getattr(message, kind), kind)
        except bounds.BoundsError as exc:
            await self._error(session, Error.OVERSIZED, str(exc), kind)
            return
        if kind == "heartbeat":
            heartbeat = message.heartbeat
            if heartbeat.seq <= session.last_heartbeat_seq:
                await self._error(
                    session,
                    Error.OUT_OF_ORDER,
                    f"heartbeat seq {heartbeat.seq} after {session.last_heartbeat_seq}; ignored",
                    kind,
                )
                return
            await self.registry.heartbeat(session, heartbeat)
            await self._run_hooks("heartbeat", self._heartbeat_hooks, session, heartbeat)
            return
        if kind == "hello":
            await self._error(session, Error.OUT_OF_ORDER, "hello is only valid first", kind)
            return
        if kind == "error":
            err = message.error
            log.warning(
                "agent reported a protocol error",
                extra={
                    "node_id": session.node_id,
                    "code": Error.Code.Name(err.code),
                    "detail": err.message,
                    "in_reply_to": err.in_reply_to,
                },
            )
            await self._run_hooks("agent error", self._error_hooks, session, err)
            return
        handler = self._handlers.get(kind)
        if handler is None:
            await self._error(session, Error.REJECTED, f"coordinator does not handle {kind}", kind)
            return
        try:
            await handler(session, getattr(message, kind))
        except Exception:
            log.exception("handler for %s failed", kind, extra={"node_id": session.node_id})
            await self._error(session, Error.INTERNAL, f"coordinator failed handling {kind}", kind)


def salvage_lease_update(update: Any) -> None:
    """Make an oversized LeaseUpdate storable: strings clipped (the log tail keeps its
    end); an update still out of bounds (say, a million GPU ids) becomes ``failed``
    with the reason, so the lease ends, its GPUs free up and the agent is cancelled."""
    update.reason = leaserules.clip(update.reason, bounds.MAX_STRING)
    update.container_id = leaserules.clip(update.container_id, bounds.MAX_STRING)
    tail_limit = bounds.LIMITS["gpuagent.v1.LeaseUpdate.log_tail"]
    if len(update.log_tail) > tail_limit:
        update.log_tail = update.log_tail[-tail_limit:]
    # A lease declares at most MAX_PORTS ports: more endpoints are an agent's bug.
    del update.endpoints[leaserules.MAX_PORTS :]
    for endpoint in update.endpoints:
        endpoint.last_result = leaserules.clip(endpoint.last_result, 256)
        if parse_direct_address(endpoint.direct_address) is None:
            endpoint.direct_address = ""  # malformed: the port is the relay's only
            endpoint.direct_tls = False
    try:
        bounds.check(update, "lease_update")
    except bounds.BoundsError as exc:
        del update.gpu_uuids[:]
        update.state = common_pb2.LEASE_STATE_FAILED
        update.reason = leaserules.clip(
            f"the coordinator could not store the agent's update ({exc}); lease ended"
        )
