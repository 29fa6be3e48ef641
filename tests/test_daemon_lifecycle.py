"""The daemon as systemd runs it: SIGTERM, restart/upgrade re-adoption, SIGHUP, drain.

Real processes (``gpu-scheduler serve``, ``gpu-agent run``), real Docker, real gRPC
over TLS on loopback, through the fault suite's cluster harness.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.faults.harness import BIN, Cluster, cluster, wait_for

pytestmark = pytest.mark.docker


@pytest.fixture
def node(tmp_path: Path, busybox_image: str) -> Iterator[Cluster]:
    with cluster(tmp_path, gpus=2) as c:
        c.start()
        yield c


def _sigterm(c: Cluster, timeout: float = 15.0) -> float:
    assert c.agent is not None
    started = time.monotonic()
    c.agent.send_signal(signal.SIGTERM)
    c.agent.wait(timeout)
    return time.monotonic() - started


def test_sigterm_leaves_containers_flushes_usage_and_restart_readopts(node: Cluster) -> None:
    """SIGTERM: the agent exits promptly with exit code 0, the lease container keeps
    running, every usage record is delivered first; a new agent (an upgrade) re-adopts
    the same container and the lease continues."""
    lease = node.submit("sleep 300")
    wait_for("the lease to run", lambda: node.lease_state(lease) == "running", 60)
    # Let at least one usage record close so there is something to flush.
    wait_for("a usage record", lambda: node.query("SELECT seq FROM usage_records"), 30)
    container_id = node.containers()[lease]["Id"]

    took = _sigterm(node)
    assert node.agent is not None and node.agent.returncode == 0
    assert took < 10, f"agent took {took:.1f}s to stop"
    state = node.containers()[lease]["State"]
    assert state["Running"] is True, "the lease container must outlive the agent"
    assert node.log_events("usage flushed"), "pending usage was not delivered before exit"
    outbox = json.loads(
        subprocess.run(
            [str(BIN / "gpu-agent"), "-c", str(node.agent_cfg), "usage", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["outbox"]
    assert outbox["pending"] == 0
    assert outbox["acked_seq"] == outbox["last_seq"] > 0
    stored = node.query("SELECT MAX(seq) FROM usage_records")[0][0]
    assert stored == outbox["last_seq"]

    node.start_agent()
    node.wait_online()
    wait_for(
        "the lease to be re-adopted",
        lambda: any(
            lease_view["lease_id"] == lease and lease_view["state"] == "running"
            for lease_view in node.agent_status()["leases"].get("leases", [])
        ),
        30,
    )
    after = node.containers()[lease]
    assert after["Id"] == container_id
    assert after["RestartCount"] == 0
    assert after["State"]["StartedAt"] == state["StartedAt"]
    assert node.lease_state(lease) == "running"


def test_sighup_applies_live_changes_and_keeps_config_on_a_bad_file(node: Cluster) -> None:
    """SIGHUP with a valid change applies it (and names what needs a restart); with an
    invalid file it keeps the running config and logs every problem."""
    assert node.agent is not None
    config = yaml.safe_load(node.agent_cfg.read_text())
    config["runtime"]["denied_registries"] = ["evil.example"]
    config["node"]["name"] = "renamed"  # needs a restart
    node.agent_cfg.write_text(yaml.safe_dump(config))
    node.agent.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: node.log_events("config reloaded"), 15)
    event = node.log_events("config reloaded")[-1]
    assert event["applied"] == ["runtime.denied_registries"]
    assert event["need_restart"] == ["node.name"]

    node.agent_cfg.write_text("runtime: {max_cpus: lots}\n")
    node.agent.send_signal(signal.SIGHUP)
    wait_for("the refusal", lambda: node.log_events("config reload failed"), 15)
    failed = node.log_events("config reload failed")[-1]
    assert any(p.startswith("runtime.max_cpus:") for p in failed["problems"])
    assert node.agent.poll() is None, "a bad config file must not stop the agent"
    assert node.connected()


def test_sighup_price_change_reaches_the_market_without_a_reconnect(node: Cluster) -> None:
    """The real daemon (docs/market.md): a SIGHUP that changes node.pricing sends the new
    ask on the open session, no reconnect; `offers` shows it; the lease placed before
    keeps its price and a new one pays the new ask."""
    assert node.agent is not None
    first = node.submit("sleep 60", key="price-before")
    wait_for("the first lease running", lambda: node.lease_state(first) == "running", 30)
    sessions = node.query("SELECT COUNT(*) FROM sessions")[0][0]
    config = yaml.safe_load(node.agent_cfg.read_text())
    config["node"]["pricing"] = {"H100": 2_000_000}
    node.agent_cfg.write_text(yaml.safe_dump(config))
    node.agent.send_signal(signal.SIGHUP)

    def median_ask() -> str:
        groups = json.loads(node.scheduler_cli("offers", "--json")).get("groups", [])
        return str(groups[0]["priceMedianMicros"]) if groups else ""

    wait_for("the new ask in offers", lambda: median_ask() == "2000000", 15)
    assert node.log_events("config reloaded")[-1]["applied"] == ["node.pricing"]
    assert node.query("SELECT COUNT(*) FROM sessions")[0][0] == sessions, "no reconnect"
    second = node.submit("sleep 60", key="price-after")
    wait_for("the second lease running", lambda: node.lease_state(second) == "running", 30)
    prices = dict(node.query("SELECT lease_id, accepted_price_micros_per_gpu_hour FROM leases"))
    assert prices == {first: 1_000_000, second: 2_000_000}


def test_drain_stops_new_placements_and_undrain_restores_them(node: Cluster) -> None:
    """`gpu-agent drain` shows in status and heartbeats: the scheduler places nothing
    on the node until `gpu-agent undrain`."""

    def agent_cli(*args: str) -> str:
        return subprocess.run(
            [str(BIN / "gpu-agent"), "-c", str(node.agent_cfg), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "draining: no new leases" in agent_cli("drain")
    wait_for("status to show the drain", lambda: node.agent_status()["node"]["draining"], 10)

    def scheduler_sees_drain() -> bool:
        nodes = json.loads(node.scheduler_cli("nodes", "--json"))
        return bool(nodes[0].get("draining")) and not nodes[0].get("freeGpuUuids")

    wait_for("a heartbeat carrying the drain", scheduler_sees_drain, 10)
    lease = node.submit("true")
    # The dispatcher records why a lease waits once it has tried to place it.
    wait_for(
        "the placement attempt",
        lambda: node.query("SELECT reason FROM leases WHERE lease_id = ?", lease)[0][0],
        10,
    )
    assert node.lease_state(lease) == "pending"
    assert node.containers() == {}
    assert agent_cli("undrain").startswith("drain lifted")
    wait_for("the lease to run after undrain", lambda: node.lease_state(lease) == "succeeded", 60)


def test_sd_notify_ready_watchdog_stopping_in_order(
    tmp_path: Path, busybox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd's notify protocol the real agent sends READY once connected, then
    WATCHDOG pings from its event loop, and STOPPING on SIGTERM, in that order."""
    sock_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(0.2)
    messages: list[str] = []

    def drain_socket() -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(receiver.recv(4096).decode())

    try:
        with cluster(tmp_path / "c", gpus=1) as c:
            c.start_scheduler()
            monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
            monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
            c.start_agent()
            c.wait_online()

            def pinged_after_ready() -> bool:
                drain_socket()
                ready = [i for i, m in enumerate(messages) if "READY=1" in m]
                return bool(ready) and any("WATCHDOG=1" in m for m in messages[ready[0] :])

            wait_for("READY and a watchdog ping", pinged_after_ready, 20)
            _sigterm(c)
            drain_socket()
    finally:
        receiver.close()
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert "STATUS=connected to" in messages[ready]
    assert ready < stopping
    assert not any("READY=1" in m for m in messages[stopping:])


