"""The GPU collector: dcgm-exporter's default set, read at scrape time.

Reads the ``GpuSource`` in a worker thread under ``timeout``. When the read
hangs or fails, the last good snapshot is served and the collector's own
series say so (``gpu_agent_collector_success{collector="gpu"} 0`` and the
sample's age), so a stuck driver shows up on the dashboard instead of as a
scrape timeout. Fields a GPU cannot report are left out and counted in
``gpu_agent_collector_errors_total``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import names
from .bounded import BoundedCall
from .gpu_sample import FieldErrorReason, GpuReading, GpuSnapshot, GpuSource

log = logging.getLogger(__name__)

COLLECTOR = "gpu"

V = TypeVar("V")

# Every state is exported (0 or 1) so a query for one state never finds a gap.
HEALTH_STATES = ("healthy", "degraded", "unhealthy", "lost")


@dataclass(frozen=True)
class GpuHealth:
    """What the health monitor concluded about one GPU (keyed by UUID)."""

    state: str = "healthy"
    cordoned: bool = False
    reason: str = ""


LeaseMap = Callable[[], Mapping[str, str]]  # GPU UUID -> lease id holding it
HealthMap = Callable[[], Mapping[str, GpuHealth]]  # GPU UUID -> health


class CollectorErrors:
    """``gpu_agent_collector_errors_total{collector, field, reason}``, shared by collectors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}

    def add(self, collector: str, field: str, reason: str, n: int = 1) -> None:
        with self._lock:
            key = (collector, field, reason)
            self._counts[key] = self._counts.get(key, 0) + n

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(
            names.COLLECTOR_ERRORS,
            "Fields a collector could not read, by collector, field and reason; "
            "the field is left out of the scrape",
            labels=["collector", "field", "reason"],
        )
        with self._lock:
            for (collector, field, reason), n in sorted(self._counts.items()):
                fam.add_metric([collector, field, reason], n)
        return fam


class MetaCollector(Collector):
    """Collector status and error counts; registered after every collector it reports on,
    so a scrape shows the status of that same scrape."""

    def __init__(self, errors: CollectorErrors, status: CollectorStatus) -> None:
        self._errors = errors
        self._status = status

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._status.families()
        yield self._errors.family()


