"""Direct mode end to end: a real `gpu-scheduler serve`, a real `gpu-agent run` with
``services.mode: direct`` on a 127.x.y.z advertise address, the pyservice image in real
Docker. The coordinator sends the token hash in LeaseAssign and shows the agent's
address as the lease's URL; a rotated token reaches the agent.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator

import grpc
import httpx
import pytest

from benchmarks.agent_stack import BIN, Stack, running_stack, wait_until
from gpuagent.v1 import acl_pb2, acl_pb2_grpc, leases_pb2, leases_pb2_grpc
from tests.images.pyservice import build_pyservice
from tests.test_relay_e2e import MB, _buyer_channel, _read_exact, _ws_frame, submit_service

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

ADDRESS = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.9"
LOW = 40000 + secrets.randbelow(200) * 100


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Stack, grpc.Channel]]:
    build_pyservice()
    services = {
        "mode": "direct",
        "advertise_address": ADDRESS,
        "port_range": f"{LOW}-{LOW + 9}",
        "insecure_http": True,
    }
    with running_stack(agent_services=services) as running:
        buyer = _buyer_channel(running)
        try:
            yield running, buyer
        finally:
            buyer.close()


def test_lease_show_and_url_give_the_direct_address_and_the_token_guards_it(
    stack: tuple[Stack, grpc.Channel],
) -> None:
    """The endpoint's URL is http://ADDRESS:port/ from the range (not the relay's); there a
    request with the token is 200, without it 401; `lease url` prints the same URL;
    after rotate-token the old token is 401 at the agent and the new one 200."""
    running, buyer = stack
    service = submit_service(running, buyer, "direct-e2e")
    stub = leases_pb2_grpc.LeasesStub(buyer)

    def direct_url() -> str:
        lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id=service.lease_id), timeout=5)
        urls = [e.url for e in lease.endpoints if e.direct_address]
        return urls[0] if urls else ""

    wait_until("for the direct URL in lease show", lambda: bool(direct_url()), 30)
    url = direct_url()
    assert url.startswith(f"http://{ADDRESS}:") and url.endswith("/"), url
    assert LOW <= int(url.rsplit(":", 1)[1].rstrip("/")) <= LOW + 9

    def status(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url, headers=headers, timeout=10).status_code

    wait_until("for the direct endpoint to answer", lambda: status(service.token) == 200, 30)
    assert status("") == 401
    assert status("gsp_wrong") == 401

    acl = acl_pb2_grpc.AclStub(running.channel)
    secret = acl.CreateToken(acl_pb2.CreateTokenRequest(account="carol")).secret
    env = {**os.environ, "GPU_SCHEDULER_TOKEN": secret}
    argv = [str(BIN / "gpu-scheduler"), "-c", str(running.sched_cfg), "lease", "url"]
    out = subprocess.run(
        [*argv, service.lease_id], capture_output=True, text=True, env=env, timeout=60
    )
    assert (out.returncode, out.stdout) == (0, url + "\n"), out.stderr

    new = stub.RotateEndpointToken(
        leases_pb2.RotateEndpointTokenRequest(lease_id=service.lease_id), timeout=10
    ).token
    assert new.startswith("gsp_") and new != service.token
    wait_until("for the new token to work at the agent", lambda: status(new) == 200, 20)
    assert status(service.token) == 401


def test_bodies_stream_events_arrive_as_written_and_websockets_work_direct(
    stack: tuple[Stack, grpc.Channel],
) -> None:
    """Through the agent's own listener: a 20 MB chunked upload and a 20 MB download
    arrive with matching checksums, the first server-sent event arrives before the
    last is written, and a WebSocket echoes after the 101."""
    running, buyer = stack
    service = submit_service(running, buyer, "direct-stream")
    stub = leases_pb2_grpc.LeasesStub(buyer)

    def direct() -> str:
        lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id=service.lease_id), timeout=5)
        return next((e.direct_address for e in lease.endpoints if e.direct_address), "")

    wait_until("for the direct address", lambda: bool(direct()), 30)
    base = f"http://{direct()}"
    auth = {"Authorization": f"Bearer {service.token}"}
    wait_until(
        "for the direct endpoint",
        lambda: httpx.get(base + "/", headers=auth, timeout=5).status_code == 200,
        30,
    )

    body = os.urandom(MB)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield body

    reply = httpx.post(base + "/sha256", content=chunks(), headers=auth, timeout=60)
    assert (reply.status_code, reply.text) == (200, hashlib.sha256(body * 20).hexdigest())

    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", f"{base}/big?n={20 * MB}", headers=auth, timeout=60) as down:
        assert down.status_code == 200
        expected = down.headers["x-sha256"]
        for piece in down.iter_bytes():
            digest.update(piece)
            size += len(piece)
    assert (size, digest.hexdigest()) == (20 * MB, expected)

    with httpx.stream("GET", base + "/events", headers=auth, timeout=30) as events:
        assert events.status_code == 200
        texts = events.iter_text()
        first = next(texts)
        assert "data: first" in first and "last" not in first
        assert httpx.get(base + "/go", headers=auth, timeout=10).status_code == 200
        assert "data: last" in "".join(texts)

    host, port = direct().rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {service.token}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        for n in (5, 300, 4000):
            payload = os.urandom(n)
            sock.sendall(_ws_frame(payload))
            first_bytes = _read_exact(sock, 2)
            length = first_bytes[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", _read_exact(sock, 2))[0]
            assert _read_exact(sock, length) == payload


def test_a_token_rotated_while_the_agent_was_down_is_revoked_when_it_returns(
    stack: tuple[Stack, grpc.Channel],
) -> None:
    """kill -9 the agent, rotate the token, start the agent again: it re-adopts the
    service on the same port, and once connected the coordinator re-sends the hash, so
    the new token is 200 there and the revoked one 401."""
    running, buyer = stack
    service = submit_service(running, buyer, "direct-revoke")
    stub = leases_pb2_grpc.LeasesStub(buyer)

    def direct() -> str:
        lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id=service.lease_id), timeout=5)
        return next((e.direct_address for e in lease.endpoints if e.direct_address), "")

    wait_until("for the direct address", lambda: bool(direct()), 30)
    address = direct()

    def status(token: str) -> int:
        try:
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.get(f"http://{address}/", headers=headers, timeout=5).status_code
        except httpx.TransportError:
            return 0  # the agent is down

    wait_until("for the direct endpoint", lambda: status(service.token) == 200, 30)
    agent = running.procs["agent"]
    agent.kill()
    agent.wait(30)
    new = stub.RotateEndpointToken(
        leases_pb2.RotateEndpointTokenRequest(lease_id=service.lease_id), timeout=10
    ).token
    running._start("agent", [str(BIN / "gpu-agent"), "-c", str(running.agent_cfg), "run"])
    wait_until("for the new token at the restarted agent", lambda: status(new) == 200, 90)
    assert status(service.token) == 401
    assert direct() == address  # the same host port after the restart
