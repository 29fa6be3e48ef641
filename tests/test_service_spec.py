"""Service lease specs and reporting: hostile ports/restart/health values refused with the
key named, at the agent and at submit (one rules module, gpuagent/leaserules.py); the
restart decision and its backoff; the health monitor against a real loopback server;
endpoints stored by the real scheduler and shown by `gpu-scheduler lease show`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from agent.leases import restarts
from agent.leases.health import ServiceMonitor, http_check
from agent.leases.spec import LeaseRejected, RejectCode, parse_spec
from gpuagent import leaserules
from gpuagent.v1 import common_pb2 as S
from gpuagent.v1 import leases_pb2
from scheduler import cli
from scheduler.cmd_leases import LeaseFile
from tests.coordinator_harness import until
from tests.test_scheduler_leases import Env, accept, make_env

HTTP = {"container_port": 8080, "protocol": "http", "name": "web"}

# (spec fields, the key the refusal must name). Each is refused by the agent and at submit.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"ports": [{"container_port": 1000 + i} for i in range(17)]}, "ports"),
    ({"ports": [{"container_port": 80, "name": "Web"}]}, "ports[0].name"),
    ({"ports": [{"container_port": 80, "name": "-web"}]}, "ports[0].name"),
    ({"ports": [{"container_port": 80, "name": "a" * 16}]}, "ports[0].name"),
    ({"ports": [{"container_port": 80, "name": "web.x"}]}, "ports[0].name"),
    ({"ports": [{"container_port": 80, "name": "81"}]}, "ports[0].name"),
    ({"ports": [HTTP, {**HTTP, "container_port": 9090}]}, "ports[1].name"),
    ({"ports": [HTTP, {"container_port": 8080, "name": "b"}]}, "ports[1].container_port"),
    ({"ports": [{"container_port": 80, "protocol": "sctp"}]}, "ports[0].protocol"),
    ({"restart": "sometimes"}, "restart"),
    ({"restart": "never", "max_restarts": 3}, "max_restarts"),
    ({"restart": "always", "max_restarts": 1001}, "max_restarts"),
    ({"ports": [HTTP], "health": {"path": "health"}}, "health.path"),
    ({"ports": [HTTP], "health": {"path": "/a b"}}, "health.path"),
    ({"ports": [HTTP], "health": {"path": "/\r\nHost: evil"}}, "health.path"),
    ({"ports": [HTTP], "health": {"path": "/" + "a" * 1024}}, "health.path"),
    ({"ports": [HTTP], "health": {"port": "9999"}}, "health.port"),
    ({"ports": [{"container_port": 22, "name": "ssh"}], "health": {"port": "ssh"}}, "health.port"),
    ({"ports": [{"container_port": 22}], "health": {}}, "health.port"),
    ({"health": {}}, "health.port"),
    ({"ports": [HTTP], "health": {"period": 0.01}}, "health.period"),
    ({"ports": [HTTP], "health": {"period": 1e308}}, "health.period"),
    ({"ports": [HTTP], "health": {"period": -1}}, "health.period"),
    ({"ports": [HTTP], "health": {"period": float("nan")}}, "health.period"),
    ({"ports": [HTTP], "health": {"timeout": float("inf")}}, "health.timeout"),
    ({"ports": [HTTP], "health": {"startup_grace": float("-inf")}}, "health.startup_grace"),
    ({"ports": [HTTP], "health": {"timeout": 20, "period": 10}}, "health.timeout"),
    ({"ports": [HTTP], "health": {"failure_threshold": 5000}}, "health.failure_threshold"),
    ({"ports": [HTTP], "health": {"initial_delay": 10**9}}, "health.initial_delay"),
    ({"ports": [HTTP], "health": {"startup_grace": 0.5}}, "health.startup_grace"),
]


@pytest.mark.parametrize(("fields", "key"), HOSTILE)
def test_agent_refuses_hostile_service_values_naming_the_key(
    fields: dict[str, Any], key: str
) -> None:
    with pytest.raises(LeaseRejected) as info:
        parse_spec({"image": "busybox", **fields})
    assert info.value.rejection.code is RejectCode.INVALID_SPEC
    assert info.value.rejection.message.startswith(f"{key}: "), info.value.rejection.message


def test_agent_accepts_a_service_spec_and_fills_defaults() -> None:
    spec = parse_spec(
        {
            "image": "busybox",
            "ports": [HTTP, {"container_port": 9000}, {"container_port": 53, "protocol": "udp"}],
            "restart": "on-failure",
            "health": {"path": "/healthz"},
        }
    )
    assert [p.name for p in spec.ports] == ["web", "9000", "53"]
    assert spec.restart_policy() == ("on-failure", leaserules.DEFAULT_MAX_RESTARTS)
    health = spec.health_check()
    assert health == leaserules.Health("/healthz", "web", 0.0, 10.0, 5.0, 3, 300.0)
    # Stored in the state DB and read back: the same spec.
    assert parse_spec(spec.stored()).health_check() == health
    assert parse_spec({"image": "busybox"}).health_check() is None


def test_restart_decisions_and_backoff() -> None:
    """never/on-failure/always, the streak bound, a stable run resetting it, bounded backoff."""
    crash = restarts.Exit(exit_code=2, oom_killed=False, ran_for=3.0, reason="exited 2")
    clean = restarts.Exit(exit_code=0, oom_killed=False, ran_for=3.0, reason="")
    assert restarts.decide("never", 0, crash, {}) is None
    assert restarts.decide("on-failure", 5, clean, {}) is None
    first = restarts.decide("on-failure", 5, crash, {})
    assert first == restarts.Decision(True, 1.0, "exited 2", 1, 1)
    third = restarts.decide("always", 5, clean, {"restarts": 7, "restart_streak": 2})
    assert third is not None and third.restart and third.delay == 4.0 and third.restarts == 8
    done = restarts.decide("on-failure", 2, crash, {"restarts": 2, "restart_streak": 2})
    assert done is not None and not done.restart
    assert done.reason == "restarted 2 times in a row (max_restarts 2); last exit: exited 2"
    stable = restarts.Exit(2, False, leaserules.STABLE_AFTER_S, "exited 2")
    fresh = restarts.decide("on-failure", 2, stable, {"restarts": 9, "restart_streak": 2})
    assert fresh == restarts.Decision(True, 1.0, "exited 2", 10, 1)
    # A liveness kill fails even when the server exits 0 on the SIGTERM.
    liveness = {"liveness_kill": "health check failed 3 times"}
    killed = restarts.decide("never", 0, clean, liveness)
    assert killed is not None and not killed.restart and "liveness check failed" in killed.reason
    again = restarts.decide("on-failure", 5, clean, liveness)
    assert again is not None and again.restart
    assert [leaserules.restart_backoff(n) for n in (1, 2, 3, 9, 10, 10**6)] == [
        1.0, 2.0, 4.0, 256.0, leaserules.BACKOFF_MAX_S, leaserules.BACKOFF_MAX_S,
    ]  # fmt: skip


class Switchable:
    """A loopback HTTP server whose /health answers 200 or 503 as the test says."""

    def __init__(self) -> None:
        self.healthy = False
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readline())
        status = b"200 OK" if self.healthy else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


@pytest.mark.asyncio
async def test_monitor_startup_readiness_and_liveness_on_a_real_server() -> None:
    """Startup failures do not count; readiness follows each check; failure_threshold
    consecutive failures after startup fail liveness; a closed port is not ready."""
    server = Switchable()
    port = await server.start()
    ports = [leaserules.Port("web", port, "http"), leaserules.Port("side", 1, "tcp")]
    health = leaserules.check_health(
        leaserules.Health(path="/health", period=0.2, timeout=0.2, failure_threshold=3), ports
    )
    changes: list[int] = []
    verdicts: asyncio.Queue[str] = asyncio.Queue()

    async def failed(why: str) -> None:
        await verdicts.put(why)

    monitor = ServiceMonitor("l-1", "127.0.0.1", ports, health, lambda: changes.append(1), failed)
    task = asyncio.create_task(monitor.run())
    try:
        # Several failures in startup: not counted.
        await until(lambda: len(server.requests) >= 4, what="startup checks")
        assert not monitor.ready("web") and monitor.failures == 0 and verdicts.empty()
        assert server.requests[0] == b"GET /health HTTP/1.1\r\n"
        server.healthy = True
        await until(lambda: monitor.ready("web"), what="ready")
        side = next(s for s in monitor.statuses(0) if s.name == "side")
        assert not side.ready and side.last_result.startswith("connection failed")
        server.healthy = False
        why = await asyncio.wait_for(verdicts.get(), 5)
        assert "failed 3 times in a row: HTTP 503" in why
        assert not monitor.ready("web") and changes
        await asyncio.wait_for(task, 1)  # the monitor ends with its verdict
    finally:
        task.cancel()
        assert server.server is not None
        server.server.close()


@pytest.mark.asyncio
async def test_http_check_bounds_a_server_that_never_answers() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert await http_check("127.0.0.1", port, "/", 0.2) == (False, "no answer within 0.2s")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# -- the scheduler ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


def _proto_spec(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "ports" in out:
        out["ports"] = [leases_pb2.PortSpec(**p) for p in out["ports"]]
    if "health" in out:
        out["health"] = leases_pb2.HealthCheck(**out["health"])
    return out


@pytest.mark.asyncio
async def test_submit_refuses_hostile_service_values_naming_the_key(env: Env) -> None:
    """The same cases as the agent's, at Submit: INVALID_ARGUMENT naming spec.<key>."""
    for fields, key in HOSTILE:
        try:
            spec = _proto_spec(fields)
        except ValueError:
            continue  # not expressible in the proto (a negative uint): refused by protobuf
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.submit(**spec)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, key
        assert (info.value.details() or "").startswith(f"spec.{key}: "), info.value.details()
    listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
    assert list(listed.leases) == []


