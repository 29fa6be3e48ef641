"""kill -9 of the agent while a service lease runs (issue #16).

Real ``gpu-agent run`` and ``gpu-scheduler serve`` processes, real Docker, real gRPC
over TLS on loopback. The service (busybox httpd) crashes on its first start and
serves from the second, so the lease has one restart before the agent dies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import IMAGE, cluster, wait_for
from tests.faults.test_agent_kill import assert_ledger_consistent

pytestmark = [pytest.mark.faults, pytest.mark.docker]

SERVER = (
    "n=$(cat /scratch/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /scratch/n; "
    '[ "$n" -eq 1 ] && exit 1; mkdir -p /scratch/www; echo ok > /scratch/www/health; '
    "exec httpd -f -p 8080 -h /scratch/www"
)


def test_kill9_with_a_service_up_readopts_it_and_keeps_the_restart_count(
    tmp_path: Path, busybox_image: Any
) -> None:
    """The service is restarted once (on-failure) and reported ready with restarts 1;
    after kill -9 of the agent the next one re-adopts the same container (no Docker
    restart), reports it ready again with restarts 1, and billing has no gap or overlap."""
    with cluster(tmp_path) as c:
        c.start()
        spec = tmp_path / "service.yaml"
        spec.write_text(
            json.dumps(
                {
                    "image": IMAGE,
                    "command": ["sh", "-c", SERVER],
                    "gpus": 1,
                    "buyer": "fault-buyer",
                    "price_max": 5_000_000,
                    "max_duration": "1h",
                    "ports": [{"container_port": 8080, "protocol": "http", "name": "web"}],
                    "restart": "on-failure",
                    "health": {"path": "/health", "period": "0.5s"},
                }
            )
        )
        lease = json.loads(c.scheduler_cli("submit", str(spec), "--json"))["leaseId"]

        def shown() -> dict[str, Any]:
            return dict(json.loads(c.scheduler_cli("lease", "show", lease, "--json")))

        def ready_with_one_restart(checked_after_ns: int = 0) -> bool:
            data = shown()
            endpoint = (data.get("endpoints") or [{}])[0]
            return (
                bool(endpoint.get("ready"))
                and data.get("restarts") == 1
                and int(endpoint.get("lastCheckUnixNanos", 0)) > checked_after_ns
            )

        wait_for("the service ready after one restart", ready_with_one_restart, 40)
        before = c.containers()[lease]
        c.kill_agent()
        killed_at, killed_ns = time.monotonic(), time.time_ns()
        c.start_agent()
        wait_for("the agent back", lambda: c.log_events("lease re-adopted") and c.connected(), 30)
        # Checked by the new agent (a check after the kill), not the old report.
        wait_for("ready again", lambda: ready_with_one_restart(killed_ns), 30)
        back_within = time.monotonic() - killed_at
        after = c.containers()[lease]
        assert after["Id"] == before["Id"]
        assert after["RestartCount"] == 0
        assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
        text = c.scheduler_cli("lease", "show", lease)
        assert "endpoints:" in text and "web" in text and " ready " in text
        assert "restart:     on-failure, 1 restart(s) so far" in text
        c.scheduler_cli("cancel", lease)
        wait_for("cancelled", lambda: c.lease_state(lease) == "cancelled", 30)
        wait_for(
            "the final usage record",
            lambda: c.query("SELECT 1 FROM usage_records WHERE lease_id = ? AND final = 1", lease),
            30,
        )
        assert_ledger_consistent(c)
        assert back_within < 30