def test_remote_drain_with_deadline_stops_running_leases(node: Cluster) -> None:
    """`gpu-scheduler nodes drain ID --deadline` reaches the agent over its stream: no
    new leases, and leases still running at the deadline are stopped with that reason."""
    lease = node.submit("sleep 300")
    wait_for("the lease to run", lambda: node.lease_state(lease) == "running", 60)
    out = node.scheduler_cli(
        "nodes", "drain", node.node_id, "--deadline", "2s", "--reason", "maint"
    )
    assert "draining" in out
    wait_for("the lease to be stopped", lambda: node.lease_state(lease) == "cancelled", 30)
    reason = node.query("SELECT reason FROM leases WHERE lease_id = ?", lease)[0][0]
    assert "drain deadline" in reason
    wait_for("the container to be removed", lambda: lease not in node.containers(), 15)
    assert node.agent_status()["node"]["draining"] is True


def test_leases_stop_after_the_configured_disconnect_limit(
    tmp_path: Path, busybox_image: str
) -> None:
    """With coordinator.stop_leases_after_disconnect set, leases are stopped once the
    coordinator has been gone that long, and the reason reaches it when it returns."""
    overrides = {"coordinator": {"stop_leases_after_disconnect": "2s"}}
    with cluster(tmp_path, gpus=1, agent_overrides=overrides) as c:
        c.start()
        lease = c.submit("sleep 300")
        wait_for("the lease to run", lambda: c.lease_state(lease) == "running", 60)
        c.kill_scheduler()
        wait_for("the container to be stopped", lambda: lease not in c.containers(), 30)
        stopped = c.log_events("stopping running leases")
        assert stopped and "stop_leases_after_disconnect" in stopped[-1]["reason"]
        c.start_scheduler()
        wait_for("the update to arrive", lambda: c.lease_state(lease) == "cancelled", 30)