async def run_cli(env: Env, *argv: str) -> int:
    conn = ["--address", f"127.0.0.1:{env.server.port}", "--insecure", "--token", env.token]
    return await asyncio.to_thread(cli.main, [argv[0], *argv[1:], *conn])


@pytest.mark.asyncio
async def test_endpoints_are_stored_and_shown(
    env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A YAML service lease goes through submit with its ports, restart and health; the
    endpoints of the latest update are returned by Get (url: the relay's, never what the
    agent sent), printed by `lease show` and carried by `--json`; a same-state update adds no
    history event."""
    agent = await env.agent("a", accept)
    spec_file = tmp_path / "svc.yaml"
    spec_file.write_text(
        "image: busybox\nports:\n  - {container_port: 8080, protocol: http, name: web}\n"
        "restart: on-failure\nmax_restarts: 3\n"
        "health: {path: /healthz, period: 2s, startup_grace: 10m}\n"
    )
    assert await run_cli(env, "submit", str(spec_file), "--idempotency-key", "svc-1") == 0
    capsys.readouterr()
    await env.wait_state("svc-1", S.LEASE_STATE_ASSIGNED)
    sent = agent.assigns[0].spec
    assert sent.restart == "on-failure" and sent.max_restarts == 3
    assert sent.health.path == "/healthz" and sent.health.startup_grace == 600.0
    assert sent.ports[0].name == "web" and sent.ports[0].protocol == "http"

    endpoint = leases_pb2.Endpoint(
        name="web", protocol="http", container_port=8080, ready=False, url="http://evil"
    )
    await agent.update("svc-1", S.LEASE_STATE_RUNNING, endpoints=[endpoint])
    await env.wait_state("svc-1", S.LEASE_STATE_RUNNING)
    ready = leases_pb2.Endpoint(
        name="web",
        protocol="http",
        container_port=8080,
        ready=True,
        last_check_unix_nanos=1_700_000_000 * 10**9,
        last_result="ok",
        restarts=2,
    )
    seq = await agent.update("svc-1", S.LEASE_STATE_RUNNING, endpoints=[ready], restarts=2)
    for _ in range(100):
        lease = await env.get("svc-1")
        if lease.endpoints and lease.endpoints[0].ready:
            break
        await asyncio.sleep(0.05)
    assert (seq, lease.restarts) == (agent.seq["svc-1"], 2)
    assert env.server.relay is not None
    url = f"http://svc-1-web.relay.localhost:{env.server.relay.port}/"
    assert [(e.name, e.ready, e.restarts, e.url) for e in lease.endpoints] == [
        ("web", True, 2, url)
    ]
    assert [e.state for e in lease.events].count(S.LEASE_STATE_RUNNING) == 1

    assert await run_cli(env, "lease", "show", "svc-1") == 0
    shown = capsys.readouterr().out
    assert "restart:     on-failure, 2 restart(s) so far" in shown
    block = shown.split("endpoints:\n", 1)[1].splitlines()[0]
    assert block.split() == [
        "web", "http/8080", url, "ready", "last", "check", "2023-11-14", "22:13:20", "(ok)",
        "restarts", "2",
    ]  # fmt: skip

    assert await run_cli(env, "lease", "show", "svc-1", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["endpoints"][0]["ready"] is True and data["restarts"] == 2


def test_lease_file_refuses_bad_service_keys() -> None:
    with pytest.raises(ValueError, match="restart"):
        LeaseFile.model_validate({"image": "x", "restart": "sometimes"})
    with pytest.raises(ValueError, match="ports"):
        LeaseFile.model_validate({"image": "x", "ports": [{"container_port": 1}] * 17})


@pytest.mark.asyncio
async def test_an_agent_sending_too_many_endpoints_is_clipped_not_stored_whole(env: Env) -> None:
    """An agent (buggy or hostile) reporting 100 endpoints with 4 KiB results: the lease
    keeps running with the first 16 (one per possible port), results clipped to 256."""
    agent = await env.agent("a", accept)
    lease = await env.submit()
    await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    flood = [
        leases_pb2.Endpoint(
            name=f"p{i}", protocol="tcp", container_port=i + 1, last_result="x" * 4000
        )
        for i in range(100)
    ]
    await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING, endpoints=flood, restarts=1)
    shown = await env.wait_state(lease.lease_id, S.LEASE_STATE_RUNNING)
    assert len(shown.endpoints) == leaserules.MAX_PORTS
    assert [e.name for e in shown.endpoints][:2] == ["p0", "p1"]
    assert all(len(e.last_result) <= 256 for e in shown.endpoints)
