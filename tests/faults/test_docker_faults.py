"""Scenario 6: the Docker Engine errors and hangs under a running agent.

The agent talks to Docker through ``DockerFaultProxy`` (its ``runtime.docker_host``),
which answers ``POST /containers/create`` with 500, or holds it and drops it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .docker_proxy import DockerFaultProxy
from .harness import cluster, report, wait_for
from .test_agent_kill import TERMINAL, records

pytestmark = pytest.mark.faults


def _lease_row(c: Any, lease_id: str) -> tuple[str, str]:
    rows = c.query("SELECT state, reason FROM leases WHERE lease_id = ?", lease_id)
    return (str(rows[0][0]), str(rows[0][1])) if rows else ("", "")


def test_docker_errors_fail_new_leases_only_and_the_agent_recovers(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """With container creation failing (HTTP 500) and then hanging, a lease already
    running keeps its container and keeps producing usage records, each new lease
    ends FAILED with a reason that says Docker failed, the agent never exits, and a
    lease submitted once Docker answers again runs."""
    proxy = DockerFaultProxy(tmp_path / "docker.sock")
    overrides = {"runtime": {"docker_host": proxy.url}}
    try:
        with cluster(tmp_path / "c", agent_overrides=overrides) as c:
            c.start()
            steady = c.submit("sleep 600")
            wait_for("the first lease running", lambda: c.lease_state(steady) == "running", 30)
            cid = c.containers()[steady]["Id"]

            proxy.fail("POST", r"/containers/create")
            seen = len([r for r in records(c) if r[1] == steady])
            broken = c.submit("sleep 600")
            wait_for("the lease to fail", lambda: c.lease_state(broken) in TERMINAL, 30)
            state, reason = _lease_row(c, broken)
            assert state == "failed", (state, reason)
            assert "500" in reason or "injected fault" in reason, reason

            proxy.clear()
            proxy.hang("POST", r"/containers/create", seconds=3.0)
            started = time.monotonic()
            hung = c.submit("sleep 600")
            wait_for("the hung lease to fail", lambda: c.lease_state(hung) in TERMINAL, 30)
            hung_for = time.monotonic() - started
            hung_state, hung_reason = _lease_row(c, hung)
            assert hung_state == "failed", (hung_state, hung_reason)
            assert "Docker did not answer" in hung_reason, hung_reason

            # The running lease was untouched, and metering went on through the faults.
            assert c.containers()[steady]["Id"] == cid
            assert c.containers()[steady]["State"]["Running"]
            assert c.lease_state(steady) == "running"
            wait_for(
                "usage records of the running lease during the faults",
                lambda: len([r for r in records(c) if r[1] == steady]) > seen,
                15,
            )
            assert broken not in c.containers() and hung not in c.containers()

            proxy.clear()
            healed = c.submit("sleep 600")
            wait_for("a lease after recovery", lambda: c.lease_state(healed) == "running", 30)
            assert c.agent is not None and c.agent.poll() is None
            report(
                record_property,
                "6-docker-errors",
                failed_reason=reason,
                hung_reason=hung_reason,
                hung_lease_failed_after_s=round(hung_for, 2),
                injected=len(proxy.injected),
            )
    finally:
        proxy.close()
