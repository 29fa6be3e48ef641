"""Service leases against the real Docker Engine: health checks, readiness, restarts.

The server is busybox httpd serving ``/scratch/www``; its health is a file there
(``/health``), created and removed with ``docker exec``, so each test decides when
the check passes. ``/scratch/n`` counts container starts, so a script can behave
differently after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent import cli
from agent.leases import LeaseManager, LeaseState, LeaseUpdate, StateDB
from agent.leases.endpoints import ServiceTarget
from agent.metrics.agent_metrics import AgentMetrics
from tests.test_lease_docker import LeaseEnv, lease_env, lease_env_factory

__all__ = ["lease_env", "lease_env_factory"]

pytestmark = pytest.mark.docker

WAIT = 30.0
# Counts starts in /scratch/n; ``$1`` runs before httpd with the start number in $n.
SERVER = (
    "n=$(cat /scratch/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /scratch/n; "
    "mkdir -p /scratch/www; {before} exec httpd -f -p 8080 -h /scratch/www"
)
PORTS = [{"container_port": 8080, "protocol": "http", "name": "web"}]
FAST = {"path": "/health", "period": 0.3, "timeout": 0.25, "failure_threshold": 2}


def service(env: LeaseEnv, before: str = "", **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": PORTS, "health": FAST, **fields}
    return env.spec(SERVER.format(before=before), **spec)


def exec_in(env: LeaseEnv, update: LeaseUpdate, command: str) -> None:
    result = env.client.containers.get(update.container_id).exec_run(["sh", "-c", command])
    assert result.exit_code == 0, result.output


async def until(env: LeaseEnv, what: str, check: Callable[[], bool], limit: float = WAIT) -> None:
    """Wait for ``check`` to hold, re-tested at each lease update (and at least each 0.1 s:
    readiness is also read from the manager, which changes between updates)."""
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        async with env._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(env._changed.wait(), 0.1)


def web(env: LeaseEnv, lease_id: str) -> list[Any]:
    """The 'web' endpoint in each update of the lease, oldest first."""
    return [
        e for u in env.updates if u.lease_id == lease_id for e in u.endpoints if e.name == "web"
    ]


def restarted(env: LeaseEnv, lease_id: str, count: int) -> bool:
    """Whether an update reported ``count`` restarts (updates arrive after ``assign``)."""
    return any(u.restarts == count for u in env.updates if u.lease_id == lease_id)


def target(manager: LeaseManager, lease_id: str) -> ServiceTarget:
    found = manager.service_target(lease_id, "web")
    assert found is not None
    return found


@pytest.mark.asyncio
async def test_endpoint_not_ready_until_health_passes_then_liveness_restart(
    lease_env: LeaseEnv,
) -> None:
    """Before the health file exists the endpoint is ready: false (reported and through
    service_target); once it exists it turns ready; removed, the check fails past the
    threshold and the container is restarted (same container, restarts 1, same billing
    start), after which the restarted server (which makes the file) is ready again."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    # From the second start on the server is healthy by itself.
    await manager.assign(
        "svc-1",
        service(lease_env, before='[ "$n" -ge 2 ] && touch /scratch/www/health;', restart="always"),
    )
    running = await lease_env.wait_state("svc-1", LeaseState.RUNNING)
    # The server answers, but not yet healthy: 404 for the missing file.
    await until(
        lease_env,
        "a check answered 404",
        lambda: "HTTP 404" in manager.endpoints("svc-1")[0].last_result,
    )
    first = target(manager, "svc-1")
    assert first.ready is False and first.port == 8080 and first.protocol == "http"
    reported = web(lease_env, "svc-1")
    assert reported and all(not e.ready for e in reported)
    # Undeclared ports, unknown leases: no target at all.
    assert manager.service_target("svc-1", "8081") is None
    assert manager.service_target("svc-1", "other") is None
    assert manager.service_target("nope", "web") is None
    assert manager.service_target("svc-1", "8080") == first  # by number as well as by name

    exec_in(lease_env, running, "echo ok > /scratch/www/health")
    await until(lease_env, "ready", lambda: any(e.ready for e in web(lease_env, "svc-1")))
    assert target(manager, "svc-1").ready is True
    started = StateDB.in_state_dir(lease_env.state_dir).get("svc-1")
    assert started is not None and started.started_at is not None

    exec_in(lease_env, running, "rm /scratch/www/health")
    await until(lease_env, "a restart", lambda: restarted(lease_env, "svc-1", 1))
    assert lease_env.last("svc-1").state is LeaseState.RUNNING
    await until(
        lease_env,
        "ready after the restart",
        lambda: (t := manager.service_target("svc-1", "web")) is not None and t.ready,
    )
    container = lease_env.client.containers.get(running.container_id)
    assert container.status == "running"  # the same container, started again
    assert container.exec_run(["cat", "/scratch/n"]).output.strip() == b"2"
    record = StateDB.in_state_dir(lease_env.state_dir).get("svc-1")
    assert record is not None and record.extra["restarts"] == 1
    # Billing runs from the first start, without a gap: the lease never left running.
    assert record.started_at == started.started_at
    assert [r.lease_id for r in manager.running_leases()] == ["svc-1"]
    assert LeaseState.FAILED not in lease_env.states("svc-1")
    await manager.cancel("svc-1")
    await lease_env.wait_state("svc-1", LeaseState.CANCELLED)


