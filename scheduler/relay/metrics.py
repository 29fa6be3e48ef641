"""The relay's Prometheus metrics, per lease (labels: ``lease_id``).

Per-lease labels are what an operator needs to see which service is hot; a lease's
series stop growing when it ends (a relay restart drops them).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUESTS = "gpu_relay_requests"  # counter, labels lease_id, code
BYTES = "gpu_relay_bytes"  # counter, labels lease_id, direction (to_service | to_buyer)
ACTIVE = "gpu_relay_active_connections"  # gauge, label lease_id
LATENCY = "gpu_relay_response_start_seconds"  # histogram, label lease_id
TUNNELS = "gpu_relay_tunnels"  # gauge: agents with an open tunnel

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            REQUESTS,
            "Buyer requests answered by the relay, by lease and HTTP status",
            ["lease_id", "code"],
            registry=self.registry,
        )
        self.bytes = Counter(
            BYTES,
            "Bytes carried between buyers and services, by lease and direction",
            ["lease_id", "direction"],
            registry=self.registry,
        )
        self.active = Gauge(
            ACTIVE,
            "Buyer connections open to a lease's service",
            ["lease_id"],
            registry=self.registry,
        )
        self.latency = Histogram(
            LATENCY,
            "Request received to response head sent back, through the tunnel",
            ["lease_id"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tunnels = Gauge(TUNNELS, "Agents with an open tunnel", registry=self.registry)

    def request(self, lease_id: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(lease_id, str(code)).inc()
        if seconds is not None:
            self.latency.labels(lease_id).observe(seconds)

    def carried(self, lease_id: str, to_service: int, to_buyer: int) -> None:
        if to_service:
            self.bytes.labels(lease_id, "to_service").inc(to_service)
        if to_buyer:
            self.bytes.labels(lease_id, "to_buyer").inc(to_buyer)
