"""Service leases through the relay, end to end: a real `gpu-scheduler serve` (relay
inside), a real `gpu-agent run` dialling its tunnel out, real Docker running the
pyservice image (tests/images/pyservice.py), buyers on loopback HTTP.

Plain HTTP on the relay is allowed here because it listens on loopback only; the
TLS listener is covered in tests/test_relay_unit.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from benchmarks.agent_stack import Stack, running_stack, wait_until
from gpuagent.v1 import acl_pb2, acl_pb2_grpc, common_pb2, leases_pb2, leases_pb2_grpc
from tests.images.pyservice import build_pyservice

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

MB = 1024 * 1024


@dataclass
class Service:
    lease_id: str
    token: str


@dataclass
class World:
    stack: Stack
    buyer: grpc.Channel
    a: Service
    b: Service
    public: Service

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.stack.relay_port}{path}"

    def host(self, service: Service, port: str = "8080") -> dict[str, str]:
        return {"Host": f"{service.lease_id}-{port}.relay.localhost:{self.stack.relay_port}"}

    def auth(self, service: Service, port: str = "8080") -> dict[str, str]:
        return {**self.host(service, port), "Authorization": f"Bearer {service.token}"}

    def hits(self, service: Service) -> int:
        reply = httpx.get(self.url("/hits"), headers=self.auth(service), timeout=10)
        assert reply.status_code == 200, reply.text
        return int(reply.text)


def _buyer_channel(stack: Stack) -> grpc.Channel:
    acl = acl_pb2_grpc.AclStub(stack.channel)
    acl.CreateAccount(acl_pb2.CreateAccountRequest(name="carol", role=acl_pb2.ROLE_BUYER))
    secret = acl.CreateToken(acl_pb2.CreateTokenRequest(account="carol")).secret
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=stack.ca_file.read_bytes()),
        grpc.access_token_call_credentials(secret),
    )
    return grpc.secure_channel(f"localhost:{stack.grpc_port}", creds)


def submit_service(
    stack: Stack, buyer: grpc.Channel, lease_id: str, *, public: bool = False
) -> Service:
    stub = leases_pb2_grpc.LeasesStub(buyer)
    lease = stub.Submit(
        leases_pb2.SubmitLeaseRequest(
            spec=leases_pb2.LeaseSpec(
                image="gpu-agent-test/pyservice:latest",
                gpu_count=1,
                cpus=0.25,  # three leases on a 2-core host
                memory_bytes=128 * MB,
                max_duration_seconds=3600,
                ports=[leases_pb2.PortSpec(container_port=8080, protocol="http")],
                public=public,
            ),
            idempotency_key=lease_id,
        ),
        timeout=10,
    )
    assert lease.endpoint_token.startswith("gsp_"), "the buyer sees its token at submit"
    if public:
        lease.endpoint_token = ""  # not needed: the relay asks none

    def running() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)
        return got.state == common_pb2.LEASE_STATE_RUNNING

    wait_until(f"for {lease_id} to run", running, 60)
    service = Service(lease_id, lease.endpoint_token)

    def answers() -> bool:
        headers = {"Host": f"{lease_id}-8080.relay.localhost"}
        if service.token:
            headers["Authorization"] = f"Bearer {service.token}"
        reply = httpx.get(f"http://127.0.0.1:{stack.relay_port}/", headers=headers, timeout=5)
        return reply.status_code == 200

    wait_until(f"for {lease_id} to answer through the relay", answers, 30)
    return service


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    build_pyservice()
    with running_stack() as stack:
        buyer = _buyer_channel(stack)
        try:
            a = submit_service(stack, buyer, "svc-a")
            b = submit_service(stack, buyer, "svc-b")
            public = submit_service(stack, buyer, "svc-pub", public=True)
            yield World(stack, buyer, a, b, public)
        finally:
            buyer.close()


def test_get_of_50_mb_arrives_whole(world: World) -> None:
    """A 50 MB GET through relay and tunnel: every byte, checksum as the service made it."""
    digest = hashlib.sha256()
    with httpx.stream(
        "GET", world.url(f"/big?n={50 * MB}"), headers=world.auth(world.a), timeout=60
    ) as reply:
        assert reply.status_code == 200
        expected = reply.headers["x-sha256"]
        size = 0
        for piece in reply.iter_bytes():
            digest.update(piece)
            size += len(piece)
    assert size == 50 * MB
    assert digest.hexdigest() == expected


def test_post_of_50_mb_streams_through(world: World) -> None:
    """A 50 MB request body (chunked, never whole in memory) reaches the service intact."""
    body = os.urandom(MB)
    expected = hashlib.sha256(body * 50).hexdigest()

    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield body

    reply = httpx.post(
        world.url("/sha256"), content=chunks(), headers=world.auth(world.a), timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert reply.text == expected


def test_path_form_and_keep_alive(world: World) -> None:
    """The path-based fallback strips its prefix (the app sees /...), and one buyer
    connection carries many requests."""
    with httpx.Client(timeout=10) as client:
        headers = {"Authorization": f"Bearer {world.a.token}"}
        for n in range(3):
            reply = client.get(
                world.url(f"/_lease/{world.a.lease_id}/8080/hello/{n}"), headers=headers
            )
            assert reply.status_code == 200
            assert reply.text == f"hello from /hello/{n}"


def test_server_sent_events_arrive_as_written(world: World) -> None:
    """The first event reaches the buyer while the service still holds the last one back."""
    with httpx.stream(
        "GET", world.url("/events"), headers=world.auth(world.a), timeout=30
    ) as reply:
        assert reply.status_code == 200
        events = reply.iter_text()
        first = next(events)
        assert "data: first" in first and "last" not in first
        go = httpx.get(world.url("/go"), headers=world.auth(world.a), timeout=10)
        assert go.status_code == 200
        rest = "".join(events)
    assert "data: last" in rest


def _ws_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x82])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        assert piece, "connection closed"
        data += piece
    return data


def test_websocket_echo(world: World) -> None:
    """After the 101 the relay is a byte pipe: frames go both ways, many times."""
    with socket.create_connection(("127.0.0.1", world.stack.relay_port), timeout=10) as sock:
        host = world.host(world.a)["Host"]
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {world.a.token}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        for size in (5, 300, 4000):
            payload = os.urandom(size)
            sock.sendall(_ws_frame(payload))
            first = _read_exact(sock, 2)
            length = first[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", _read_exact(sock, 2))[0]
            assert _read_exact(sock, length) == payload


def test_no_wrong_or_other_token_is_401_and_never_reaches_the_service(world: World) -> None:
    """Missing, malformed, wrong and another lease's token: 401 with a Bearer challenge,
    and the service counts no request."""
    before = world.hits(world.a)
    cases = [
        world.host(world.a),
        {**world.host(world.a), "Authorization": "Bearer"},
        {**world.host(world.a), "Authorization": f"Basic {world.a.token}"},
        {**world.host(world.a), "Authorization": "Bearer gsp_wrong"},
        {**world.host(world.a), "Authorization": f"Bearer {world.b.token}"},
        {**world.host(world.a), "Authorization": "Bearer " + "x" * 10000},
    ]
    for headers in cases:
        reply = httpx.get(world.url("/secret"), headers=headers, timeout=10)
        assert reply.status_code == 401, (headers, reply.status_code)
        assert reply.headers["www-authenticate"].startswith("Bearer")
    # The path form checks the same token: b's token does not open a.
    reply = httpx.get(
        world.url(f"/_lease/{world.a.lease_id}/8080/secret"),
        headers={"Authorization": f"Bearer {world.b.token}"},
        timeout=10,
    )
    assert reply.status_code == 401
    # An unknown lease looks the same as a wrong token (ids cannot be probed).
    reply = httpx.get(
        world.url("/"),
        headers={"Host": "nope-8080.relay.localhost", "Authorization": f"Bearer {world.a.token}"},
        timeout=10,
    )
    assert reply.status_code == 401
    # hits counts itself: one more than before, so none of the refused ones arrived.
    assert world.hits(world.a) == before + 1


def test_undeclared_port_is_404_with_the_token(world: World) -> None:
    """A token holder asking for a port the lease did not declare gets 404 at the relay."""
    reply = httpx.get(world.url("/"), headers=world.auth(world.a, port="22"), timeout=10)
    assert reply.status_code == 404


def test_rotated_token_replaces_the_old_one_at_once(world: World) -> None:
    """RotateEndpointToken: the old token is refused from the next request on (the
    in-process relay drops its cache), the new one works, lease show has the new one."""
    stub = leases_pb2_grpc.LeasesStub(world.buyer)
    old = world.b.token
    new = stub.RotateEndpointToken(
        leases_pb2.RotateEndpointTokenRequest(lease_id=world.b.lease_id), timeout=10
    ).token
    assert new.startswith("gsp_") and new != old
    world.b.token = new
    shown = stub.Get(leases_pb2.GetLeaseRequest(lease_id=world.b.lease_id), timeout=10)
    assert shown.endpoint_token == new
    refused = httpx.get(
        world.url("/"),
        headers={**world.host(world.b), "Authorization": f"Bearer {old}"},
        timeout=10,
    )
    assert refused.status_code == 401
    assert httpx.get(world.url("/"), headers=world.auth(world.b), timeout=10).status_code == 200


def test_a_public_lease_needs_no_token(world: World) -> None:
    """public: true opts out of endpoint authentication (and any Authorization header
    reaches the service untouched)."""
    reply = httpx.get(world.url("/open"), headers=world.host(world.public), timeout=10)
    assert (reply.status_code, reply.text) == (200, "hello from /open")


def test_only_the_buyer_sees_the_token(world: World) -> None:
    """An admin reading the buyer's lease gets no endpoint token (the provider's view
    clears even more; only the buyer's own account reads it)."""
    admin = leases_pb2_grpc.LeasesStub(world.stack.channel)
    shown = admin.Get(leases_pb2.GetLeaseRequest(lease_id=world.a.lease_id), timeout=10)
    assert shown.endpoint_token == "", "not even an admin acting for the buyer sees it"