@pytest.mark.asyncio
async def test_endpoint_ready_gauge_follows_the_check_and_goes_with_the_lease(
    lease_env: LeaseEnv,
) -> None:
    """gpu_agent_lease_endpoint_ready{lease_id, port} is 0 while the port's check fails,
    1 once it passes, and the series is gone when the lease ends."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    registry = CollectorRegistry()
    AgentMetrics(registry, endpoint_readiness=manager.endpoint_readiness)

    def gauge() -> float | None:
        return registry.get_sample_value(
            "gpu_agent_lease_endpoint_ready", {"lease_id": "svc-g", "port": "web"}
        )

    await manager.assign("svc-g", service(lease_env))
    running = await lease_env.wait_state("svc-g", LeaseState.RUNNING)
    await until(
        lease_env, "a failed check", lambda: bool(manager.endpoints("svc-g")[0].last_result)
    )
    assert gauge() == 0.0
    exec_in(lease_env, running, "echo ok > /scratch/www/health")
    await until(lease_env, "gauge 1", lambda: gauge() == 1.0)
    await manager.cancel("svc-g")
    await lease_env.wait_state("svc-g", LeaseState.CANCELLED)
    assert gauge() is None


@pytest.mark.asyncio
async def test_on_failure_restarts_a_crashing_server_then_fails_with_the_reason(
    lease_env: LeaseEnv,
) -> None:
    """restart: on-failure, max_restarts 2: a server that always exits 3 is started three
    times (the first start and two restarts, 1 s and 2 s apart), then the lease fails
    saying why; restarts stays 2."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign(
        "crash-1",
        service(lease_env, before="exit 3;", restart="on-failure", max_restarts=2),
    )
    failed = await lease_env.wait_state("crash-1", LeaseState.FAILED, limit=WAIT)
    assert "restarted 2 times in a row (max_restarts 2)" in failed.reason
    assert "container exited with code 3" in failed.reason
    assert failed.restarts == 2 and failed.exit_code == 3
    restarts = [u.restarts for u in lease_env.updates if u.lease_id == "crash-1"]
    assert restarts == sorted(restarts) and 1 in restarts
    record = StateDB.in_state_dir(lease_env.state_dir).get("crash-1")
    assert record is not None and record.extra["restarts"] == 2
    assert lease_env.containers() == []
    assert manager.running_leases() == []


@pytest.mark.asyncio
async def test_restart_never_fails_on_liveness_and_succeeds_on_exit_zero(
    lease_env: LeaseEnv,
) -> None:
    """Without a restart policy a failed liveness check ends the lease failed, naming the
    check; on-failure does not restart a clean exit."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    health = {**FAST, "startup_grace": 1.0}
    await manager.assign("never-1", service(lease_env, health=health))
    await manager.assign(
        "clean-1", service(lease_env, before="exit 0;", restart="on-failure", max_restarts=3)
    )
    failed = await lease_env.wait_state("never-1", LeaseState.FAILED)
    assert failed.reason.startswith("liveness check failed: health check GET /health")
    assert "startup grace" in failed.reason and failed.restarts == 0
    done = await lease_env.wait_state("clean-1", LeaseState.SUCCEEDED)
    assert done.restarts == 0


@pytest.mark.asyncio
async def test_always_restarts_a_clean_exit_too(lease_env: LeaseEnv) -> None:
    """restart: always, max_restarts 1: a server that exits 0 is started again once, then
    the lease fails saying so (a service that keeps exiting is not a success)."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign(
        "always-1", service(lease_env, before="exit 0;", restart="always", max_restarts=1)
    )
    failed = await lease_env.wait_state("always-1", LeaseState.FAILED)
    assert failed.restarts == 1 and failed.exit_code == 0
    assert failed.reason == (
        "restarted 1 times in a row (max_restarts 1); last exit: container exited with code 0"
    )


