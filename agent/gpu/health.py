"""GPU health: periodic sampling, Xid events, and self-cordoning of broken GPUs.

Rules (docs/hardware.md is the operator's version):
- UNHEALTHY, and cordoned at once (no new leases): GPU lost, a critical Xid
  (``xid.CRITICAL_XIDS``), uncorrectable ECC errors above the acknowledged
  count, a failed row remap.
- DEGRADED, still leasable, never cordoned, clears by itself: clocks throttled
  for heat or hardware slowdown, a row remap or page retirement pending, a
  degrading Xid (63, 92, 94) within the last ``degraded_xid_window``.
- A cordon is lifted only by ``gpu-agent uncordon``. The daemon then forgives
  what it had seen up to that moment (critical Xids, the uncorrectable ECC
  count). If the fault is still present (a lost GPU, a new error) it cordons
  again at the next check, with a log line.

Every state or cordon change logs one line and is passed to ``on_change``
callbacks (the heartbeat sender, metrics). Nothing here stops the monitor: a
failed check is logged and retried at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from gpuagent.aio import wait_any

from .backend import GpuBackend
from .cordons import CordonFileError, CordonStore
from .model import GpuHealth, GpuSample, HealthState, XidEvent
from .xid import CRITICAL_XIDS, DEGRADING_XIDS, describe

log = logging.getLogger(__name__)

ChangeCallback = Callable[[GpuHealth], None]
# Same shape as agent.metrics' XidCounter.record(uuid, xid, timestamp).
XidSink = Callable[[str, int, float], None]

DEGRADING_THROTTLES = ("sw_thermal", "hw_thermal", "hw_slowdown", "hw_power_brake")


def evaluate(
    sample: GpuSample,
    critical_xids: Counter[int],
    recent_degrading_xids: Iterable[int] = (),
    acknowledged_ecc: int = 0,
) -> tuple[HealthState, tuple[str, ...]]:
    """The health state of one GPU and the reasons for it, worst first."""
    bad: list[str] = []
    off: list[str] = []
    if sample.lost:
        bad.append("GPU lost: fallen off the bus (NVML GpuIsLost)")
    for code, count in sorted(critical_xids.items()):
        bad.append(f"Xid {code} ({describe(code)}) x{count}")
    if sample.ecc_uncorrected is not None and sample.ecc_uncorrected > acknowledged_ecc:
        bad.append(f"{sample.ecc_uncorrected - acknowledged_ecc} uncorrectable ECC error(s)")
    if sample.row_remap_failed:
        bad.append("row remapping failed: the GPU needs service")
    for code in sorted(set(recent_degrading_xids)):
        off.append(f"Xid {code} ({describe(code)})")
    if sample.row_remap_pending or sample.retired_pages_pending:
        off.append("memory row remap / page retirement pending: reset the GPU to apply")
    throttles = [r for r in sample.throttle_reasons if r in DEGRADING_THROTTLES]
    if throttles:
        off.append(f"clocks throttled: {', '.join(throttles)}")
    if bad:
        return HealthState.UNHEALTHY, tuple(bad + off)
    if off:
        return HealthState.DEGRADED, tuple(off)
    return HealthState.HEALTHY, ()


class HealthMonitor:
    def __init__(
        self,
        backend: GpuBackend,
        cordons: CordonStore,
        *,
        interval: float = 5.0,
        event_timeout: float = 0.5,
        degraded_xid_window: float = 900.0,
        xid_sink: XidSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.cordons = cordons
        self.interval = interval
        self.event_timeout = event_timeout
        self.degraded_xid_window = degraded_xid_window
        self.xid_sink = xid_sink
        self.on_change: list[ChangeCallback] = []
        self._clock = clock
        self._lock = threading.Lock()
        self._health: dict[int, GpuHealth] = {}
        self._uuids: dict[int, str | None] = {}
        self._critical: dict[int, list[XidEvent]] = {}
        self._degrading: dict[int, list[XidEvent]] = {}
        self._xid_counts: dict[int, Counter[int]] = {}
        self._started = False
        self.checks = 0  # completed checks, for tests and /readyz

    # -- blocking parts (worker threads) -----------------------------------------

    def start(self) -> None:
        """Learn the GPUs, load cordons, subscribe to Xid events. Blocking."""
        for info in self.backend.inventory():
            self._uuids[info.index] = info.uuid
        try:
            self.cordons.load()
        except CordonFileError as exc:
            log.error("cordon file unreadable; starting with none", extra={"error": str(exc)})
        self.backend.open_events()
        self._started = True

    def check_once(self) -> list[GpuHealth]:
        """Sample every GPU, apply cordons and releases; returns what changed. Blocking."""
        if not self._started:
            self.start()
        try:
            self.cordons.reload_if_changed()
        except CordonFileError as exc:
            log.error("cordon file unreadable; keeping the last state", extra={"error": str(exc)})
        samples = {s.index: s for s in self.backend.sample_all()}
        now = self._clock()
        for index in self._uuids:
            # A GPU that vanished from the device list is as good as lost.
            if index not in samples:
                samples[index] = GpuSample(index, self._uuids[index], now, lost=True)
        changes = []
        for index, sample in sorted(samples.items()):
            uuid = sample.uuid or self._uuids.get(index)
            self._uuids[index] = uuid
            self._apply_release(index, uuid, sample)
            changed = self._judge(index, uuid, sample)
            if changed is not None:
                changes.append(changed)
        self.checks += 1
        return changes

    def record_events(self, events: Iterable[XidEvent]) -> bool:
        """Count Xid events; True when one is critical (worth an immediate check)."""
        critical = False
        per_gpu: Counter[tuple[int | None, int]] = Counter()
        for event in events:
            per_gpu[(event.index, event.code)] += 1
            if event.uuid is not None and self.xid_sink is not None:
                self.xid_sink(event.uuid, event.code, event.timestamp)
            if event.index is None:
                continue
            with self._lock:
                self._xid_counts.setdefault(event.index, Counter())[event.code] += 1
                if event.code in CRITICAL_XIDS:
                    self._critical.setdefault(event.index, []).append(event)
                    critical = True
                elif event.code in DEGRADING_XIDS:
                    self._degrading.setdefault(event.index, []).append(event)
        # One line per GPU and code per batch, so an Xid storm cannot flood the log.
        for (index, code), count in per_gpu.items():
            level = logging.ERROR if code in CRITICAL_XIDS else logging.WARNING
            log.log(
                level,
                "GPU Xid event",
                extra={
                    "gpu": index,
                    "uuid": self._uuids.get(index) if index is not None else None,
                    "xid": code,
                    "count": count,
                    "meaning": describe(code),
                },
            )
        return critical

    def _apply_release(self, index: int, uuid: str | None, sample: GpuSample) -> None:
        if uuid is None:
            return
        released_at = self.cordons.released().get(uuid)
        if released_at is None:
            return
        with self._lock:
            self._critical[index] = [
                e for e in self._critical.get(index, []) if e.timestamp > released_at
            ]
        try:
            self.cordons.consume_release(uuid, sample.ecc_uncorrected)
        except CordonFileError as exc:
            log.error("cannot record the uncordon", extra={"uuid": uuid, "error": str(exc)})
        log.warning(
            "GPU uncordoned by operator; faults seen so far are forgiven",
            extra={"gpu": index, "uuid": uuid, "ecc_uncorrected": sample.ecc_uncorrected},
        )

    def _judge(self, index: int, uuid: str | None, sample: GpuSample) -> GpuHealth | None:
        now = self._clock()
        acknowledged = self.cordons.acknowledged_ecc(uuid) if uuid else 0
        if (
            uuid is not None
            and sample.ecc_uncorrected is not None
            and sample.ecc_uncorrected < acknowledged
        ):
            # The volatile counter went backwards: the GPU was reset, so start over.
            acknowledged = 0
            self._try(lambda: self.cordons.set_acknowledged_ecc(uuid, 0))
        with self._lock:
            critical = Counter(e.code for e in self._critical.get(index, []))
            recent = [
                e.code
                for e in self._degrading.get(index, [])
                if now - e.timestamp <= self.degraded_xid_window
            ]
            counts = dict(self._xid_counts.get(index, {}))
        state, reasons = evaluate(sample, critical, recent, acknowledged)
        if (
            state == HealthState.UNHEALTHY
            and uuid is not None
            and not self.cordons.is_cordoned(uuid)
        ):
            reason = "; ".join(reasons)
            if self._try(lambda: self.cordons.cordon(uuid, reason, "health", index)):
                log.error(
                    "GPU cordoned: unhealthy, no new leases until `gpu-agent uncordon`",
                    extra={"gpu": index, "uuid": uuid, "reasons": list(reasons)},
                )
        cordon = self.cordons.get(uuid) if uuid else None
        # Unhealthy GPUs are never leasable, even when the cordon could not be written.
        health = GpuHealth(
            index=index,
            uuid=uuid,
            state=state,
            reasons=reasons,
            cordoned=cordon is not None,
            cordon_reason=cordon.reason if cordon else None,
            xid_counts=counts,
            sample=sample,
        )
        with self._lock:
            previous = self._health.get(index)
            self._health[index] = health
        if previous is not None and (
            previous.state,
            previous.cordoned,
            previous.reasons,
        ) == (health.state, health.cordoned, health.reasons):
            return None
        if previous is None or previous.state != health.state:
            level = logging.INFO if state == HealthState.HEALTHY else logging.WARNING
            log.log(
                level,
                "GPU health changed",
                extra={
                    "gpu": index,
                    "uuid": uuid,
                    "from": previous.state.value if previous else None,
                    "to": state.value,
                    "reasons": list(reasons),
                },
            )
        if previous is not None and previous.cordoned != health.cordoned:
            log.warning(
                "GPU cordon changed",
                extra={"gpu": index, "uuid": uuid, "cordoned": health.cordoned},
            )
        return health

    @staticmethod
    def _try(write: Callable[[], object]) -> bool:
        try:
            write()
        except CordonFileError as exc:
            log.error("cannot update the cordon file", extra={"error": str(exc)})
            return False
        return True

    # -- what the rest of the agent reads ------------------------------------------

    def snapshot(self) -> list[GpuHealth]:
        with self._lock:
            return [self._health[i] for i in sorted(self._health)]

    def healthy_uuids(self) -> set[str]:
        """GPUs a new lease may use: known UUID, not cordoned, not unhealthy."""
        return {h.uuid for h in self.snapshot() if h.leasable and h.uuid is not None}

    def xid_counts(self, index: int) -> dict[int, int]:
        with self._lock:
            return dict(self._xid_counts.get(index, {}))

    # -- asyncio ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval`` and at once after a critical Xid, until ``stop``."""
        await asyncio.to_thread(self.start)
        wake = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._sample_loop(stop, wake), name="gpu-health-sample")
            if self.backend.events_available:
                tg.create_task(self._event_loop(stop, wake), name="gpu-health-events")

    async def _sample_loop(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                changes = await asyncio.to_thread(self.check_once)
            except Exception:  # never let one bad check end health monitoring
                log.exception("GPU health check failed; retrying at the next interval")
            else:
                self._notify(changes)
            await wait_any(stop, wake, within=self.interval)
            wake.clear()

    async def _event_loop(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                events = await asyncio.to_thread(self.backend.wait_events, self.event_timeout)
                if events and self.record_events(events):
                    wake.set()
            except Exception:
                log.exception("Xid event wait failed; retrying")
                await wait_any(stop, within=self.interval)

    def _notify(self, changes: list[GpuHealth]) -> None:
        for health in changes:
            for callback in list(self.on_change):
                try:
                    callback(health)
                except Exception:
                    log.exception("health change callback failed", extra={"uuid": health.uuid})