def test_lease_url_prints_one_url_for_scripts(world: World) -> None:
    """`gpu-scheduler lease url ID [PORT]`: one line, the relay's host-form URL; an
    undeclared port is an error naming the ports there are."""
    import subprocess

    from benchmarks.agent_stack import BIN

    stub = acl_pb2_grpc.AclStub(world.stack.channel)
    token = stub.CreateToken(acl_pb2.CreateTokenRequest(account="carol")).secret
    env = {**os.environ, "GPU_SCHEDULER_TOKEN": token}
    argv = [str(BIN / "gpu-scheduler"), "-c", str(world.stack.sched_cfg), "lease", "url"]
    out = subprocess.run(
        [*argv, world.a.lease_id], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"http://svc-a-8080.relay.localhost:{world.stack.relay_port}/\n"
    bad = subprocess.run(
        [*argv, world.a.lease_id, "9999"], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode == 1 and "declares no port '9999' (it has 8080)" in bad.stderr


def test_tcp_port_with_a_token_handshake(world: World) -> None:
    """The TCP listener: a wrong token is ERR 401 and closed, the right one OK and then
    raw bytes both ways (here an HTTP request the service answers)."""
    port = world.stack.relay_tcp_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"RELAY1 {world.a.lease_id} 8080 gsp_wrong\n".encode())
        assert sock.makefile("rb").readline().startswith(b"ERR 401")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"RELAY1 {world.a.lease_id} 8080 {world.a.token}\n".encode())
        reader = sock.makefile("rb")
        assert reader.readline() == b"OK\n"
        sock.sendall(b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = reader.read()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from /tcp")


def test_not_ready_is_503_until_the_health_check_passes(world: World) -> None:
    """With a readiness check (the lease side's health monitor), the relay answers 503
    while it fails, and the service once it passes; lease show's endpoint says so and
    carries the relay URL."""
    stub = leases_pb2_grpc.LeasesStub(world.buyer)
    lease = stub.Submit(
        leases_pb2.SubmitLeaseRequest(
            spec=leases_pb2.LeaseSpec(
                image="gpu-agent-test/pyservice:latest",
                gpu_count=1,
                cpus=0.1,
                memory_bytes=128 * MB,
                max_duration_seconds=3600,
                env={"READY_AFTER": "6"},
                ports=[leases_pb2.PortSpec(container_port=8080, protocol="http", name="api")],
                health=leases_pb2.HealthCheck(path="/ready", port="api", period=0.5, timeout=0.4),
            ),
            idempotency_key="svc-ready",
        ),
        timeout=10,
    )
    service = Service("svc-ready", lease.endpoint_token)

    def running() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id="svc-ready"), timeout=5)
        return got.state == common_pb2.LEASE_STATE_RUNNING

    wait_until("for svc-ready to run", running, 60)
    early = httpx.get(world.url("/"), headers=world.auth(service, port="api"), timeout=10)
    assert early.status_code == 503 and "not ready" in early.text
    shown = stub.Get(leases_pb2.GetLeaseRequest(lease_id="svc-ready"), timeout=5)
    assert [e.ready for e in shown.endpoints] in ([], [False])

    def answers() -> bool:
        reply = httpx.get(world.url("/"), headers=world.auth(service, port="api"), timeout=10)
        return reply.status_code == 200

    wait_until("for svc-ready to turn ready", answers, 40)

    def reported_ready() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id="svc-ready"), timeout=5)
        return [e.ready for e in got.endpoints] == [True]

    wait_until("for the endpoint to be reported ready", reported_ready, 20)
    shown = stub.Get(leases_pb2.GetLeaseRequest(lease_id="svc-ready"), timeout=5)
    port = world.stack.relay_port
    assert shown.endpoints[0].url == f"http://svc-ready-api.relay.localhost:{port}/"
