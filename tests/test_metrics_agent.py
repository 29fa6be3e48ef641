"""The agent's own metrics and the scheduler's registry."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry

from agent.metrics.agent_metrics import LEASE_STATES, AgentMetrics, Attestation
from agent.metrics.registry import build_telemetry
from gpuagent import __version__
from scheduler.metrics import SchedulerMetrics, start_metrics_server


def test_leases_by_state_read_from_snapshot_with_every_state_present() -> None:
    """gpu_agent_leases reads the lease manager's snapshot at scrape time; absent states are 0."""
    counts = {"running": 3}
    reg = CollectorRegistry()
    AgentMetrics(reg, lease_states=lambda: counts)
    assert reg.get_sample_value("gpu_agent_leases", {"state": "running"}) == 3.0
    for state in LEASE_STATES:
        assert reg.get_sample_value("gpu_agent_leases", {"state": state}) is not None
    counts["running"] = 1
    assert reg.get_sample_value("gpu_agent_leases", {"state": "running"}) == 1.0


def test_failing_lease_snapshot_does_not_fail_the_scrape() -> None:
    """A raising snapshot drops gpu_agent_leases but keeps every other series."""

    def broken() -> dict[str, int]:
        raise RuntimeError("db locked")

    reg = CollectorRegistry()
    AgentMetrics(reg, lease_states=broken)
    assert reg.get_sample_value("gpu_agent_leases", {"state": "running"}) is None
    assert reg.get_sample_value("gpu_agent_usage_records_pending") == 0.0


def test_endpoint_readiness_read_at_scrape_time_and_a_failing_snapshot_is_left_out() -> None:
    """gpu_agent_lease_endpoint_ready is 0/1 per (lease, port) from the snapshot at each
    scrape; a port that left the snapshot (its lease ended) has no series; a raising
    snapshot costs that family only."""
    readiness: dict[tuple[str, str], bool] = {("a", "web"): False, ("a", "db"): True}
    reg = CollectorRegistry()
    AgentMetrics(reg, endpoint_readiness=lambda: readiness)
    name = "gpu_agent_lease_endpoint_ready"
    assert reg.get_sample_value(name, {"lease_id": "a", "port": "web"}) == 0.0
    assert reg.get_sample_value(name, {"lease_id": "a", "port": "db"}) == 1.0
    readiness.clear()
    assert reg.get_sample_value(name, {"lease_id": "a", "port": "web"}) is None

    def broken() -> dict[tuple[str, str], bool]:
        raise RuntimeError("boom")

    reg = CollectorRegistry()
    AgentMetrics(reg, endpoint_readiness=broken)
    assert reg.get_sample_value(name, {"lease_id": "a", "port": "web"}) is None
    assert reg.get_sample_value("gpu_agent_leases", {"state": "running"}) == 0.0


def test_usage_backlog_age_and_alert_threshold() -> None:
    """Oldest pending age is computed at scrape time; the alert flips above the threshold."""
    now = [1000.0]
    reg = CollectorRegistry()
    metrics = AgentMetrics(reg, usage_alert_records=10, clock=lambda: now[0])
    metrics.set_usage_backlog(5, 900.0)
    assert reg.get_sample_value("gpu_agent_usage_oldest_pending_age_seconds") == 100.0
    now[0] = 1060.0
    assert reg.get_sample_value("gpu_agent_usage_oldest_pending_age_seconds") == 160.0
    assert reg.get_sample_value("gpu_agent_usage_backlog_alert") == 0.0
    metrics.set_usage_backlog(11, 900.0)
    assert reg.get_sample_value("gpu_agent_usage_backlog_alert") == 1.0
    assert reg.get_sample_value("gpu_agent_usage_backlog_threshold_records") == 10.0
    metrics.set_usage_backlog(0, None)
    assert reg.get_sample_value("gpu_agent_usage_oldest_pending_age_seconds") == 0.0


