"""Direct mode (``services.mode: direct``): the agent serves a service lease's ports on
its advertise address itself, behind the endpoint token, on ports it keeps across a
restart. Real Docker, a busybox httpd lease, a 127.0.0.x advertise address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import secrets
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent import cli
from agent.config import ServicesConfig
from agent.direct.ports import PortBook, PortsExhausted
from agent.direct.publisher import DirectModeError, DirectPublisher, check_advertise_address
from agent.leases import LeaseState, StateDB
from agent.leases.endpoints import ServiceTarget
from tests.test_lease_docker import LeaseEnv, lease_env, lease_env_factory
from tests.test_lease_services import exec_in, until

__all__ = ["lease_env", "lease_env_factory"]

TOKEN = "gsp_" + secrets.token_urlsafe(32)
HASH = hashlib.sha256(TOKEN.encode()).digest()
# Two servers in one container: http on 8080 (health file /health), a tcp port on 8081.
SERVER = (
    "mkdir -p /scratch/www; echo hello > /scratch/www/index.html; "
    "httpd -p 8081 -h /scratch/www; exec httpd -f -p 8080 -h /scratch/www"
)
PORTS = [
    {"container_port": 8080, "protocol": "http", "name": "web"},
    {"container_port": 8081, "protocol": "tcp", "name": "raw"},
]
FAST = {"path": "/health", "period": 0.3, "timeout": 0.25, "failure_threshold": 2}


def _address() -> ipaddress.IPv4Address:
    """A loopback address of its own per test (every 127/8 address is this host's)."""
    return ipaddress.IPv4Address(f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.7")


def _services(address: ipaddress.IPv4Address, **extra: Any) -> ServicesConfig:
    low = 20000 + secrets.randbelow(400) * 100
    return ServicesConfig.model_validate(
        {
            "mode": "direct",
            "advertise_address": str(address),
            "port_range": f"{low}-{low + 9}",
            "insecure_http": True,
            **extra,
        }
    )


def _direct(env: LeaseEnv, lease_id: str, name: str) -> str:
    """The direct address the lease's latest update reported for port ``name``."""
    for update in reversed([u for u in env.updates if u.lease_id == lease_id]):
        for endpoint in update.endpoints:
            if endpoint.name == name and endpoint.direct_address:
                return endpoint.direct_address
    return ""


async def _tcp_handshake(address: str, line: str) -> tuple[bytes, bytes]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(line.encode())
        answer = await asyncio.wait_for(reader.readline(), 10)
        rest = b""
        if answer == b"OK\n":
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            rest = await asyncio.wait_for(reader.read(), 10)
        return answer, rest
    finally:
        writer.close()


# -- configuration ------------------------------------------------------------------


def test_an_address_this_host_does_not_have_is_refused_with_the_key_named(
    tmp_path: Path,
) -> None:
    """192.0.2.x (TEST-NET-1) is on no interface here: the publisher refuses to start and
    says which key and why; a loopback address passes the same check."""
    config = ServicesConfig.model_validate(
        {
            "mode": "direct",
            "advertise_address": "192.0.2.77",
            "cert_file": str(tmp_path / "c.pem"),
            "key_file": str(tmp_path / "k.pem"),
        }
    )
    with pytest.raises(DirectModeError, match=r"services.advertise_address 192.0.2.77: not an"):
        DirectPublisher(config, tmp_path, _NoTargets())
    check_advertise_address(ipaddress.IPv4Address("127.0.0.9"))


def test_direct_mode_config_refuses_what_would_leak_tokens_or_bind_everything() -> None:
    """0.0.0.0 / :: are refused, as is plain HTTP off loopback, a missing address, and a
    malformed or inverted port range."""
    bad: list[dict[str, Any]] = [
        {"mode": "direct", "advertise_address": "0.0.0.0", "insecure_http": True},
        {"mode": "direct", "advertise_address": "::", "insecure_http": True},
        {"mode": "direct", "advertise_address": "10.1.2.3", "insecure_http": True},
        {"mode": "direct", "advertise_address": "10.1.2.3"},  # no TLS at all
        {"mode": "direct", "insecure_http": True},
        {"port_range": "30999-30000"},
        {"port_range": "80-90"},
        {"port_range": "abc"},
    ]
    for fields in bad:
        with pytest.raises(ValueError, match=r"."):
            ServicesConfig.model_validate(fields)


class _NoTargets:
    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        return None


# -- the port book --------------------------------------------------------------------


def test_port_book_keeps_ports_across_a_restart_and_never_hands_one_out_twice(
    tmp_path: Path,
) -> None:
    """Allocations survive a new PortBook over the same file; a port held by a lease is
    not given to another; a port something else holds is skipped; the range running
    out is an error naming the range; a released lease's ports come free again."""
    address = ipaddress.IPv4Address("127.0.0.1")
    busy = {30001}
    book = PortBook(tmp_path, address, range(30000, 30004), free=lambda a, p: p not in busy)
    assert book.allocate("a", ["web", "raw"]) == {"web": 30000, "raw": 30002}
    book.set_token("a", HASH)
    again = PortBook(tmp_path, address, range(30000, 30004), free=lambda a, p: True)
    assert again.allocate("a", ["web", "raw"]) == {"web": 30000, "raw": 30002}
    assert again.token("a") == HASH
    assert again.allocate("b", ["x"]) == {"x": 30001}
    assert again.allocate("c", ["y"]) == {"y": 30003}
    with pytest.raises(PortsExhausted, match="30000-30003"):
        again.allocate("d", ["z"])
    again.release("a")
    assert again.allocate("d", ["z"]) == {"z": 30000}
    assert again.retain(["d"]) == ["b", "c"]
    assert json.loads((tmp_path / "direct-ports.json").read_text())["leases"].keys() == {"d"}


def test_a_torn_port_book_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "direct-ports.json").write_text('{"leases": {"a": {"ports": {"web": ')
    book = PortBook(tmp_path, ipaddress.IPv4Address("127.0.0.1"), range(30000, 30002))
    assert book.ports("a") == {}


# -- real Docker ----------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.asyncio
async def test_a_direct_service_is_reached_with_its_token_and_survives_an_agent_restart(
    lease_env: LeaseEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service lease on a direct-mode agent: its endpoints report 127.0.0.x:port; a GET
    there with the token is 200, without it or with another 401, before readiness 503;
    the port is bound on that address only; the tcp port takes the relay's handshake.
    The agent dies and a new one re-adopts the lease on the same ports with the same
    token. Cancelled, the listeners close and the ports are free."""
    address = _address()
    services = _services(address)
    first = lease_env.manager()
    first.publisher = publisher = DirectPublisher(services, lease_env.state_dir, first)
    first_task = await lease_env.start(first)
    await first.assign(
        "direct-1",
        lease_env.spec(SERVER, ports=PORTS, health=FAST),
    )
    publisher.set_token("direct-1", HASH)
    running = await lease_env.wait_state("direct-1", LeaseState.RUNNING)
    web = _direct(lease_env, "direct-1", "web")
    raw = _direct(lease_env, "direct-1", "raw")
    assert web.startswith(f"{address}:") and raw.startswith(f"{address}:") and web != raw
    assert int(web.rsplit(":", 1)[1]) in services.ports()

    async with httpx.AsyncClient(timeout=10) as http:
        # Not ready yet (no /health): 503 from the agent, with the token.
        reply = await http.get(f"http://{web}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 503
        exec_in(lease_env, running, "touch /scratch/www/health")
        await until(
            lease_env,
            "ready",
            lambda: (t := first.service_target("direct-1", "web")) is not None and t.ready,
        )
        ok = await http.get(f"http://{web}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert (ok.status_code, ok.text) == (200, "hello\n")
        none = await http.get(f"http://{web}/")
        assert none.status_code == 401 and "Bearer" in none.headers["www-authenticate"]
        wrong = await http.get(f"http://{web}/", headers={"Authorization": "Bearer gsp_nope"})
        assert wrong.status_code == 401
        basic = await http.get(f"http://{web}/", headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401

    # Only 127.0.0.x is bound: the same port on another loopback address is closed.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(web.split(":")[1])), 2):
        pass

    assert await _tcp_handshake(raw, "RELAY1 direct-1 raw gsp_nope\n") == (
        b"ERR 401 endpoint token missing or wrong\n",
        b"",
    )
    answer, body = await _tcp_handshake(raw, f"RELAY1 direct-1 raw {TOKEN}\n")
    assert answer == b"OK\n" and body.startswith(b"HTTP/1.1 200") and body.endswith(b"hello\n")

    # The agent dies: listeners go with its process; the lease keeps running.
    first_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    await publisher.close()
    lease_env.runs.clear()
    lease_env.updates.clear()

    second = lease_env.manager()
    second.publisher = republished = DirectPublisher(services, lease_env.state_dir, second)
    await lease_env.start(second)
    await until(
        lease_env,
        "ready after re-adoption",
        lambda: (t := second.service_target("direct-1", "web")) is not None and t.ready,
    )
    await until(
        lease_env, "an endpoint report", lambda: bool(_direct(lease_env, "direct-1", "web"))
    )
    assert _direct(lease_env, "direct-1", "web") == web
    assert _direct(lease_env, "direct-1", "raw") == raw
    async with httpx.AsyncClient(timeout=10) as http:
        ok = await http.get(f"http://{web}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert (await http.get(f"http://{web}/")).status_code == 401

    # `gpu-agent leases` shows the direct address from the state DB.
    config = lease_env.state_dir / "agent.yaml"
    config.write_text(json.dumps({"node": {"state_dir": str(lease_env.state_dir)}}))
    await until(
        lease_env,
        "the endpoint stored with its address",
        lambda: (
            (r := StateDB.in_state_dir(lease_env.state_dir).get("direct-1")) is not None
            and any(e.get("direct_address") == web for e in r.extra.get("endpoints", []))
        ),
    )
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["-c", str(config), "leases"]) == 0
    assert f"direct {web}" in capsys.readouterr().out

    await second.cancel("direct-1")
    await lease_env.wait_state("direct-1", LeaseState.CANCELLED)
    host, port = web.rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), 2):
        pass
    assert republished.book.ports("direct-1") == {}
