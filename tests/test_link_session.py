"""The real agent link against the real scheduler over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from agent.link import CoordinatorLink
from gpuagent.signing import hello_signing_bytes
from gpuagent.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, leases_pb2
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    Pki,
    agent_config,
    make_link,
    make_pki,
    scheduler_config,
    start_server,
    until,
)

Error = common_pb2.ProtocolError


@contextlib.asynccontextmanager
async def running(link: CoordinatorLink) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest_asyncio.fixture
async def tls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[SchedulerServer]:
    server = await start_server(scheduler_config(tmp_path, pki))
    yield server
    await server.stop(0)


@pytest.mark.asyncio
async def test_agent_connects_over_tls_and_heartbeats_are_recorded(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path
) -> None:
    """A TLS session opens, the Hello's key is stored, and heartbeats advance last_seen."""
    link, identity = make_link(agent_config(tls_server.port, pki), tmp_path / "a")  # type: ignore[attr-defined]
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)
        record = tls_server.registry.nodes[identity.node_id]
        assert record.public_key == identity.public_key_bytes
        assert len(record.inventory.gpus) == 2
        assert link.params.heartbeat_interval == pytest.approx(0.2)
        session = tls_server.registry.sessions[identity.node_id]
        await until(lambda: session.last_heartbeat_seq >= 3, what="three heartbeats")
        assert record.last_heartbeat is not None
        assert list(record.last_heartbeat.free_gpu_uuids) == [g.uuid for g in record.inventory.gpus]


@pytest.mark.asyncio
async def test_scheduler_restart_agent_reconnects_with_same_node_id(tmp_path: Path) -> None:
    """After the scheduler restarts on the same port, the agent is back within its backoff
    schedule, as the same node (no second registry entry)."""
    pki = make_pki(tmp_path / "pki")
    server = await start_server(scheduler_config(tmp_path, pki))
    port = server.port
    link, identity = make_link(agent_config(port, pki), tmp_path / "a")
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)
        first_session = link.session_id
        await server.stop(0)
        await until(lambda: not link.connected, what="agent noticing the restart")
        down_at = time.monotonic()
        await asyncio.sleep(0.5)  # the scheduler stays down across a few backoff steps
        server = await start_server(scheduler_config(tmp_path, pki, port=port))
        try:
            await asyncio.wait_for(link.wait_connected(), 5)
            # Backoff 0.1, 0.16, 0.256, 0.41, 0.5 (cap): back well within 2 s of the outage.
            assert time.monotonic() - down_at < 2.0
            assert link.session_id != first_session
            assert list(server.registry.nodes) == [identity.node_id]
            assert server.registry.sessions[identity.node_id].session_id == link.session_id
        finally:
            await server.stop(0)


@pytest.mark.asyncio
async def test_params_update_changes_heartbeat_interval_and_is_logged(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ParamsUpdate while connected changes the agent's interval and logs old and new."""
    link, _ = make_link(agent_config(tls_server.port, pki), tmp_path / "a")  # type: ignore[attr-defined]
    seen = []
    link.on_params(seen.append)
    caplog.set_level(logging.INFO, logger="agent.link.session")
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)
        await tls_server.coordinator.update_params(
            common_pb2.NodeParams(heartbeat_interval_ms=5000, metering_interval_ms=30000)
        )
        await until(lambda: link.params.heartbeat_interval == 5.0, what="new interval")
    assert link.params.metering_interval == 30.0
    assert seen[-1].heartbeat_interval == 5.0
    changed = [r for r in caplog.records if r.getMessage() == "coordinator parameter changed"]
    assert {(r.param, r.old, r.new) for r in changed} >= {  # type: ignore[attr-defined]
        ("heartbeat_interval", 0.2, 5.0),
        ("metering_interval", 60.0, 30.0),
    }