def test_link_events_update_counters_and_status_copy() -> None:
    """Connect, heartbeat and reconnect events show in the registry and in link_state()."""
    reg = CollectorRegistry()
    metrics = AgentMetrics(reg)
    metrics.set_connected(True)
    metrics.heartbeat_sent(at=1234.0)
    metrics.heartbeat_failed()
    metrics.reconnected()
    assert reg.get_sample_value("gpu_agent_coordinator_connected") == 1.0
    assert reg.get_sample_value("gpu_agent_heartbeats_sent_total") == 1.0
    assert reg.get_sample_value("gpu_agent_heartbeats_failed_total") == 1.0
    assert reg.get_sample_value("gpu_agent_last_heartbeat_timestamp_seconds") == 1234.0
    assert reg.get_sample_value("gpu_agent_coordinator_reconnects_total") == 1.0
    assert metrics.link_state() == {
        "connected": True,
        "last_heartbeat_at": 1234.0,
        "reconnects": 1,
        "heartbeats_sent": 1,
        "heartbeats_failed": 1,
    }


def test_lease_starts_pulls_and_attestation() -> None:
    """Start outcomes, the start histogram, pull bytes and per-GPU attestation are recorded."""
    reg = CollectorRegistry()
    metrics = AgentMetrics(reg)
    assert reg.get_sample_value("gpu_agent_lease_starts_total", {"outcome": "pull_failed"}) == 0.0
    metrics.lease_started("started", 4.0)
    metrics.lease_started("rejected")
    metrics.image_pulled(3.0, 2048)
    assert reg.get_sample_value("gpu_agent_lease_starts_total", {"outcome": "started"}) == 1.0
    assert reg.get_sample_value("gpu_agent_lease_start_duration_seconds_count") == 1.0
    assert (
        reg.get_sample_value("gpu_agent_lease_start_duration_seconds_bucket", {"le": "5.0"}) == 1.0
    )
    assert reg.get_sample_value("gpu_agent_image_pull_bytes_total") == 2048.0
    metrics.set_attestation(0, "GPU-a", Attestation(False, 0.4, 50.0, 150.0))
    gpu = {"gpu": "0", "uuid": "GPU-a"}
    assert reg.get_sample_value("gpu_agent_attestation_passed", gpu) == 0.0
    assert reg.get_sample_value("gpu_agent_attestation_score_ratio", gpu) == 0.4
    assert reg.get_sample_value("gpu_agent_attestation_expiry_timestamp_seconds", gpu) == 150.0


def test_build_info_and_private_registry() -> None:
    """Build info carries the version; two agents in one process keep separate registries."""
    a = build_telemetry(gpu_source=None, scrape_timeout=1)
    b = build_telemetry(gpu_source=None, scrape_timeout=1)
    a.agent.heartbeat_sent()
    assert a.registry.get_sample_value("gpu_agent_heartbeats_sent_total") == 1.0
    assert b.registry.get_sample_value("gpu_agent_heartbeats_sent_total") == 0.0
    info = a.registry.get_sample_value(
        "gpu_agent_build_info",
        {
            "version": __version__,
            "protocol": "1.0",
            "python": __import__("platform").python_version(),
        },
    )
    assert info == 1.0


def test_scheduler_metrics_served_over_http() -> None:
    """The scheduler's /metrics serves fleet state from its snapshots and its counters."""
    nodes = {"online": 2, "offline": 1}
    metrics = SchedulerMetrics(nodes=lambda: nodes, leases=lambda: {"running": 4})
    metrics.heartbeat()
    metrics.attestation("failed")
    metrics.placement(0.003)
    metrics.usage_records(10, duplicates=2)
    server = start_metrics_server("127.0.0.1:0", metrics)
    try:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    finally:
        server.close()
    assert 'gpu_scheduler_nodes{state="offline"} 1.0' in text
    assert 'gpu_scheduler_nodes{state="suspect"} 0.0' in text
    assert 'gpu_scheduler_leases{state="running"} 4.0' in text
    assert "gpu_scheduler_heartbeats_total 1.0" in text
    assert 'gpu_scheduler_attestations_total{outcome="failed"} 1.0' in text
    assert "gpu_scheduler_usage_records_ingested_total 10.0" in text
    assert "gpu_scheduler_placement_duration_seconds_count 1.0" in text


def test_scheduler_metrics_rejects_a_malformed_listen_address() -> None:
    """A listen value without a port fails with the config key in the message."""
    with pytest.raises(ValueError, match=r"metrics\.listen 'localhost'"):
        start_metrics_server("localhost", SchedulerMetrics())