class CollectorStatus:
    """node_exporter-style success/duration/age series for each collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[bool, float, float | None, float | None]] = {}

    def record(
        self, collector: str, ok: bool, duration: float, last_ok: float | None, age: float | None
    ) -> None:
        with self._lock:
            self._rows[collector] = (ok, duration, last_ok, age)

    def families(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            names.COLLECTOR_SUCCESS,
            "1 when the collector's last scrape read fresh data, 0 when it served a stale sample",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            names.COLLECTOR_DURATION,
            "Time the collector spent in its last scrape",
            labels=["collector"],
        )
        last_ok = GaugeMetricFamily(
            names.COLLECTOR_LAST_SUCCESS,
            "When the collector last read fresh data (Unix time)",
            labels=["collector"],
        )
        age = GaugeMetricFamily(
            names.COLLECTOR_SAMPLE_AGE,
            "Age of the data served by the collector's last scrape",
            labels=["collector"],
        )
        with self._lock:
            for collector, (ok, secs, last, sample_age) in sorted(self._rows.items()):
                success.add_metric([collector], 1.0 if ok else 0.0)
                duration.add_metric([collector], secs)
                if last is not None:
                    last_ok.add_metric([collector], last)
                if sample_age is not None:
                    age.add_metric([collector], sample_age)
        yield from (success, duration, last_ok, age)


class GpuCollector(Collector):
    """Custom collector yielding GPU metric families from the newest good snapshot."""

    def __init__(
        self,
        source: GpuSource,
        *,
        timeout: float,
        leases: LeaseMap | None = None,
        health: HealthMap | None = None,
        errors: CollectorErrors | None = None,
        status: CollectorStatus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._timeout = timeout
        self._leases = leases
        self._health = health
        self._clock = clock
        self.errors = errors if errors is not None else CollectorErrors()
        self.status = status if status is not None else CollectorStatus()
        self._call: BoundedCall[GpuSnapshot] = BoundedCall(self._read, COLLECTOR, clock)

    def _read(self) -> GpuSnapshot:
        # Runs in the worker thread: counted once per completed read, whoever serves it.
        snapshot = self._source.read()
        for err in snapshot.field_errors:
            self.errors.add(COLLECTOR, err.field, err.reason)
        return snapshot

    def latest(self) -> tuple[GpuSnapshot | None, float | None]:
        """The newest good snapshot and when it was read, without touching NVML."""
        return self._call.last

    def sample(self) -> tuple[GpuSnapshot | None, bool]:
        """Read (bounded) and return the snapshot to serve and whether it is fresh."""
        started = time.perf_counter()
        outcome = self._call.call(self._timeout)
        duration = time.perf_counter() - started
        if not outcome.ok:
            reason: FieldErrorReason = (
                "timeout" if outcome.error and "timed out" in outcome.error else "error"
            )
            self.errors.add(COLLECTOR, "read", reason)
            log.warning(
                "gpu read failed; serving last good sample",
                extra={"error": outcome.error, "sample_at": outcome.at},
            )
        age = self._clock() - outcome.at if outcome.at is not None else None
        self.status.record(COLLECTOR, outcome.ok, duration, outcome.at, age)
        return outcome.value, outcome.ok

    def describe(self) -> Iterable[Metric]:
        # Empty describe: registering must not trigger an NVML read.
        return []

    def collect(self) -> Iterable[Metric]:
        snapshot, _ = self.sample()
        if snapshot is not None:
            yield from self._families(snapshot)
        yield from self._health_families(snapshot)

    def _lookup(self, fn: Callable[[], Mapping[str, V]] | None, what: str) -> Mapping[str, V]:
        if fn is None:
            return {}
        try:
            return fn()
        except Exception:
            # A broken provider costs its labels, never the scrape.
            log.exception("metrics provider failed", extra={"provider": what})
            self.errors.add(COLLECTOR, what, "error")
            return {}

    def _families(self, snap: GpuSnapshot) -> Iterator[Metric]:
        leases = self._lookup(self._leases, "leases")
        labels = ["gpu", "uuid", "model", "lease_id"]

        # Label values once per GPU, not once per series.
        base_labels = {
            r.index: [str(r.index), r.uuid, r.model, leases.get(r.uuid, "")] for r in snap.gpus
        }

        def base(r: GpuReading) -> list[str]:
            return base_labels[r.index]

        info = GaugeMetricFamily(
            names.GPU_INFO,
            "GPU identity; value is always 1",
            labels=[
                *labels,
                "pci_bus_id",
                "driver_version",
                "cuda_version",
                "compute_capability",
            ],
        )
        for r in snap.gpus:
            info.add_metric(
                [
                    *base(r),
                    r.pci_bus_id or "",
                    snap.driver_version or "",
                    snap.cuda_version or "",
                    r.compute_capability or "",
                ],
                1.0,
            )
        yield info

        gauges: tuple[tuple[str, str, Callable[[GpuReading], float | int | None]], ...] = (
            (
                names.GPU_UTILIZATION,
                "Fraction of time a kernel ran (0-1)",
                lambda r: r.utilization_ratio,
            ),
            (
                names.GPU_MEMORY_UTILIZATION,
                "Fraction of time device memory was read or written (0-1)",
                lambda r: r.memory_utilization_ratio,
            ),
            (names.GPU_MEMORY_USED, "Device memory in use", lambda r: r.memory_used_bytes),
            (names.GPU_MEMORY_FREE, "Device memory free", lambda r: r.memory_free_bytes),
            (names.GPU_MEMORY_TOTAL, "Device memory installed", lambda r: r.memory_total_bytes),
            (names.GPU_SM_CLOCK, "SM clock", lambda r: r.sm_clock_hertz),
            (names.GPU_MEMORY_CLOCK, "Memory clock", lambda r: r.memory_clock_hertz),
            (names.GPU_TEMPERATURE, "GPU die temperature", lambda r: r.temperature_celsius),
            (names.GPU_POWER, "Power draw", lambda r: r.power_watts),
            (names.GPU_POWER_LIMIT, "Enforced power limit", lambda r: r.power_limit_watts),
            (
                names.GPU_XID_LAST,
                "When this agent last saw an Xid error on the GPU (Unix time)",
                lambda r: r.xid_last_timestamp_seconds,
            ),
            (
                names.GPU_ROW_REMAP_PENDING,
                "1 when a row remap is pending (takes effect at the next GPU reset)",
                lambda r: None if r.row_remap_pending is None else float(r.row_remap_pending),
            ),
            (
                names.GPU_ROW_REMAP_FAILED,
                "1 when a row remap failed: the GPU needs service",
                lambda r: None if r.row_remap_failed is None else float(r.row_remap_failed),
            ),
        )
        for name, doc, get in gauges:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for r in snap.gpus:
                value = get(r)
                if value is not None:
                    fam.add_metric(base(r), float(value))
            yield fam

        counters: tuple[tuple[str, str, Callable[[GpuReading], float | int | None]], ...] = (
            (
                names.GPU_ENERGY,
                "Energy used since the driver loaded",
                lambda r: r.energy_joules_total,
            ),
            (names.GPU_PCIE_REPLAYS, "PCIe replays (link retries)", lambda r: r.pcie_replays_total),
        )
        for name, doc, get in counters:
            cfam = CounterMetricFamily(name, doc, labels=labels)
            for r in snap.gpus:
                value = get(r)
                if value is not None:
                    cfam.add_metric(base(r), float(value))
            yield cfam

        labelled: tuple[
            tuple[
                str, str, str, bool, Callable[[GpuReading], Mapping[str, float] | Mapping[int, int]]
            ],
            ...,
        ] = (
            (
                names.GPU_XID_ERRORS,
                "Xid errors seen by this agent, by code",
                "xid",
                True,
                lambda r: r.xid_errors_total,
            ),
            (
                names.GPU_ECC_ERRORS,
                "ECC errors since the driver loaded, by type",
                "type",
                True,
                lambda r: r.ecc_errors_total,
            ),
            (
                names.GPU_THROTTLE,
                "Time the clocks were held down, by reason",
                "reason",
                True,
                lambda r: r.throttle_seconds_total,
            ),
            (
                names.GPU_REMAPPED_ROWS,
                "Memory rows remapped, by kind",
                "kind",
                False,
                lambda r: r.remapped_rows,
            ),
        )
        for name, doc, extra, is_counter, get_map in labelled:
            fam_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            lfam = fam_cls(name, doc, labels=[*labels, extra])
            for r in snap.gpus:
                for key, value in sorted(get_map(r).items()):
                    lfam.add_metric([*base(r), str(key)], float(value))
            yield lfam

    def _health_families(self, snap: GpuSnapshot | None) -> Iterator[Metric]:
        if self._health is None:
            return
        health = self._lookup(self._health, "health")
        cordoned_count = GaugeMetricFamily(
            names.GPUS_CORDONED, "GPUs the agent has taken out of scheduling"
        )
        cordoned_count.add_metric([], float(sum(1 for h in health.values() if h.cordoned)))
        yield cordoned_count
        if snap is None:
            return
        leases = self._lookup(self._leases, "leases")
        labels = ["gpu", "uuid", "model", "lease_id"]
        state = GaugeMetricFamily(
            names.GPU_HEALTH_STATE,
            "1 for the GPU's current health state, 0 for the others",
            labels=[*labels, "state"],
        )
        cordoned = GaugeMetricFamily(
            names.GPU_CORDONED,
            "1 when the agent stopped placing leases on the GPU; reason says why",
            labels=[*labels, "reason"],
        )
        for r in snap.gpus:
            h = health.get(r.uuid, GpuHealth())
            base = [str(r.index), r.uuid, r.model, leases.get(r.uuid, "")]
            for s in HEALTH_STATES:
                state.add_metric([*base, s], 1.0 if h.state == s else 0.0)
            cordoned.add_metric([*base, h.reason if h.cordoned else ""], float(h.cordoned))
        yield state
        yield cordoned
