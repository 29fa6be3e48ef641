"""The agent's own metrics: what the daemon's parts record as things happen.

``AgentMetrics`` owns its series in the registry it is given (never the global
one). Event-driven values (lease starts, pulls, heartbeats) are ordinary
counters and histograms the components update; state that already lives
elsewhere (leases by state) is read at scrape time from a snapshot function so
the two can never disagree. Every setter is cheap and thread-safe, so the
daemon may call them from the event loop or from worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.leases.states import LeaseState
from gpuagent import PROTOCOL_VERSION, __version__

from . import names

log = logging.getLogger(__name__)

# The lease lifecycle (DESIGN.md); all are exported, 0 when empty, so a query
# for one state finds a series even before the first lease.
LEASE_STATES = tuple(state.value for state in LeaseState)

# Outcomes of a lease start, pre-created at 0 so rate() works from the first one.
START_OUTCOMES = ("started", "rejected", "pull_failed", "start_failed", "cancelled")

# Lease starts include image pulls, hence the long tail.
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
PULL_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

LeaseStates = Callable[[], Mapping[str, int]]  # state -> number of leases in it
# (lease id, port name) -> whether the port's last check passed
EndpointReadiness = Callable[[], Mapping[tuple[str, str], bool]]


@dataclass(frozen=True)
class Attestation:
    passed: bool
    score: float  # 0-1: how the measured performance compares with the declared SKU
    at: float  # Unix time of the verdict
    expires_at: float | None = None


class _StateCollector(Collector):
    """Series computed at scrape time from state the agent holds."""

    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return self._owner._collect_state()


class AgentMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        lease_states: LeaseStates | None = None,
        endpoint_readiness: EndpointReadiness | None = None,
        usage_alert_records: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._lease_states = lease_states
        self._endpoint_readiness = endpoint_readiness
        self._usage_alert_records = usage_alert_records
        self._usage_pending = 0
        self._usage_oldest: float | None = None
        self._attestations: dict[tuple[int, str], Attestation] = {}
        # Plain copies of the link's state for the status document, which must
        # not reach into prometheus_client's private values.
        self._link: dict[str, Any] = {
            "connected": False,
            "last_heartbeat_at": None,
            "reconnects": 0,
            "heartbeats_sent": 0,
            "heartbeats_failed": 0,
        }

        build = Info(names.BUILD, "Agent build; value is always 1", registry=registry)
        build.info(
            {
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "python": platform.python_version(),
            }
        )
        self.lease_starts = Counter(
            names.LEASE_STARTS,
            "Lease starts, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in START_OUTCOMES:
            self.lease_starts.labels(outcome)
        self.lease_start_duration = Histogram(
            names.LEASE_START_DURATION,
            "Time from LeaseAssign to the container running (includes the image pull)",
            buckets=START_BUCKETS,
            registry=registry,
        )
        # Service leases (leases/health.py, leases/restarts.py): per lease, dropped when
        # the lease ends so ended leases do not pile up series.
        self.lease_health_checks = Counter(
            names.LEASE_HEALTH_CHECKS,
            "Health checks of service lease ports, by kind (http, tcp) and result (pass, fail)",
            ["lease_id", "kind", "result"],
            registry=registry,
        )
        self.lease_restarts = Counter(
            names.LEASE_RESTARTS,
            "Service lease container restarts, by cause (exit, liveness)",
            ["lease_id", "cause"],
            registry=registry,
        )
        self.image_pull_duration = Histogram(
            names.IMAGE_PULL_DURATION,
            "Time spent pulling lease images",
            buckets=PULL_BUCKETS,
            registry=registry,
        )
        self.image_pull_bytes = Counter(
            names.IMAGE_PULL_BYTES, "Bytes downloaded by image pulls", registry=registry
        )
        self.coordinator_connected = Gauge(
            names.COORDINATOR_CONNECTED,
            "1 while the stream to the coordinator is up and welcomed",
            registry=registry,
        )
        self.isolation_verified = Gauge(
            names.ISOLATION_VERIFIED,
            "1 when the last isolation self-test found every probe blocked, else 0",
            registry=registry,
        )
        self.retained_output_bytes = Gauge(
            names.RETAINED_OUTPUT_BYTES,
            "Bytes of lease output archives kept on this node for their buyers",
            registry=registry,
        )
        self.retained_outputs = Gauge(
            names.RETAINED_OUTPUTS,
            "Lease output archives kept on this node for their buyers",
            registry=registry,
        )
        self.reconnects = Counter(
            names.COORDINATOR_RECONNECTS,
            "Times the agent re-dialled the coordinator after losing the stream",
            registry=registry,
        )
        self.heartbeats_sent = Counter(
            names.HEARTBEATS_SENT, "Heartbeats written to the stream", registry=registry
        )
        self.heartbeats_failed = Counter(
            names.HEARTBEATS_FAILED, "Heartbeats that could not be sent", registry=registry
        )
        self.last_heartbeat = Gauge(
            names.LAST_HEARTBEAT,
            "When the last heartbeat was sent (Unix time); 0 before the first",
            registry=registry,
        )
        self.usage_gpu_seconds = Counter(
            names.USAGE_GPU_SECONDS,
            "GPU-seconds metered to leases (allocated time, the billable quantity)",
            registry=registry,
        )
        registry.register(_StateCollector(self))

    # --- lease lifecycle -------------------------------------------------------
    def set_lease_states(self, fn: LeaseStates) -> None:
        """Where ``gpu_agent_leases{state}`` reads from (the lease manager's snapshot)."""
        self._lease_states = fn

    def lease_started(self, outcome: str, duration: float | None = None) -> None:
        self.lease_starts.labels(outcome).inc()
        if duration is not None:
            self.lease_start_duration.observe(duration)

    # --- service leases (leases.manager.ServiceObserver) -----------------------------
    def health_check(self, lease_id: str, kind: str, passed: bool) -> None:
        self.lease_health_checks.labels(lease_id, kind, "pass" if passed else "fail").inc()

    def restarted(self, lease_id: str, cause: str) -> None:
        self.lease_restarts.labels(lease_id, cause).inc()

    def lease_ended(self, lease_id: str) -> None:
        for kind in ("http", "tcp"):
            for result in ("pass", "fail"):
                with contextlib.suppress(KeyError):
                    self.lease_health_checks.remove(lease_id, kind, result)
        for cause in ("exit", "liveness"):
            with contextlib.suppress(KeyError):
                self.lease_restarts.remove(lease_id, cause)

    def image_pulled(self, duration: float, size_bytes: int) -> None:
        self.image_pull_duration.observe(duration)
        self.image_pull_bytes.inc(max(size_bytes, 0))

    def set_isolation(self, verified: bool) -> None:
        self.isolation_verified.set(1.0 if verified else 0.0)

    def set_retained_outputs(self, count: int, size: int) -> None:
        self.retained_outputs.set(count)
        self.retained_output_bytes.set(size)

    # --- coordinator link -------------------------------------------------------
    def set_connected(self, connected: bool) -> None:
        self.coordinator_connected.set(1.0 if connected else 0.0)
        with self._lock:
            self._link["connected"] = connected

    def reconnected(self) -> None:
        self.reconnects.inc()
        with self._lock:
            self._link["reconnects"] += 1

    def heartbeat_sent(self, at: float | None = None) -> None:
        when = self._clock() if at is None else at
        self.heartbeats_sent.inc()
        self.last_heartbeat.set(when)
        with self._lock:
            self._link["heartbeats_sent"] += 1
            self._link["last_heartbeat_at"] = when

    def heartbeat_failed(self) -> None:
        self.heartbeats_failed.inc()
        with self._lock:
            self._link["heartbeats_failed"] += 1

    def is_connected(self) -> bool:
        with self._lock:
            return bool(self._link["connected"])

    def link_state(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._link)

    # --- usage outbox ----------------------------------------------------------
    def set_usage_backlog(self, pending: int, oldest_created_at: float | None) -> None:
        """Called by the outbox after each append and prune (it holds the numbers)."""
        with self._lock:
            self._usage_pending = max(pending, 0)
            self._usage_oldest = oldest_created_at if pending > 0 else None

    def usage_metered(self, gpu_seconds: float) -> None:
        self.usage_gpu_seconds.inc(max(gpu_seconds, 0.0))

    # --- attestation --------------------------------------------------------------
    def set_attestation(self, gpu: int, uuid: str, result: Attestation) -> None:
        with self._lock:
            self._attestations[(gpu, uuid)] = result

    def usage_backlog(self) -> tuple[int, float | None]:
        with self._lock:
            return self._usage_pending, self._usage_oldest

    def _collect_state(self) -> Iterable[Metric]:
        leases = GaugeMetricFamily(names.LEASES, "Leases on this node, by state", labels=["state"])
        counts: dict[str, int] = dict.fromkeys(LEASE_STATES, 0)
        if self._lease_states is not None:
            # The snapshot is in-memory; a failure costs this family, not the scrape.
            try:
                counts.update(self._lease_states())
            except Exception:
                log.exception("lease state snapshot failed; leases left out of this scrape")
                counts = {}
        for state, n in counts.items():
            leases.add_metric([state], float(n))
        yield leases

        if self._endpoint_readiness is not None:
            ready = GaugeMetricFamily(
                names.LEASE_ENDPOINT_READY,
                "1 while a service lease port's last health check passed, else 0",
                labels=["lease_id", "port"],
            )
            try:
                readiness = dict(self._endpoint_readiness())
            except Exception:
                log.exception("endpoint readiness snapshot failed; left out of this scrape")
                readiness = {}
            for (lease_id, port), up in sorted(readiness.items()):
                ready.add_metric([lease_id, port], 1.0 if up else 0.0)
            yield ready

        now = self._clock()
        with self._lock:
            pending, oldest = self._usage_pending, self._usage_oldest
            attestations = sorted(self._attestations.items())
        pending_fam = GaugeMetricFamily(
            names.USAGE_PENDING, "Usage records written but not yet acked by the coordinator"
        )
        pending_fam.add_metric([], float(pending))
        yield pending_fam
        age = GaugeMetricFamily(
            names.USAGE_OLDEST_AGE, "Age of the oldest unacked usage record; 0 when none"
        )
        age.add_metric([], max(now - oldest, 0.0) if oldest is not None else 0.0)
        yield age
        threshold = GaugeMetricFamily(
            names.USAGE_BACKLOG_THRESHOLD,
            "Pending records above which the backlog alert is raised",
        )
        threshold.add_metric([], float(self._usage_alert_records))
        yield threshold
        alert = GaugeMetricFamily(
            names.USAGE_BACKLOG_ALERT, "1 when pending usage records exceed the threshold"
        )
        alert.add_metric([], 1.0 if pending > self._usage_alert_records else 0.0)
        yield alert

        gpu_labels = ["gpu", "uuid"]
        passed = GaugeMetricFamily(
            names.ATTESTATION_PASSED,
            "1 when the GPU's last attestation passed, 0 when it failed",
            labels=gpu_labels,
        )
        score = GaugeMetricFamily(
            names.ATTESTATION_SCORE,
            "Measured performance relative to the declared SKU (0-1) in the last attestation",
            labels=gpu_labels,
        )
        stamp = GaugeMetricFamily(
            names.ATTESTATION_TIMESTAMP,
            "When the GPU was last attested (Unix time)",
            labels=gpu_labels,
        )
        expiry = GaugeMetricFamily(
            names.ATTESTATION_EXPIRY,
            "When the GPU's attestation expires (Unix time)",
            labels=gpu_labels,
        )
        for (gpu, uuid), result in attestations:
            key = [str(gpu), uuid]
            passed.add_metric(key, 1.0 if result.passed else 0.0)
            score.add_metric(key, result.score)
            stamp.add_metric(key, result.at)
            if result.expires_at is not None:
                expiry.add_metric(key, result.expires_at)
        yield from (passed, score, stamp, expiry)
