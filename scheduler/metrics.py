"""The reference scheduler's own Prometheus metrics, on a registry of its own.

Fleet state (nodes and leases by state) is read at scrape time from snapshot
functions the scheduler provides, so the numbers cannot drift from its store;
events (placements, usage records, heartbeats, attestations) are counters and a
histogram the scheduler updates as they happen. Served by
``start_metrics_server(listen, metrics)`` on ``metrics.listen`` (default
127.0.0.1:9471).
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from gpuagent import PROTOCOL_VERSION, __version__

log = logging.getLogger(__name__)

NODES = "gpu_scheduler_nodes"
LEASES = "gpu_scheduler_leases"
PLACEMENT_DURATION = "gpu_scheduler_placement_duration_seconds"
USAGE_INGESTED = "gpu_scheduler_usage_records_ingested"  # counter
USAGE_DUPLICATES = "gpu_scheduler_usage_records_duplicate"  # counter
HEARTBEATS = "gpu_scheduler_heartbeats"  # counter: rate() = heartbeats per second
ATTESTATIONS = "gpu_scheduler_attestations"  # counter, label outcome
BUILD = "gpu_scheduler_build"  # info
PRICE_ASK = "gpu_scheduler_price_ask_per_gpu_hour"  # gauge, label gpu_model
PRICE_ACCEPTED = "gpu_scheduler_price_accepted_per_gpu_hour"  # gauge, label gpu_model

NODE_STATES = ("online", "suspect", "offline", "draining")
LEASE_STATES = (
    "pending",
    "assigned",
    "pulling",
    "starting",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
    "lost",
    "rejected",
)
ATTESTATION_OUTCOMES = ("passed", "failed", "timeout", "invalid")

PLACEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

StateCounts = Callable[[], Mapping[str, int]]


class _Prices(Protocol):
    @property
    def ask_median_micros(self) -> int | None: ...

    @property
    def accepted_median_micros(self) -> int | None: ...


PriceSource = Callable[[], Mapping[str, _Prices]]


class _FleetCollector(Collector):
    def __init__(self, metrics: SchedulerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        yield _state_family(NODES, "Nodes known to the scheduler, by state", NODE_STATES, m.nodes)
        yield _state_family(LEASES, "Leases, by state", LEASE_STATES, m.leases)
        yield from _price_families(m.prices)


def _price_families(fn: PriceSource | None) -> Iterable[Metric]:
    ask = GaugeMetricFamily(
        PRICE_ASK,
        "Median ask of the online nodes per GPU-hour, by GPU model, in units of the "
        "settlement currency (price history sample)",
        labels=["gpu_model"],
    )
    accepted = GaugeMetricFamily(
        PRICE_ACCEPTED,
        "Median price per GPU-hour of the leases placed in the last 24 h, by GPU model, "
        "in units of the settlement currency",
        labels=["gpu_model"],
    )
    if fn is not None:
        try:
            prices = fn()
        except Exception:
            log.exception("metrics snapshot failed", extra={"metric": PRICE_ASK})
            prices = {}
        for model, p in prices.items():
            if p.ask_median_micros is not None:
                ask.add_metric([model], p.ask_median_micros / 1e6)
            if p.accepted_median_micros is not None:
                accepted.add_metric([model], p.accepted_median_micros / 1e6)
    yield ask
    yield accepted


def _state_family(
    name: str, doc: str, known: tuple[str, ...], fn: StateCounts | None
) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=["state"])
    counts: dict[str, int] = dict.fromkeys(known, 0)
    if fn is not None:
        try:
            counts.update(fn())
        except Exception:
            # One broken snapshot costs its family, never the scrape.
            log.exception("metrics snapshot failed", extra={"metric": name})
            return fam
    for state, n in counts.items():
        fam.add_metric([state], float(n))
    return fam


class SchedulerMetrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        nodes: StateCounts | None = None,
        leases: StateCounts | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.nodes = nodes
        self.leases = leases
        self.prices: PriceSource | None = None  # price history (scheduler/price_history.py)
        ProcessCollector(registry=self.registry)
        Info(BUILD, "Scheduler build; value is always 1", registry=self.registry).info(
            {"version": __version__, "protocol": PROTOCOL_VERSION}
        )
        self.placement_duration = Histogram(
            PLACEMENT_DURATION,
            "Time to choose a node and GPUs for a submitted lease",
            buckets=PLACEMENT_BUCKETS,
            registry=self.registry,
        )
        self.usage_ingested = Counter(
            USAGE_INGESTED, "Usage records stored (each node, seq once)", registry=self.registry
        )
        self.usage_duplicates = Counter(
            USAGE_DUPLICATES,
            "Usage records received again and ignored (already stored)",
            registry=self.registry,
        )
        self.heartbeats = Counter(
            HEARTBEATS, "Heartbeats received from agents", registry=self.registry
        )
        self.attestations = Counter(
            ATTESTATIONS, "Attestation verdicts, by outcome", ["outcome"], registry=self.registry
        )
        for outcome in ATTESTATION_OUTCOMES:
            self.attestations.labels(outcome)
        self.registry.register(_FleetCollector(self))

    def set_sources(self, *, nodes: StateCounts | None, leases: StateCounts | None) -> None:
        self.nodes, self.leases = nodes, leases

    def placement(self, seconds: float) -> None:
        self.placement_duration.observe(seconds)

    def usage_records(self, stored: int, duplicates: int = 0) -> None:
        self.usage_ingested.inc(max(stored, 0))
        self.usage_duplicates.inc(max(duplicates, 0))

    def heartbeat(self) -> None:
        self.heartbeats.inc()

    def attestation(self, outcome: str) -> None:
        self.attestations.labels(outcome).inc()


class MetricsServer:
    """Handle on the running endpoint; ``close()`` is idempotent."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server: WSGIServer | None = server
        self._thread = thread

    @property
    def port(self) -> int:
        assert self._server is not None, "closed"
        return int(self._server.server_address[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)


@dataclass(frozen=True)
class MetricsSecurity:
    """TLS and basic auth for ``/metrics`` (``metrics.cert_file``/``basic_auth_*``)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    basic_auth_user: str | None = None
    basic_auth_password: str | None = None


def _basic_auth(app: Any, user: str, password: str) -> Any:
    """WSGI middleware: 401 unless the request carries ``user:password``."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        given = str(environ.get("HTTP_AUTHORIZATION", ""))
        # Constant time: the comparison must not tell a scraper how much was right.
        if not hmac.compare_digest(given.encode(), expected.encode()):
            start_response(
                "401 Unauthorized",
                [("WWW-Authenticate", 'Basic realm="gpu-scheduler"'), ("Content-Length", "0")],
            )
            return [b""]
        return app(environ, start_response)

    return guarded


def start_metrics_server(
    listen: str, metrics: SchedulerMetrics, security: MetricsSecurity | None = None
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (port 0 picks a free one) in a daemon thread.

    Raises ``ValueError`` naming ``metrics.listen`` when the address is malformed
    and ``OSError`` when it cannot be bound or the TLS files cannot be read.
    """
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics.listen {listen!r}: expected host:port, e.g. 127.0.0.1:9471")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":port" asks for every interface
    security = security or MetricsSecurity()
    app = make_wsgi_app(metrics.registry)
    if security.basic_auth_user is not None and security.basic_auth_password is not None:
        app = _basic_auth(app, security.basic_auth_user, security.basic_auth_password)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, int(port_text), app, Server, handler_class=_QuietHandler)
    if security.cert_file is not None and security.key_file is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(security.cert_file), str(security.key_file))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info(
        "scheduler metrics listening",
        extra={
            "address": f"{host}:{server.server_port}",
            "tls": security.cert_file is not None,
            "basic_auth": security.basic_auth_user is not None,
        },
    )
    return MetricsServer(server, thread)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # scrapes every few seconds are not worth a log line each
