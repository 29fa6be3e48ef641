"""Every metric name the agent exports, in one place.

Names follow the Prometheus naming guide: base units (seconds, bytes, joules,
hertz, watts, celsius), ``_total`` on counters, ratios 0-1 and ``_info`` with
value 1. GPU names mirror dcgm-exporter's default set so existing dashboards
translate one to one; the agent's own metrics carry the ``gpu_agent_`` prefix.
``docs/metrics.md`` describes each one; tests scrape the endpoint to check that
the docs, the dashboard and the alert rules only use names listed here.
"""

from __future__ import annotations

from typing import Final

# Labels carried by every per-GPU series.
GPU_LABELS: Final = ("gpu", "uuid", "model", "lease_id")

# --- GPU hardware (read from NVML at scrape time) -------------------------------
GPU_INFO: Final = "gpu_info"
GPU_UTILIZATION: Final = "gpu_utilization_ratio"
GPU_MEMORY_UTILIZATION: Final = "gpu_memory_utilization_ratio"
GPU_MEMORY_USED: Final = "gpu_memory_used_bytes"
GPU_MEMORY_FREE: Final = "gpu_memory_free_bytes"
GPU_MEMORY_TOTAL: Final = "gpu_memory_total_bytes"
GPU_SM_CLOCK: Final = "gpu_sm_clock_hertz"
GPU_MEMORY_CLOCK: Final = "gpu_memory_clock_hertz"
GPU_TEMPERATURE: Final = "gpu_temperature_celsius"
GPU_POWER: Final = "gpu_power_watts"
GPU_POWER_LIMIT: Final = "gpu_power_limit_watts"
GPU_ENERGY: Final = "gpu_energy_joules"  # counter: exposed as gpu_energy_joules_total
GPU_PCIE_REPLAYS: Final = "gpu_pcie_replays"  # counter
GPU_XID_ERRORS: Final = "gpu_xid_errors"  # counter, label xid
GPU_XID_LAST: Final = "gpu_xid_last_timestamp_seconds"
GPU_ECC_ERRORS: Final = "gpu_ecc_errors"  # counter, label type
GPU_REMAPPED_ROWS: Final = "gpu_remapped_rows"  # label kind
GPU_ROW_REMAP_PENDING: Final = "gpu_row_remap_pending"
GPU_ROW_REMAP_FAILED: Final = "gpu_row_remap_failed"
GPU_THROTTLE: Final = "gpu_throttle_seconds"  # counter, label reason
GPU_HEALTH_STATE: Final = "gpu_health_state"  # label state, 1 for the current one
GPU_CORDONED: Final = "gpu_cordoned"

# --- Collectors (node_exporter's pattern) ---------------------------------------
COLLECTOR_SUCCESS: Final = "gpu_agent_collector_success"
COLLECTOR_DURATION: Final = "gpu_agent_collector_duration_seconds"
COLLECTOR_LAST_SUCCESS: Final = "gpu_agent_collector_last_success_timestamp_seconds"
COLLECTOR_SAMPLE_AGE: Final = "gpu_agent_collector_sample_age_seconds"
COLLECTOR_ERRORS: Final = "gpu_agent_collector_errors"  # counter, labels collector, field, reason

# --- The agent's own state --------------------------------------------------------
BUILD: Final = "gpu_agent_build"  # info: exposed as gpu_agent_build_info
LEASES: Final = "gpu_agent_leases"  # label state
LEASE_STARTS: Final = "gpu_agent_lease_starts"  # counter, label outcome
LEASE_START_DURATION: Final = "gpu_agent_lease_start_duration_seconds"
LEASE_HEALTH_CHECKS: Final = "gpu_agent_lease_health_checks"  # counter, lease_id, kind, result
LEASE_RESTARTS: Final = "gpu_agent_lease_restarts"  # counter, labels lease_id, cause
LEASE_ENDPOINT_READY: Final = "gpu_agent_lease_endpoint_ready"  # labels lease_id, port
IMAGE_PULL_DURATION: Final = "gpu_agent_image_pull_duration_seconds"
IMAGE_PULL_BYTES: Final = "gpu_agent_image_pull_bytes"  # counter
COORDINATOR_CONNECTED: Final = "gpu_agent_coordinator_connected"
ISOLATION_VERIFIED: Final = "gpu_agent_isolation_verified"
RETAINED_OUTPUT_BYTES: Final = "gpu_agent_retained_output_bytes"
RETAINED_OUTPUTS: Final = "gpu_agent_retained_outputs"
COORDINATOR_RECONNECTS: Final = "gpu_agent_coordinator_reconnects"  # counter
HEARTBEATS_SENT: Final = "gpu_agent_heartbeats_sent"  # counter
HEARTBEATS_FAILED: Final = "gpu_agent_heartbeats_failed"  # counter
LAST_HEARTBEAT: Final = "gpu_agent_last_heartbeat_timestamp_seconds"
USAGE_PENDING: Final = "gpu_agent_usage_records_pending"
USAGE_OLDEST_AGE: Final = "gpu_agent_usage_oldest_pending_age_seconds"
USAGE_BACKLOG_ALERT: Final = "gpu_agent_usage_backlog_alert"
USAGE_BACKLOG_THRESHOLD: Final = "gpu_agent_usage_backlog_threshold_records"
USAGE_GPU_SECONDS: Final = "gpu_agent_usage_gpu_seconds"  # counter, label lease_id
ATTESTATION_PASSED: Final = "gpu_agent_attestation_passed"
ATTESTATION_SCORE: Final = "gpu_agent_attestation_score_ratio"
ATTESTATION_TIMESTAMP: Final = "gpu_agent_attestation_timestamp_seconds"
ATTESTATION_EXPIRY: Final = "gpu_agent_attestation_expiry_timestamp_seconds"
GPUS_CORDONED: Final = "gpu_agent_gpus_cordoned"
