"""Scheduler replicas on PostgreSQL, with real processes (docs/scaling.md, docs/faults.md).

Two ``gpu-scheduler serve`` on one database of the session's throwaway PostgreSQL
(tests/pgcluster.py), one real ``gpu-agent run`` with both addresses, real Docker
leases. Observed through the database and the processes' JSON logs.

1. kill -9 the replica holding the agent: the agent reconnects to the other within
   its backoff, the running lease is untouched (same container, never restarted), a
   lease submitted during the failover is placed exactly once, no usage record is
   lost or stored twice, and the singleton work (leadership) resumes on the survivor.
2. PostgreSQL restarted under load: the replica reconnects, the lease keeps running,
   and every usage record the agent was told was stored is there, without gaps.
3. A replica cut off from PostgreSQL (through the suite's TCP proxy) stops acking,
   closes its agent streams, and the agent moves to the other replica.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from scheduler.storage import PASSWORD_ENV, parse_target
from tests.pgcluster import Cluster as PgCluster

from .harness import (
    BIN,
    Cluster,
    TcpProxy,
    _kill9,
    _spawn,
    free_port,
    port_open,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.docker]


class Replicated(Cluster):
    """Cluster's scheduler is replica "a"; ``start_b`` adds replica "b" on the same URL."""

    url: str = ""

    def pg_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        target = parse_target(self.url)
        with psycopg.connect(target.conninfo, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), args).fetchall()]

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:  # type: ignore[override]
        return self.pg_rows(sql, *args)

    def start_b(self) -> None:
        self.b_port = free_port()
        self.b_dir = self.root / "scheduler-b"
        self.b_dir.mkdir(exist_ok=True, mode=0o700)
        # One TLS identity and one secrets key for every replica (deploy/replicas).
        shutil.copytree(self.sched_dir / "tls", self.b_dir / "tls", dirs_exist_ok=True)
        if (self.sched_dir / "secrets.key").exists():
            shutil.copy2(self.sched_dir / "secrets.key", self.b_dir / "secrets.key")
        cfg = yaml.safe_load(self.sched_cfg.read_text())
        cfg["server"]["listen"] = f"127.0.0.1:{self.b_port}"
        cfg["database"]["path"] = str(self.b_dir / "scheduler.db")
        cfg["replica"]["id"] = "b"
        # Each replica's embedded relay needs a listener of its own (docs/services.md:
        # with replicas, buyers use one standalone relay; these tests need none).
        if "relay" in cfg:
            cfg["relay"]["listen"] = f"127.0.0.1:{free_port()}"
        self.b_cfg = self.root / "scheduler-b.yaml"
        self.b_cfg.write_text(yaml.safe_dump(cfg))
        self.b_log = self.root / "scheduler-b.log"
        self.b = _spawn([str(BIN / "gpu-scheduler"), "-c", str(self.b_cfg), "serve"], self.b_log)
        wait_for("replica b to listen", lambda: port_open(self.b_port), 30)

    def cli_b(self, *args: str) -> str:
        import os
        import subprocess

        result = subprocess.run(
            [str(BIN / "gpu-scheduler"), "-c", str(self.b_cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "GPU_SCHEDULER_TOKEN": self.admin_token()},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def submit_b(self, cmd: str) -> str:
        out = self.cli_b(
            "submit", "--json", "--image", "gpu-agent-test/busybox:latest", "--gpus", "1",
            "--cmd", cmd, "--buyer", "fault-buyer", "--price-max", "5000000",
            "--max-duration", "1h",
        )  # fmt: skip
        return str(json.loads(out)["leaseId"])

    def holder(self) -> str:
        rows = self.query("SELECT replica_id FROM nodes WHERE node_id = ?", self.node_id)
        return str(rows[0][0]) if rows else ""

    def usage(self) -> tuple[int, int, int]:
        """(records, highest seq, acked seq) for the node: no gap means count == max."""
        count, top = self.query(
            "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM usage_records WHERE node_id = ?",
            self.node_id,
        )[0]
        acked = self.query("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", self.node_id)
        return int(count), int(top), int(acked[0][0])

    def stop(self) -> None:
        b = getattr(self, "b", None)
        super().stop()
        if b is not None and b.poll() is None:
            b.terminate()
            try:
                b.wait(15)
            except Exception:
                _kill9(b)


def log_time(path: Path, message: str) -> float | None:
    """Wall-clock time of the first JSON log line whose message starts with ``message``."""
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if str(event.get("msg", event.get("message", ""))).startswith(message):
            return datetime.fromisoformat(str(event["ts"])).timestamp()
    return None


def log_has(path: Path, message: str) -> bool:
    return log_time(path, message) is not None


@pytest.fixture
def replicated(tmp_path: Path, pg_cluster: PgCluster) -> Iterator[Replicated]:
    url = pg_cluster.new_database()
    c = Replicated(
        tmp_path,
        scheduler_overrides={
            "database": {"url": url},
            "replica": {"id": "a", "heartbeat_interval": "0.5s", "dead_after": "3s"},
            # offline_grace must outlast a replica's cut-off detection (dead_after) plus
            # the agent's move (backoff, handshake) and a heartbeat flush (docs/scaling.md).
            "liveness": {"offline_grace": "15s", "restart_grace": "20s"},
        },
        gpus=2,
    )
    c.url = url
    try:
        yield c
    finally:
        c.stop()
        pg_cluster.drop_database(url)


def start_pair(c: Replicated) -> None:
    c.start_scheduler()
    c.start_b()
    c.agent_overrides = {
        "coordinator": {"address": [f"127.0.0.1:{c.grpc_port}", f"127.0.0.1:{c.b_port}"]}
    }
    c.start_agent()
    c.wait_online()
    assert c.holder() == "a"


def running(c: Replicated, lease_id: str) -> bool:
    return c.lease_state(lease_id) == "running"


def test_kill9_one_replica(replicated: Replicated) -> None:
    c = replicated
    start_pair(c)
    first = c.submit("sleep 600")
    wait_for("the first lease to run", lambda: running(c, first), 60)
    before = c.containers()[first]
    wait_for("usage records", lambda: c.usage()[0] >= 2, 30)

    _kill9(c.scheduler)
    killed = time.monotonic()
    killed_wall = time.time()
    second = c.submit_b("sleep 600")  # during the failover, on the survivor
    wait_for("the agent on replica b", lambda: c.holder() == "b", 30)
    moved = time.monotonic() - killed
    # Backoff 0.5 s x1.6 up to 4 s: one or two steps, plus a handshake.
    assert moved < 10, moved
    wait_for("the second lease to run", lambda: running(c, second), 60)

    offers = c.query(
        "SELECT COUNT(*) FROM placement_attempts WHERE lease_id = ? AND outcome = 'offered'",
        second,
    )[0][0]
    assert offers == 1
    after = c.containers()[first]
    assert after["Id"] == before["Id"] and after["RestartCount"] == 0
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert running(c, first)

    # Usage keeps flowing through b, with no gap and nothing twice (the primary key
    # would refuse a second copy; a gap would show as count < max seq).
    count_then = c.usage()[0]
    wait_for("usage through b", lambda: c.usage()[0] >= count_then + 2, 30)
    wait_for("acks to catch up", lambda: c.usage()[0] == c.usage()[1] == c.usage()[2], 30)

    # The singleton work resumed on b: it leads, a is no longer live.
    led = wait_for("b to lead", lambda: log_time(c.b_log, "replica leadership taken"), 15)
    assert led - killed_wall < 5, led - killed_wall  # the lock went with a's connection
    live = c.query(
        "SELECT replica_id FROM replicas WHERE heartbeat_ns > ?", time.time_ns() - 3 * 10**9
    )
    assert [r[0] for r in live] == ["b"]


def test_postgres_restarted_under_load(replicated: Replicated, pg_cluster: PgCluster) -> None:
    c = replicated
    start_pair(c)
    lease = c.submit("sleep 600")
    wait_for("the lease to run", lambda: running(c, lease), 60)
    wait_for("usage records", lambda: c.usage()[0] >= 2, 30)
    pg_cluster.pg_ctl_stop("fast")
    time.sleep(3)  # the outage itself: what we measure is what survives it
    pg_cluster.pg_ctl_start()
    count_then = wait_for("the database back", lambda: c.usage()[0] or None, 30)
    wait_for("usage after the restart", lambda: c.usage()[0] >= count_then + 2, 60)
    wait_for("acks to catch up", lambda: c.usage()[0] == c.usage()[1] == c.usage()[2], 60)
    assert running(c, lease)
    assert c.scheduler is not None and c.scheduler.poll() is None
    assert c.b.poll() is None


def test_replica_cut_off_from_postgres_moves_its_agents(
    replicated: Replicated, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = replicated
    from tests.pgcluster import dbname

    proxy = TcpProxy(pg_cluster.port)
    monkeypatch.setenv(PASSWORD_ENV, pg_cluster.password)
    # Replica a reaches PostgreSQL through the proxy (TCP, password); b directly.
    c.scheduler_overrides["database"]["url"] = pg_cluster.tcp_url(dbname(c.url), proxy.port)
    c.write_scheduler_config()
    try:
        c.start_scheduler()
        c.start_b()
        b_cfg = yaml.safe_load(c.b_cfg.read_text())
        assert "127.0.0.1" in b_cfg["database"]["url"]  # b inherited a's URL: point it home
        b_cfg["database"]["url"] = c.url
        c.b_cfg.write_text(yaml.safe_dump(b_cfg))
        _kill9(c.b)
        c.b = _spawn([str(BIN / "gpu-scheduler"), "-c", str(c.b_cfg), "serve"], c.b_log)
        wait_for("replica b to listen", lambda: port_open(c.b_port), 30)
        c.agent_overrides = {
            "coordinator": {"address": [f"127.0.0.1:{c.grpc_port}", f"127.0.0.1:{c.b_port}"]}
        }
        c.start_agent()
        c.wait_online()
        assert c.holder() == "a"
        lease = c.submit_b("sleep 600")
        wait_for("the lease to run", lambda: running(c, lease), 60)
        wait_for("usage records", lambda: c.usage()[0] >= 2, 30)

        proxy.set_mode("blackhole")
        wait_for("the agent to move to b", lambda: c.holder() == "b", 40)
        assert log_has(c.sched_log, "replica cut off from its database")
        wait_for("acks to catch up", lambda: c.usage()[0] == c.usage()[1] == c.usage()[2], 30)
        assert running(c, lease)
    finally:
        proxy.close()