@pytest.mark.asyncio
async def test_agent_death_keeps_the_restart_count_and_readopts_the_service(
    lease_env: LeaseEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that crashes on its first start is restarted (restarts 1); the agent then
    dies without stopping anything; the next agent re-adopts the same running container,
    reports restarts 1 again, checks it to ready, and keeps billing from the first start;
    `gpu-agent leases` shows the endpoint and the count."""
    first = lease_env.manager()
    first_task = await lease_env.start(first)
    await first.assign(
        "keep-1",
        service(
            lease_env,
            before='[ "$n" -eq 1 ] && exit 1; touch /scratch/www/health;',
            restart="on-failure",
        ),
    )
    await until(
        lease_env,
        "ready after one restart",
        lambda: (t := first.service_target("keep-1", "web")) is not None and t.ready,
    )
    assert lease_env.last("keep-1").restarts == 1
    record = StateDB.in_state_dir(lease_env.state_dir).get("keep-1")
    assert record is not None
    container_id, started_at = record.container_id, record.started_at
    first_task.cancel()  # the agent dies: nothing stopped, nothing cleaned up
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    lease_env.runs.clear()
    lease_env.updates.clear()

    second = lease_env.manager()
    await lease_env.start(second)
    await until(
        lease_env,
        "ready after re-adoption",
        lambda: (t := second.service_target("keep-1", "web")) is not None and t.ready,
    )
    await until(lease_env, "an endpoint report", lambda: bool(web(lease_env, "keep-1")))
    assert lease_env.last("keep-1").restarts == 1
    again = StateDB.in_state_dir(lease_env.state_dir).get("keep-1")
    assert again is not None and again.container_id == container_id
    assert again.started_at == started_at and again.extra["restarts"] == 1
    assert lease_env.client.containers.get(container_id).attrs["RestartCount"] == 0
    assert [r.lease_id for r in second.running_leases()] == ["keep-1"]

    # `gpu-agent leases` shows the endpoint and the count from the state DB.
    config = lease_env.state_dir / "agent.yaml"
    config.write_text(json.dumps({"node": {"state_dir": str(lease_env.state_dir)}}))
    await until(
        lease_env,
        "the endpoint stored as ready",
        lambda: (
            (r := StateDB.in_state_dir(lease_env.state_dir).get("keep-1")) is not None
            and r.extra["endpoints"][0]["ready"]
        ),
    )
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["-c", str(config), "leases", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["restarts"] == 1
    assert [(e["name"], e["ready"]) for e in row["endpoints"]] == [("web", True)]
    assert await asyncio.to_thread(cli.main, ["-c", str(config), "leases"]) == 0
    table = capsys.readouterr().out
    assert "endpoints (restarts 1):" in table and "web" in table and "http/8080  ready" in table
    await second.cancel("keep-1")
    await lease_env.wait_state("keep-1", LeaseState.CANCELLED)


@pytest.mark.asyncio
async def test_agent_death_during_a_backoff_does_not_count_the_restart_twice(
    lease_env: LeaseEnv,
) -> None:
    """A server that crashes on its first three starts: the agent dies while the second
    restart waits out its backoff (counted, not yet started); the next agent finds the
    exited container, starts it without counting again, counts the third crash, and the
    fourth start serves: restarts 3 (not 4), the lease running and metered from its
    first start."""
    first = lease_env.manager()
    first_task = await lease_env.start(first)
    await first.assign(
        "pend-1",
        service(
            lease_env,
            before='[ "$n" -le 3 ] && exit 4; touch /scratch/www/health;',
            restart="on-failure",
        ),
    )
    await until(lease_env, "the second restart counted", lambda: restarted(lease_env, "pend-1", 2))
    record = StateDB.in_state_dir(lease_env.state_dir).get("pend-1")
    assert record is not None and record.extra["restart_pending"] is True
    first_task.cancel()  # mid-backoff (2 s): the container is exited, the start not done
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    lease_env.runs.clear()
    container = lease_env.client.containers.get(record.container_id or "")
    assert container.status == "exited"

    second = lease_env.manager()
    await lease_env.start(second)
    await until(
        lease_env,
        "ready on the fourth start",
        lambda: (t := second.service_target("pend-1", "web")) is not None and t.ready,
    )
    assert lease_env.last("pend-1").restarts == 3
    assert container.exec_run(["cat", "/scratch/n"]).output.strip() == b"4"
    again = StateDB.in_state_dir(lease_env.state_dir).get("pend-1")
    assert again is not None and again.started_at == record.started_at
    assert again.extra["restarts"] == 3 and "restart_pending" not in again.extra
    metered = second.running_leases()
    assert [r.lease_id for r in metered] == ["pend-1"]
    # Its metering start is the lease's first start, not the re-adoption.
    assert record.started_at is not None
    since_start = time.time() - record.started_at
    assert abs((time.monotonic() - metered[0].started_monotonic) - since_start) < 1.0
    await second.cancel("pend-1")
    await lease_env.wait_state("pend-1", LeaseState.CANCELLED)
