"""The direct-mode listeners (agent/direct/front.py) in one process on loopback, and the
coordinator's parsing of the address an agent reports (gpuagent/direct_url.py): what
a buyer without the token, with a hostile request, or naming another lease gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from agent.config import ServicesConfig
from agent.direct.front import FrontPort, HttpFront, TcpFront
from agent.direct.publisher import DirectPublisher
from agent.leases.endpoints import ServiceTarget
from gpuagent.direct_url import direct_url, parse_direct_address
from gpuagent.leaserules import Port
from scheduler import tlsgen

TOKEN = "gsp_direct-front-test-token"
HASH = hashlib.sha256(TOKEN.encode()).digest()


@dataclass
class Service:
    """Answers each request with the headers it received; records the requests."""

    seen: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head)
                body = head.lower()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclass
class Targets:
    target: ServiceTarget | None

    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        return self.target if (lease_id, port) == ("lease-d", "web") else None


@dataclass
class Rig:
    service: Service
    targets: Targets
    http_port: int
    tcp_port: int
    ports: list[FrontPort]


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    service = Service()
    upstream = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    targets = Targets(ServiceTarget("lease-d", "web", "127.0.0.1", port, "http", True))

    def front(protocol: str) -> FrontPort:
        return FrontPort(
            lease_id="lease-d",
            name="web",
            protocol=protocol,
            public=False,
            token_sha256=lambda: HASH,
            targets=targets,
            scheme="http",
            idle_timeout=0.5,
        )

    http = await asyncio.start_server(HttpFront(front("http")).handle, "127.0.0.1", 0)
    tcp = await asyncio.start_server(TcpFront(front("tcp")).handle, "127.0.0.1", 0)
    try:
        yield Rig(
            service,
            targets,
            http.sockets[0].getsockname()[1],
            tcp.sockets[0].getsockname()[1],
            [],
        )
    finally:
        for server in (http, tcp, upstream):
            server.close()


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_the_token_is_checked_per_request_and_removed_before_the_service(rig: Rig) -> None:
    """No token, a wrong one, another scheme: 401 with WWW-Authenticate, and the service
    saw nothing; with the token: 200, and the service saw no Authorization header but the
    X-Forwarded-For the agent set (not the one the buyer sent)."""
    url = f"http://127.0.0.1:{rig.http_port}/x"
    async with httpx.AsyncClient(timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer gsp_no"}, {"Authorization": "Basic eDp5"}):
            reply = await http.get(url, headers=headers)
            assert reply.status_code == 401 and "Bearer" in reply.headers["www-authenticate"]
        assert rig.service.seen == []
        ok = await http.get(
            url, headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "6.6.6.6"}
        )
    assert ok.status_code == 200
    assert b"authorization" not in ok.content and b"6.6.6.6" not in ok.content
    assert b"x-forwarded-for: 127.0.0.1" in ok.content
    assert ok.content.startswith(b"get /x http/1.1")


@pytest.mark.asyncio
async def test_a_keep_alive_connection_needs_the_token_on_every_request(rig: Rig) -> None:
    """A second request on the same connection without the token is refused: the check is
    per request, not per connection."""
    first = f"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    second = "GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await _raw(rig.http_port, (first + second).encode())
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 401" in answer
    assert len(rig.service.seen) == 1 and rig.service.seen[0].startswith(b"GET /a")


@pytest.mark.asyncio
async def test_hostile_http_is_refused_before_the_service(rig: Rig) -> None:
    """Garbage is 400, an oversized head 431; neither reaches the service."""
    assert (await _raw(rig.http_port, b"\x16\x03\x01 nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
    assert (await _raw(rig.http_port, huge)).startswith(b"HTTP/1.1 431")
    assert rig.service.seen == []


@pytest.mark.asyncio
async def test_not_ready_is_503_and_an_ended_lease_502(rig: Rig) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{rig.http_port}/"
    assert rig.targets.target is not None
    ready = rig.targets.target
    rig.targets.target = ServiceTarget(
        ready.lease_id, ready.name, ready.host, ready.port, "http", False
    )
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url, headers=auth)).status_code == 503
        rig.targets.target = None
        assert (await http.get(url, headers=auth)).status_code == 502
    assert rig.service.seen == []


@pytest.mark.asyncio
async def test_tcp_handshake_names_this_lease_and_port_only(rig: Rig) -> None:
    """Garbage ERR 400; a wrong token or another lease's id ERR 401 (alike, so ids cannot
    be probed); the right token with another port ERR 404; the right line OK, a pipe, and
    the pipe closed once idle past idle_timeout."""
    port = rig.tcp_port
    assert (await _raw(port, b"hello\n")).startswith(b"ERR 400")
    assert (await _raw(port, b"RELAY1 " + b"x" * 5000 + b"\n")).startswith(b"ERR 400")
    assert (await _raw(port, b"RELAY1 lease-d web gsp_no\n")).startswith(b"ERR 401")
    assert (await _raw(port, f"RELAY1 lease-e web {TOKEN}\n".encode())).startswith(b"ERR 401")
    assert (await _raw(port, f"RELAY1 lease-d db {TOKEN}\n".encode())).startswith(b"ERR 404")
    assert rig.service.seen == []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"RELAY1 lease-d web {TOKEN}\nGET /t HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.readline(), 10) == b"OK\n"
        assert (await asyncio.wait_for(reader.readuntil(b"get /t"), 10)).startswith(b"HTTP/1.1 200")
        rest = await asyncio.wait_for(reader.read(), 5)  # idle 0.5 s: closed by the agent
        assert rest.endswith(b"\r\n\r\n")
    finally:
        writer.close()


def test_the_coordinator_builds_direct_urls_only_from_well_formed_addresses() -> None:
    """An agent's direct_address is parsed, never pasted: a path, a user part, a port out
    of range, a numeric non-address, an unbracketed IPv6 or an overlong value give no URL."""
    assert direct_url("http", "203.0.113.5:30001", True) == "https://203.0.113.5:30001/"
    assert direct_url("http", "127.0.0.2:30001", False) == "http://127.0.0.2:30001/"
    assert direct_url("tcp", "gpu1.example.net:30002", True) == "tls://gpu1.example.net:30002"
    assert direct_url("http", "[2001:db8::1]:443", True) == "https://[2001:db8::1]:443/"
    assert direct_url("udp", "203.0.113.5:30001", True) == ""
    for bad in (
        "",
        "203.0.113.5",
        "203.0.113.5:0",
        "203.0.113.5:70000",
        "evil.example/x:80",
        "user@evil.example:80",
        "1.2.3:80",
        "2001:db8::1:443",
        "[not-v6]:443",
        "a" * 400 + ":80",
        "host name:80",
    ):
        assert parse_direct_address(bad) is None, bad


@pytest.mark.asyncio
async def test_a_publisher_with_a_certificate_serves_tls_and_reports_it(
    rig: Rig, tmp_path: Path
) -> None:
    """With cert_file/key_file the direct listener speaks TLS (verified against the CA
    that issued it), the endpoint reports direct_tls, and the token is still asked;
    withdrawn, the port closes and is free in the book."""
    files = tlsgen.ensure(tmp_path / "tls")
    low = 31000 + secrets.randbelow(300) * 10
    config = ServicesConfig.model_validate(
        {
            "mode": "direct",
            "advertise_address": "127.0.0.1",
            "port_range": f"{low}-{low + 9}",
            "cert_file": str(files.server_cert),
            "key_file": str(files.server_key),
        }
    )
    publisher = DirectPublisher(config, tmp_path, rig.targets)
    publisher.set_token("lease-d", HASH)
    await publisher.publish("lease-d", [Port("web", 8080, "http")], public=False)
    address, tls = publisher.address_of("lease-d", "web")
    assert tls and address.startswith("127.0.0.1:")
    try:
        async with httpx.AsyncClient(timeout=10, verify=str(files.ca_cert)) as http:
            url = f"https://{address}/tls"
            assert (await http.get(url)).status_code == 401
            ok = await http.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and b"x-forwarded-proto: https" in ok.content
    finally:
        await publisher.withdraw("lease-d")
    assert publisher.address_of("lease-d", "web") == ("", False)
    assert publisher.book.ports("lease-d") == {}
    with pytest.raises(OSError):
        await asyncio.open_connection(*address.rsplit(":", 1))