@pytest.mark.asyncio
async def test_unhandled_coordinator_message_is_refused_not_fatal(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A message kind no agent part handles gets a ProtocolError back; registered kinds
    reach their handler; the session stays up."""
    caplog.set_level(logging.WARNING, logger="scheduler.coordinator_service")
    link, identity = make_link(agent_config(tls_server.port, pki), tmp_path / "a")  # type: ignore[attr-defined]
    got: list[coordinator_pb2.Drain] = []

    async def on_drain(message: coordinator_pb2.Drain) -> None:
        got.append(message)

    link.on("drain", on_drain)
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)
        session = tls_server.registry.sessions[identity.node_id]
        await session.send(
            coordinator_pb2.CoordinatorMessage(lease_cancel=leases_pb2.LeaseCancel(lease_id="x"))
        )
        await session.send(
            coordinator_pb2.CoordinatorMessage(drain=coordinator_pb2.Drain(enabled=True))
        )
        await until(lambda: bool(got), what="drain handler")
        assert got[0].enabled
        assert link.connected and link.session_id == session.session_id
    refusals = [r for r in caplog.records if r.getMessage() == "agent reported a protocol error"]
    assert [(r.code, r.in_reply_to) for r in refusals] == [("REJECTED", "lease_cancel")]  # type: ignore[attr-defined]


# -- raw clients: what a broken or hostile agent can send ---------------------------


async def _raw_session(port: int, pki: Pki) -> tuple[grpc.aio.Channel, object, bytes]:
    """A hand-driven Connect stream, for sending what the real agent never would."""
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem.bytes())
    channel = grpc.aio.secure_channel(f"localhost:{port}", creds)
    call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect()
    first = await call.read()
    return channel, call, first.hello_challenge.nonce


def _hello(
    identity_link: CoordinatorLink, nonce: bytes, **changes: object
) -> coordinator_pb2.Hello:
    ident = identity_link.identity
    version = str(changes.pop("protocol_version", "1.0"))
    hello = coordinator_pb2.Hello(
        node_id=ident.node_id,
        public_key=ident.public_key_bytes,
        protocol_version=version,
        signature=ident.sign(
            hello_signing_bytes(nonce, ident.node_id, ident.public_key_bytes, version)
        ),
    )
    for key, value in changes.items():
        setattr(hello, key, value)
    return hello


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        ("wrong_nonce", Error.BAD_SIGNATURE, "signature does not verify"),
        ("other_key", Error.IDENTITY_MISMATCH, "does not derive from the public key"),
        ("major_2", Error.UNSUPPORTED_VERSION, "upgrade the coordinator"),
        ("heartbeat_first", Error.OUT_OF_ORDER, "expected hello"),
        ("too_many_labels", Error.OVERSIZED, "hello.labels"),
    ],
)
async def test_bad_hello_is_refused_with_a_clear_fatal_error(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path, mutate: str, code: int, text: str
) -> None:
    """Each kind of bad Hello gets a fatal ProtocolError naming the problem; no node is
    registered and the server keeps serving."""
    link, _ = make_link(agent_config(tls_server.port, pki), tmp_path / "a")  # type: ignore[attr-defined]
    other, _ = make_link(agent_config(tls_server.port, pki), tmp_path / "b")  # type: ignore[attr-defined]
    channel, call, nonce = await _raw_session(tls_server.port, pki)
    try:
        if mutate == "wrong_nonce":
            message = coordinator_pb2.AgentMessage(hello=_hello(link, b"\x00" * 32))
        elif mutate == "other_key":
            hello = _hello(link, nonce)
            hello.public_key = other.identity.public_key_bytes
            message = coordinator_pb2.AgentMessage(hello=hello)
        elif mutate == "major_2":
            message = coordinator_pb2.AgentMessage(
                hello=_hello(link, nonce, protocol_version="2.0")
            )
        elif mutate == "heartbeat_first":
            message = coordinator_pb2.AgentMessage(heartbeat=coordinator_pb2.Heartbeat(seq=1))
        else:
            hello = _hello(link, nonce)
            hello.labels.update({f"k{i}": "v" for i in range(300)})
            message = coordinator_pb2.AgentMessage(hello=hello)
        await call.write(message)  # type: ignore[attr-defined]
        reply = await call.read()  # type: ignore[attr-defined]
        assert reply.WhichOneof("body") == "error"
        assert reply.error.fatal
        assert reply.error.code == code
        assert text in reply.error.message
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    finally:
        await channel.close()
    assert tls_server.registry.nodes == {}
    # Still serving: a good agent connects afterwards.
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)


@pytest.mark.asyncio
async def test_out_of_order_and_oversized_messages_get_errors_session_survives(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path
) -> None:
    """A repeated heartbeat seq and an over-bound heartbeat are answered with non-fatal
    errors; an over-size gRPC message ends only that stream; the server lives on."""
    link, identity = make_link(agent_config(tls_server.port, pki), tmp_path / "a")  # type: ignore[attr-defined]
    channel, call, nonce = await _raw_session(tls_server.port, pki)
    try:
        await call.write(coordinator_pb2.AgentMessage(hello=_hello(link, nonce)))  # type: ignore[attr-defined]
        assert (await call.read()).WhichOneof("body") == "welcome"  # type: ignore[attr-defined]
        beat = coordinator_pb2.AgentMessage(heartbeat=coordinator_pb2.Heartbeat(seq=5))
        await call.write(beat)  # type: ignore[attr-defined]
        await call.write(beat)  # type: ignore[attr-defined]
        reply = await call.read()  # type: ignore[attr-defined]
        assert reply.error.code == Error.OUT_OF_ORDER and not reply.error.fatal
        big = coordinator_pb2.Heartbeat(seq=6, free_gpu_uuids=["x"] * 2000)
        await call.write(coordinator_pb2.AgentMessage(heartbeat=big))  # type: ignore[attr-defined]
        reply = await call.read()  # type: ignore[attr-defined]
        assert reply.error.code == Error.OVERSIZED
        assert "heartbeat.free_gpu_uuids" in reply.error.message
        assert tls_server.registry.sessions[identity.node_id].last_heartbeat_seq == 5
        huge = coordinator_pb2.Heartbeat(seq=7, free_gpu_uuids=["y" * 4000] * 1100)
        await call.write(coordinator_pb2.AgentMessage(heartbeat=huge))  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()  # type: ignore[attr-defined]
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await channel.close()
    async with running(link):
        await asyncio.wait_for(link.wait_connected(), 5)


# -- transport security ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_expired_server_certificate_is_rejected(tmp_path: Path) -> None:
    """An expired coordinator certificate never yields a session; the error says so."""
    pki = make_pki(tmp_path / "pki", expired=True)
    server = await start_server(scheduler_config(tmp_path, pki))
    try:
        link, _ = make_link(agent_config(server.port, pki), tmp_path / "a")
        async with running(link):
            await until(lambda: link.last_error is not None, what="a connect error")
            assert not link.connected
        assert server.registry.nodes == {}
        assert "certificate has expired" in (link.last_error or "")
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_untrusted_ca_is_rejected(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path
) -> None:
    """A coordinator certificate from a CA the agent does not trust never yields a session."""
    stranger = make_pki(tmp_path / "other")
    link, _ = make_link(agent_config(tls_server.port, stranger), tmp_path / "a")
    async with running(link):
        await until(lambda: link.last_error is not None, what="a connect error")
        assert not link.connected
    assert tls_server.registry.nodes == {}


@pytest.mark.asyncio
async def test_plaintext_only_with_explicit_insecure(tmp_path: Path) -> None:
    """A TLS agent cannot talk to a plaintext coordinator, a plaintext agent cannot talk
    to a TLS one; with insecure on both sides the session opens."""
    plain = await start_server(scheduler_config(tmp_path / "p", None))
    pki = make_pki(tmp_path / "pki")
    tls = await start_server(scheduler_config(tmp_path / "t", pki))
    try:
        tls_agent, _ = make_link(agent_config(plain.port, pki), tmp_path / "a")
        plain_agent, _ = make_link(agent_config(tls.port, None), tmp_path / "b")
        async with running(tls_agent), running(plain_agent):
            await until(
                lambda: tls_agent.last_error is not None and plain_agent.last_error is not None,
                what="both agents failing",
            )
            assert not tls_agent.connected and not plain_agent.connected
        assert plain.registry.nodes == {} and tls.registry.nodes == {}
        ok, _ = make_link(agent_config(plain.port, None), tmp_path / "c")
        async with running(ok):
            await asyncio.wait_for(ok.wait_connected(), 5)
    finally:
        await plain.stop(0)
        await tls.stop(0)


@pytest.mark.asyncio
async def test_agent_restart_supersedes_old_session_same_node(
    tls_server: SchedulerServer, pki: Pki, tmp_path: Path
) -> None:
    """A second process with the same key (agent restarted before the old stream died)
    replaces the old session: one node, the old stream told it was superseded."""
    config = agent_config(tls_server.port, pki)
    first, identity = make_link(config, tmp_path / "a")
    second, identity2 = make_link(config, tmp_path / "a")
    assert identity2.node_id == identity.node_id
    async with running(first) as stop_first:
        await asyncio.wait_for(first.wait_connected(), 5)
        async with running(second):
            await asyncio.wait_for(second.wait_connected(), 5)
            await until(lambda: first.last_error is not None, what="first told it was superseded")
            assert "SUPERSEDED" in (first.last_error or "")
            stop_first.set()
            assert list(tls_server.registry.nodes) == [identity.node_id]
            current = tls_server.registry.sessions[identity.node_id].session_id
            assert current == second.session_id
