"""A scripted coordinator for the real agent process: gRPC + TLS on loopback.

The real scheduler never sends a duplicate assign, a cancel before its assign or
a hostile spec, so scenarios 9 and 10 talk to the agent through this instead. It
does the handshake (HelloChallenge -> Hello -> Welcome), acks every LeaseUpdate
and UsageReport so the agent's state stays clean, records everything the agent
sends, and writes whatever the test queues: typed messages, or raw bytes (not
necessarily protobuf) to test the agent's decoder.

The gRPC server runs on its own event loop in a thread, so the (synchronous) fault
tests drive it with plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import trustme

from gpuagent import PROTOCOL_VERSION
from gpuagent.v1 import common_pb2, coordinator_pb2, leases_pb2, usage_pb2

from .harness import free_port, wait_for

Outgoing = coordinator_pb2.CoordinatorMessage | bytes


class FakeCoordinator:
    """Serve ``Coordinator/Connect`` on ``127.0.0.1:port`` with a CA under ``tls_dir``."""

    def __init__(self, tls_dir: Path) -> None:
        tls_dir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = tls_dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._key = cert.private_key_pem.bytes()
        self._chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
        self.port = free_port()
        self.received: list[coordinator_pb2.AgentMessage] = []
        self.sessions = 0
        self.node_id = ""
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[Outgoing] | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-coordinator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fake coordinator did not start")

    # -- what tests call --------------------------------------------------------------

    def send(self, message: Outgoing) -> None:
        """Queue a message (or raw bytes) for the current session."""

        def put() -> None:
            if self._queue is None:
                raise RuntimeError("no agent session to send to")
            self._queue.put_nowait(message)

        self._loop.call_soon_threadsafe(put)

    def wait_session(self, count: int = 1, timeout: float = 60) -> None:
        wait_for(f"agent session #{count}", lambda: self.sessions >= count, timeout, 0.1)

    def updates(self, lease_id: str) -> list[leases_pb2.LeaseUpdate]:
        with self._lock:
            return [
                m.lease_update
                for m in self.received
                if m.WhichOneof("body") == "lease_update" and m.lease_update.lease_id == lease_id
            ]

    def last_update(self, lease_id: str) -> leases_pb2.LeaseUpdate | None:
        found = self.updates(lease_id)
        return found[-1] if found else None

    def heartbeats(self) -> int:
        with self._lock:
            return sum(1 for m in self.received if m.WhichOneof("body") == "heartbeat")

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    # -- the server -------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # The agent pings every keepalive_time (5 s in the harness) even when idle;
        # grpc's default policy would answer that with GOAWAY "too many pings".
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        # Raw bytes out: a test can send what no protobuf encoder would produce.
        handler = grpc.method_handlers_generic_handler(
            "gpuagent.v1.Coordinator",
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self._connect,
                    request_deserializer=coordinator_pb2.AgentMessage.FromString,
                    response_serializer=_serialize,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials([(self._key, self._chain)])
        server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0.5)

    async def _connect(
        self, requests: AsyncIterator[coordinator_pb2.AgentMessage], context: Any
    ) -> AsyncIterator[Outgoing]:
        queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._queue = queue
        yield _msg(
            hello_challenge=coordinator_pb2.HelloChallenge(
                nonce=secrets.token_bytes(32),
                coordinator_version="fake",
                protocol_version=PROTOCOL_VERSION,
            )
        )
        iterator = aiter(requests)
        first = await anext(iterator)
        hello = first.hello
        self.node_id = hello.node_id
        yield _msg(
            welcome=coordinator_pb2.Welcome(
                session_id=uuid.uuid4().hex,
                node_id=hello.node_id,
                params=common_pb2.NodeParams(heartbeat_interval_ms=1000, metering_interval_ms=2000),
                acked_usage_seq=hello.last_acked_usage_seq,
                server_time_unix_nanos=time.time_ns(),
            )
        )
        self.sessions += 1
        reader = asyncio.ensure_future(self._read(iterator, queue))
        try:
            while True:
                message = await queue.get()
                if isinstance(message, _End):
                    return
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        iterator: AsyncIterator[coordinator_pb2.AgentMessage],
        queue: asyncio.Queue[Outgoing],
    ) -> None:
        try:
            async for message in iterator:
                with self._lock:
                    self.received.append(message)
                kind = message.WhichOneof("body")
                if kind == "lease_update":
                    update = message.lease_update
                    ack = leases_pb2.LeaseUpdateAck(
                        lease_id=update.lease_id, update_seq=update.update_seq
                    )
                    queue.put_nowait(_msg(lease_update_ack=ack))
                elif kind == "usage_report" and message.usage_report.records:
                    top = max(r.seq for r in message.usage_report.records)
                    queue.put_nowait(_msg(usage_ack=usage_pb2.UsageAck(acked_through_seq=top)))
        finally:
            queue.put_nowait(_End())


class _End(bytes):
    """Sentinel: the agent closed its side; end the response stream."""


def _msg(**body: Any) -> coordinator_pb2.CoordinatorMessage:
    return coordinator_pb2.CoordinatorMessage(**body)


def _serialize(message: Outgoing) -> bytes:
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def wait_update(
    coordinator: FakeCoordinator,
    lease_id: str,
    accept: Callable[[leases_pb2.LeaseUpdate], bool],
    what: str,
    timeout: float = 30,
) -> leases_pb2.LeaseUpdate:
    """The first update of ``lease_id`` that ``accept`` likes, waiting for it."""
    return wait_for(
        what,
        lambda: next((u for u in coordinator.updates(lease_id) if accept(u)), None),
        timeout,
        0.1,
    )
