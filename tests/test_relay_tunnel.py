"""The relay and the agent's tunnel client in one process, over real gRPC and real
sockets on loopback: what the agent refuses, what a cut tunnel answers, how the relay
checks who opens a tunnel, TLS at the relay, and the idle timeout.

The service behind the tunnel is a small asyncio HTTP server on loopback; the
Docker-backed end to end tests are tests/test_relay_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from agent.config import CoordinatorConfig
from agent.identity import NodeIdentity, load_or_create
from agent.leases.endpoints import ServiceTarget
from agent.link.backoff import Backoff
from agent.tunnel import TunnelClient
from gpuagent.signing import tunnel_hello_signing_bytes
from gpuagent.v1 import coordinator_pb2, relay_pb2, relay_pb2_grpc
from scheduler.config import RelayConfig
from scheduler.relay.http import locate
from scheduler.relay.routes import Port, Route
from scheduler.relay.server import Relay
from scheduler.relay.tokens import new_token, token_hash
from scheduler.relay.tunnel import TunnelError
from tests.coordinator_harness import until
from tests.faults.harness import TcpProxy

TOKEN = new_token()


class StaticRoutes:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.asked = 0

    async def route(self, lease_id: str) -> Route | None:
        self.asked += 1
        return self.routes.get(lease_id)


@dataclass
class StaticTargets:
    """The ServiceTargets contract over a fixed table (the lease side is not under test)."""

    table: dict[tuple[str, str], ServiceTarget] = field(default_factory=dict)

    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        return self.table.get((lease_id, port))


async def _service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with its path; counts them."""
    SEEN.append(1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            if path == b"/slow":  # a chunk every 0.2 s for 1.6 s
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(8):
                    await asyncio.sleep(0.2)
                    writer.write(b"5\r\ntick\n\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                continue
            body = b"path=" + path
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        CLOSED.append(1)
        writer.close()


SEEN: list[int] = []
CLOSED: list[int] = []  # service-side connections that ended


@dataclass
class Rig:
    relay: Relay
    routes: StaticRoutes
    targets: StaticTargets
    client: TunnelClient
    identity: NodeIdentity
    proxy: TcpProxy
    grpc_port: int
    tmp: Path

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.relay.port}{path}"

    def headers(
        self, lease: str = "lease-a", port: str = "80", token: str = TOKEN
    ) -> dict[str, str]:
        return {"Host": f"{lease}-{port}.relay.localhost", "Authorization": f"Bearer {token}"}


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    routes = StaticRoutes()
    config = RelayConfig(
        listen="127.0.0.1:0",
        tcp_listen="127.0.0.1:0",
        insecure_http=True,
        open_timeout=3,
        ping_interval=0.3,
    )
    relay = Relay(config, routes, tls_dir=tmp_path / "tls")
    server = grpc.aio.server()
    relay_pb2_grpc.add_TunnelServicer_to_server(relay.hub, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await relay.start()
    service = await asyncio.start_server(_service, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    identity = load_or_create(tmp_path / "agent")
    routes.routes["lease-a"] = Route(
        "lease-a", identity.node_id, (Port("80", 80, "http"),), False, token_hash(TOKEN)
    )
    targets = StaticTargets(
        {
            ("lease-a", "80"): ServiceTarget(
                "lease-a", "80", "127.0.0.1", service_port, "http", True
            ),
        }
    )
    proxy = TcpProxy(grpc_port)
    coordinator = CoordinatorConfig(
        address=f"127.0.0.1:{proxy.port}", insecure=True, reconnect_initial=0.05, reconnect_max=0.2
    )
    client = TunnelClient(
        coordinator, identity, targets, backoff=Backoff(0.05, 0.2, uniform=lambda a, b: 0.0)
    )
    await client.on_welcome(
        coordinator_pb2.Welcome(relay=coordinator_pb2.RelayParams(enabled=True))
    )
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await asyncio.wait_for(client.connected.wait(), 10)
    SEEN.clear()
    CLOSED.clear()
    try:
        yield Rig(relay, routes, targets, client, identity, proxy, grpc_port, tmp_path)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        proxy.close()
        await relay.stop()
        await server.stop(0)
        service.close()


async def _get(rig: Rig, path: str = "/", **kw: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(rig.url(path), headers=rig.headers(**kw))


@pytest.mark.asyncio
async def test_a_request_goes_through_and_the_app_sees_its_own_path(rig: Rig) -> None:
    """Host form: the app sees the path as sent; path form: the prefix is stripped."""
    reply = await _get(rig, "/v1/models?x=1")
    assert (reply.status_code, reply.text) == (200, "path=/v1/models?x=1")
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(
            rig.url("/_lease/lease-a/80/v1/chat"), headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert (reply.status_code, reply.text) == (200, "path=/v1/chat")


@pytest.mark.asyncio
async def test_the_agent_refuses_other_leases_undeclared_ports_and_addresses(rig: Rig) -> None:
    """Even a relay that asks (compromised, or buggy) gets nothing the lease did not
    declare: another lease, another port, an address smuggled in as a port name are
    each refused by the agent, logged and counted, and nothing connects."""
    node = rig.identity.node_id
    asks = [
        ("lease-b", "80"),  # another lease (maybe one this node runs, not this port's)
        ("lease-a", "81"),  # a port lease-a did not declare
        ("lease-a", "127.0.0.1:22"),  # an address: ports are names, never addresses
        ("lease-a", "../80"),
        ("", ""),
    ]
    for lease_id, port in asks:
        with pytest.raises(TunnelError) as err:
            await rig.relay.hub.open_stream(node, lease_id, port)
        assert err.value.kind == "not_found", (lease_id, port)
    assert rig.client.refusals == len(asks)
    assert SEEN == []


@pytest.mark.asyncio
async def test_a_port_that_is_not_ready_answers_503(rig: Rig) -> None:
    """Readiness false at the agent: the relay answers 503 and the service sees nothing."""
    target = rig.targets.table[("lease-a", "80")]
    rig.targets.table[("lease-a", "80")] = ServiceTarget(
        target.lease_id, target.name, target.host, target.port, "http", ready=False
    )
    reply = await _get(rig)
    assert reply.status_code == 503
    assert "not ready" in reply.text
    assert SEEN == []


@pytest.mark.asyncio
async def test_a_cut_tunnel_answers_503_and_service_resumes_on_reconnect(rig: Rig) -> None:
    """The agent's connection to the relay is reset: buyers get 503 at once (not a hang);
    once the network is back the agent redials and the same request succeeds."""
    assert (await _get(rig)).status_code == 200
    rig.proxy.set_mode("reset")
    await until(lambda: not rig.relay.hub.connected(rig.identity.node_id), 10, "tunnel gone")
    reply = await _get(rig)
    assert reply.status_code == 503, reply.text
    assert "tunnel" in reply.text
    rig.proxy.set_mode("pass")
    await until(lambda: rig.relay.hub.connected(rig.identity.node_id), 10, "tunnel back")
    assert (await _get(rig)).status_code == 200


@pytest.mark.asyncio
async def test_a_lease_on_another_node_is_never_sent_to_this_agent(rig: Rig) -> None:
    """The route says node Y: a tunnel from node X (this agent) never sees its buyers."""
    rig.routes.routes["lease-y"] = Route(
        "lease-y", "node-someoneelse", (Port("80", 80, "http"),), False, token_hash(TOKEN)
    )
    reply = await _get(rig, lease="lease-y")
    assert reply.status_code == 503
    assert rig.client.refusals == 0 and SEEN == []


async def _control(port: int, build: object) -> relay_pb2.TunnelDown:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = relay_pb2_grpc.TunnelStub(channel).Control()
        challenge = await call.read()
        await call.write(build(challenge.challenge.nonce))  # type: ignore[operator]
        reply = await call.read()
        call.cancel()
        return reply  # type: ignore[no-any-return]


@pytest.mark.asyncio
async def test_the_relay_refuses_a_tunnel_without_the_node_key(rig: Rig, tmp_path: Path) -> None:
    """A tunnel claiming this node's id with another key, a signature over another nonce
    or a Hello signature: refused, and this node's tunnel stays the one that is open."""
    me = rig.identity
    other = load_or_create(tmp_path / "other")

    def claim_with_other_key(nonce: bytes) -> relay_pb2.TunnelUp:
        sig = other.sign(tunnel_hello_signing_bytes(nonce, me.node_id, other.public_key_bytes))
        return relay_pb2.TunnelUp(
            hello=relay_pb2.TunnelHello(
                node_id=me.node_id, public_key=other.public_key_bytes, signature=sig
            )
        )

    def stale_nonce(nonce: bytes) -> relay_pb2.TunnelUp:
        sig = me.sign(tunnel_hello_signing_bytes(b"\0" * 32, me.node_id, me.public_key_bytes))
        return relay_pb2.TunnelUp(
            hello=relay_pb2.TunnelHello(
                node_id=me.node_id, public_key=me.public_key_bytes, signature=sig
            )
        )

    def not_a_hello(nonce: bytes) -> relay_pb2.TunnelUp:
        return relay_pb2.TunnelUp(pong=relay_pb2.TunnelPing(seq=1))

    for build in (claim_with_other_key, stale_nonce, not_a_hello):
        reply = await _control(rig.grpc_port, build)
        assert reply.WhichOneof("body") == "error", build.__name__
        assert reply.error.fatal
    session = rig.relay.hub.sessions[me.node_id]
    assert (await _get(rig)).status_code == 200
    assert rig.relay.hub.sessions[me.node_id] is session


@pytest.mark.asyncio
async def test_a_carry_stream_needs_the_sessions_secret(rig: Rig) -> None:
    """Attaching to a stream with a wrong secret or an unknown session is refused."""
    session = rig.relay.hub.sessions[rig.identity.node_id]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.grpc_port}") as channel:
        for attach in (
            relay_pb2.StreamAttach(session_id=session.session_id, stream_id=1, stream_secret=b"x"),
            relay_pb2.StreamAttach(session_id="nope", stream_id=1, stream_secret=session.secret),
        ):
            call = relay_pb2_grpc.TunnelStub(channel).Carry()
            await call.write(relay_pb2.Frame(attach=attach))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.asyncio
async def test_route_lookups_are_cached_not_per_request(rig: Rig) -> None:
    """Ten requests for one lease cost one route lookup (no database round trip each)."""
    rig.relay.routes.invalidate("lease-a")
    before = rig.routes.asked
    for _ in range(10):
        assert (await _get(rig)).status_code == 200
    assert rig.routes.asked == before + 1


@pytest.mark.asyncio
async def test_metrics_count_requests_bytes_and_latency_per_lease(rig: Rig) -> None:
    """Answered and refused requests are counted by lease and status; bytes both ways."""
    await _get(rig, "/m")
    await _get(rig, "/m", token="gsp_wrong")
    registry = rig.relay.metrics.registry
    value = registry.get_sample_value
    assert value("gpu_relay_requests_total", {"lease_id": "lease-a", "code": "200"}) == 1
    assert value("gpu_relay_requests_total", {"lease_id": "lease-a", "code": "401"}) == 1
    assert value("gpu_relay_bytes_total", {"lease_id": "lease-a", "direction": "to_buyer"}) == len(
        "path=/m"
    )
    assert value("gpu_relay_response_start_seconds_count", {"lease_id": "lease-a"}) == 1
    assert value("gpu_relay_tunnels", {}) == 1


@pytest.mark.asyncio
async def test_an_idle_buyer_connection_is_closed_after_the_idle_timeout(rig: Rig) -> None:
    """A connection with no bytes either way for idle_timeout is closed by the relay."""
    rig.relay.http.settings = type(rig.relay.http.settings)(
        domain="relay.localhost", idle_timeout=0.3, scheme="http"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.relay.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the relay
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_a_long_request_with_traffic_outlives_the_idle_timeout(rig: Rig) -> None:
    """No request-duration cap: a response that keeps moving runs far past idle_timeout."""
    rig.relay.http.settings = type(rig.relay.http.settings)(
        domain="relay.localhost", idle_timeout=0.5, scheme="http"
    )
    started = asyncio.get_running_loop().time()
    reply = await _get(rig, "/slow")
    assert (reply.status_code, reply.text) == (200, "tick\n" * 8)
    assert asyncio.get_running_loop().time() - started > 1.5


@pytest.mark.asyncio
async def test_tls_at_the_relay_with_a_certificate_from_the_schedulers_ca(rig: Rig) -> None:
    """Without an operator certificate the relay serves *.domain from the scheduler's CA;
    a buyer trusting ca.pem verifies it under the lease's host name."""
    config = RelayConfig(listen="127.0.0.1:0", domain="relay.test")
    relay = Relay(config, rig.routes, tls_dir=rig.tmp / "tls")
    relay.hub = rig.relay.hub
    relay.http.hub = rig.relay.hub
    await relay.start()
    try:
        context = ssl.create_default_context(cafile=str(rig.tmp / "tls" / "ca.pem"))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, ssl=context, server_hostname="lease-a-80.relay.test"
        )
        writer.write(
            b"GET /tls HTTP/1.1\r\nHost: lease-a-80.relay.test\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.endswith(b"path=/tls")
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    finally:
        await relay.stop()


def test_locate_names_lease_and_port_from_host_or_path() -> None:
    """Host ``<lease>-<port>.<domain>`` (any case, with a port) or ``/_lease/<id>/<port>/``;
    anything else names no service."""
    assert locate(b"Lease-Abc-8080.relay.localhost:8443", b"/x", "relay.localhost") == (
        locate(b"lease-abc-8080.relay.localhost", b"/x", "relay.localhost")
    )
    found = locate(b"lease-abc-8080.relay.localhost", b"/x?y", "relay.localhost")
    assert found is not None and (found.lease_id, found.port, found.path) == (
        "lease-abc",
        "8080",
        b"/x?y",
    )
    found = locate(b"relay", b"/_lease/my_lease.1/api/v1?q=1", "localhost")
    assert found is not None and (found.lease_id, found.port, found.path) == (
        "my_lease.1",
        "api",
        b"/v1?q=1",
    )
    found = locate(b"relay", b"/_lease/l/p?q=1", "localhost")
    assert found is not None and found.path == b"/?q=1"
    for host, target in (
        (b"localhost", b"/"),
        (b"evil.com", b"/"),
        (b"a.b-1.localhost", b"/"),
        (b"nodash.localhost", b"/"),
        (b"x", b"/_lease/"),
        (b"x", b"/_lease/only"),
    ):
        assert locate(host, target, "localhost") is None, (host, target)


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_hostile_http_is_refused_at_the_relay(rig: Rig) -> None:
    """Garbage, an oversized head, no Host, an unknown path: each gets a clear 4xx from
    the relay itself, and nothing reaches the service."""
    garbage = await _raw(rig.relay.port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400"), garbage[:80]
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    oversized = await _raw(rig.relay.port, huge)
    assert oversized.startswith(b"HTTP/1.1 431"), oversized[:80]
    nohost = await _raw(rig.relay.port, b"GET / HTTP/1.0\r\n\r\n")
    assert nohost.startswith(b"HTTP/1.1 404"), nohost[:80]
    bad_path = await _raw(rig.relay.port, b"GET /_lease/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert bad_path.startswith(b"HTTP/1.1 404"), bad_path[:80]
    assert SEEN == []


@pytest.mark.asyncio
async def test_tcp_handshake_refuses_garbage_and_wrong_tokens(rig: Rig) -> None:
    """The TCP listener: a malformed or overlong first line is ERR 400, a wrong token
    ERR 401, an undeclared port (with the token) ERR 404; the right one OK and a pipe."""
    port = rig.relay.tcp_port
    assert (await _raw(port, b"hello\n")).startswith(b"ERR 400")
    assert (await _raw(port, b"RELAY1 " + b"x" * 5000 + b"\n")).startswith(b"ERR 400")
    assert (await _raw(port, b"RELAY1 lease-a 80 gsp_nope\n")).startswith(b"ERR 401")
    assert (await _raw(port, f"RELAY1 lease-a 81 {TOKEN}\n".encode())).startswith(b"ERR 404")
    assert SEEN == []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"RELAY1 lease-a 80 {TOKEN}\nGET /tcp HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.readuntil(b"path=/tcp"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"OK\nHTTP/1.1 200"), answer


@pytest.mark.asyncio
async def test_an_idle_tcp_stream_is_closed_on_both_sides(rig: Rig) -> None:
    """The relay's idle_timeout applies to tcp streams too: a stream with no bytes either
    way for it is closed toward the buyer and, through the tunnel, toward the container;
    one with traffic is not."""
    rig.relay.tcp.idle_timeout = 0.5
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.relay.tcp_port)
    try:
        writer.write(f"RELAY1 lease-a 80 {TOKEN}\n".encode())
        assert await asyncio.wait_for(reader.readline(), 10) == b"OK\n"
        started = asyncio.get_running_loop().time()
        for _ in range(4):  # traffic every 0.25 s keeps it open past the timeout
            writer.write(b"GET /tick HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"path=/tick"), 5)).startswith(
                b"HTTP/1.1 200"
            )
            await asyncio.sleep(0.25)
        assert CLOSED == []
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the relay
        assert asyncio.get_running_loop().time() - started > 1.0
    finally:
        writer.close()
    await until(lambda: CLOSED == [1], what="the container side closed")


@pytest.mark.asyncio
async def test_a_lease_whose_tunnel_is_on_another_replica_is_redirected_there(rig: Rig) -> None:
    """Several replicas: a node whose tunnel this relay lacks but another replica holds
    gets a 307 to that replica's relay in the path form (query kept), only for a holder
    of the token; with no other holder the 503 stands."""
    rig.routes.routes["lease-x"] = Route(
        "lease-x", "node-elsewhere", (Port("80", 80, "http"),), False, token_hash(TOKEN)
    )
    asked: list[str] = []

    async def elsewhere(node_id: str) -> str:
        asked.append(node_id)
        return "https://replica-b.example.net:8443" if node_id == "node-elsewhere" else ""

    rig.relay.http.elsewhere = elsewhere
    async with httpx.AsyncClient(timeout=10) as http:
        moved = await http.get(rig.url("/v1/x?q=1"), headers=rig.headers("lease-x"))
        stranger = await http.get(
            rig.url("/v1/x"), headers=rig.headers("lease-x", token="gsp_nope")
        )
    assert moved.status_code == 307
    assert moved.headers["location"] == (
        "https://replica-b.example.net:8443/_lease/lease-x/80/v1/x?q=1"
    )
    assert stranger.status_code == 401 and asked == ["node-elsewhere"]
    rig.routes.routes["lease-x"] = Route(
        "lease-x", "node-gone", (Port("80", 80, "http"),), False, token_hash(TOKEN)
    )
    rig.relay.routes.invalidate("lease-x")
    assert (await _get(rig, "/", lease="lease-x")).status_code == 503
    assert SEEN == []


class _Broken:
    async def route(self, lease_id: str) -> Route | None:
        raise ConnectionError("coordinator unreachable")


@pytest.mark.asyncio
async def test_a_route_source_that_fails_answers_503_not_a_dropped_connection(rig: Rig) -> None:
    """A standalone relay whose coordinator is away answers 503 and keeps serving."""
    rig.relay.routes.source = _Broken()
    rig.relay.routes.invalidate("lease-a")
    reply = await _get(rig)
    assert reply.status_code == 503 and "coordinator" in reply.text
    assert SEEN == []


@pytest.mark.asyncio
async def test_a_tcp_port_is_not_served_as_http(rig: Rig) -> None:
    """A port declared tcp answers 404 on the HTTP listener, naming the TCP listener."""
    rig.routes.routes["lease-t"] = Route(
        "lease-t", rig.identity.node_id, (Port("db", 5432, "tcp"),), False, token_hash(TOKEN)
    )
    reply = await _get(rig, lease="lease-t", port="db")
    assert reply.status_code == 404 and "TCP listener" in reply.text
    assert rig.client.refusals == 0 and SEEN == []
