"""The metering loop: sample running leases, close intervals, append signed records.

Every ``sample_interval`` the sampler reads each running lease's container
counters and GPUs (one worker thread per tick: file reads and NVML block),
folds them into the lease's ``LeaseMeter`` and, once ``record_interval`` has
passed since the lease's last closed interval, appends the closed intervals to
the outbox together with the lease's new cursor. Nothing is sent from here:
the link reads the outbox, so a record exists on disk before anyone sees it.

Durations come from the injected monotonic clock, timestamps for people from
the injected wall clock; tests step the wall clock to show it never changes
a bill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gpuagent.usage import SignedUsageRecord, UsageRecord

from ..config import MeteringConfig
from .cgroup import ContainerCounters
from .intervals import Point, wall_at
from .meter import LeaseMeter
from .outbox import LeaseCursor, Outbox, OutboxStats
from .sources import (
    ContainerReader,
    GpuUsage,
    GpuUsageSource,
    LeaseSource,
    MeteredLease,
    ReaderFactory,
    cgroup_reader,
)

log = logging.getLogger(__name__)

# A lease missing from the lease source for this many ticks in a row, without a
# close_lease call, is closed where it was last seen running.
VANISHED_AFTER_TICKS = 2
# Leases whose final record was written, remembered so they are not looked up
# again; the outbox's closed cursor is what guarantees it, this only saves the
# lookup. Bounded: a long-lived agent runs an unbounded number of leases.
FINISHED_REMEMBERED = 4096

OnRecords = Callable[[Sequence[SignedUsageRecord]], None]


@dataclass
class _Tracked:
    meter: LeaseMeter
    reader: ContainerReader


class Sampler:
    def __init__(
        self,
        outbox: Outbox,
        lease_source: LeaseSource,
        gpu_source: GpuUsageSource,
        sign: Callable[[bytes], bytes],
        node_id: str,
        config: MeteringConfig,
        *,
        clock_monotonic_ns: Callable[[], int] = time.monotonic_ns,
        clock_wall_ns: Callable[[], int] = time.time_ns,
        reader_factory: ReaderFactory = cgroup_reader,
        on_records: OnRecords | None = None,
    ) -> None:
        self._outbox = outbox
        self._lease_source = lease_source
        self._gpu_source = gpu_source
        self._sign = sign
        self._node_id = node_id
        self._config = config
        self._mono = clock_monotonic_ns
        self._wall = clock_wall_ns
        self._reader_factory = reader_factory
        self._on_records = on_records
        self._record_ns = round(config.record_interval * 1e9)
        self._tracked: dict[str, _Tracked] = {}
        self._finished: dict[str, None] = {}  # insertion-ordered set, oldest first
        # One tick or close at a time: both move the same cursors.
        self._lock = asyncio.Lock()
        self.stats: OutboxStats | None = None

    @property
    def record_interval(self) -> float:
        return self._record_ns / 1e9

    def set_record_interval(self, seconds: float) -> float:
        """A new record length (the coordinator's ``metering_interval``), from the next
        record on; never below ``sample_interval`` (a record holds at least one sample).
        Returns the length applied."""
        applied = max(seconds, self._config.sample_interval)
        if applied != seconds:
            log.warning(
                "record interval below the sample interval; using the sample interval",
                extra={"requested": seconds, "applied": applied},
            )
        self._record_ns = round(applied * 1e9)
        return applied

    @property
    def backlog_alert(self) -> bool:
        """Pending records passed ``outbox_alert_records``; metering carries on."""
        return self.stats is not None and self.stats.backlog_alert

    @property
    def metered_leases(self) -> list[str]:
        return sorted(self._tracked)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``sample_interval`` until ``stop``; a failing tick is logged, not fatal."""
        loop = asyncio.get_running_loop()
        interval = self._config.sample_interval
        # Pending counts are known before the first record of this run.
        self.stats = await asyncio.to_thread(self._outbox.stats)
        next_at = loop.time()
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("usage sampling tick failed; retrying next tick")
            # A fixed schedule, not sleep(interval): ticks do not drift by their own cost.
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def tick(self) -> list[SignedUsageRecord]:
        """Sample once; append every interval now due. Returns what was appended."""
        async with self._lock:
            leases = {lease.lease_id: lease for lease in self._lease_source()}
            await self._track(leases)
            now = Point(self._mono(), self._wall())
            targets = [(lid, t) for lid, t in self._tracked.items() if lid in leases]
            samples = await asyncio.to_thread(self._read, targets)
            due: list[tuple[str, list[UsageRecord], LeaseCursor]] = []
            for lease_id, tracked in self._tracked.items():
                meter = tracked.meter
                if lease_id in leases:
                    meter.missed_ticks = 0
                    meter.add_sample(now.mono_ns, *samples[lease_id])
                    closed = meter.close(self._node_id, now, self._record_ns, final=False)
                else:
                    meter.missed_ticks += 1
                    if meter.missed_ticks < VANISHED_AFTER_TICKS:
                        continue
                    log.warning(
                        "lease stopped running without close_lease; closing it where last seen",
                        extra={"lease_id": lease_id},
                    )
                    seen = meter.last_sample_mono_ns
                    end = Point(seen, wall_at(seen, now, meter.cursor.end_wall_ns))
                    closed = meter.close(self._node_id, end, self._record_ns, final=True)
                if closed is not None:
                    due.append((lease_id, *closed))
            return await self._append(due)

    async def close_lease(
        self, lease: MeteredLease, end_monotonic: float | None = None
    ) -> list[SignedUsageRecord]:
        """Write the lease's final record, ending at ``end_monotonic`` (default: now).

        Idempotent: a lease whose final record exists gets no second one.
        """
        async with self._lock:
            await self._track({lease.lease_id: lease})
            tracked = self._tracked.get(lease.lease_id)
            if tracked is None:
                return []
            now = Point(self._mono(), self._wall())
            end_ns = now.mono_ns
            if end_monotonic is not None:
                end_ns = min(end_ns, round(end_monotonic * 1e9))
            meter = tracked.meter
            samples = await asyncio.to_thread(self._read, [(lease.lease_id, tracked)])
            meter.add_sample(max(end_ns, meter.last_sample_mono_ns), *samples[lease.lease_id])
            end = Point(end_ns, wall_at(end_ns, now, meter.cursor.end_wall_ns))
            closed = meter.close(self._node_id, end, self._record_ns, final=True)
            if closed is None:  # unreachable: a final close always yields a record
                return []
            return await self._append([(lease.lease_id, *closed)])

    async def last_reading(self, lease: MeteredLease, end_monotonic: float | None = None) -> None:
        """Read an ended lease's counters once more, before its container and network are
        removed, without closing an interval (``close_lease`` does that).

        Ticks stop reading a lease when its container dies, and the reading in
        ``close_lease`` comes after the cleanup, when the network's bridge (with its
        counters) is gone: a final interval without a tick in it would have its network
        bytes unmeasured although they were readable all along. Counters do not move
        after the death, so a reading now is the reading at the end (``end_monotonic``).
        """
        async with self._lock:
            await self._track({lease.lease_id: lease})
            tracked = self._tracked.get(lease.lease_id)
            if tracked is None:
                return
            meter = tracked.meter
            at_ns = self._mono()
            if end_monotonic is not None:
                at_ns = min(at_ns, round(end_monotonic * 1e9))
            samples = await asyncio.to_thread(self._read, [(lease.lease_id, tracked)])
            meter.add_sample(max(at_ns, meter.last_sample_mono_ns), *samples[lease.lease_id])

    async def lease_started(self, lease: MeteredLease) -> None:
        """Start metering ``lease`` now that it runs, with its GPUs' energy counters read
        at once: the first tick comes up to ``sample_interval`` later, and without a
        baseline from the start that first stretch could only be estimated from power.
        A lease already metered (restart, a second update) is left as it is."""
        async with self._lock:
            fresh = await self._track({lease.lease_id: lease})
            tracked = self._tracked.get(lease.lease_id)
            if tracked is None or lease.lease_id not in fresh or not lease.gpu_uuids:
                return
            try:
                readings = await asyncio.to_thread(self._gpu_source.read, list(lease.gpu_uuids))
            except Exception:
                log.exception("reading GPU energy at lease start failed; the first interval "
                              "is estimated", extra={"lease_id": lease.lease_id})  # fmt: skip
                return
            tracked.meter.prime_energy(
                {u: r.energy_mj for u, r in readings.items() if r.energy_mj is not None}
            )

    def _finish(self, lease_id: str) -> None:
        self._finished[lease_id] = None
        while len(self._finished) > FINISHED_REMEMBERED:
            del self._finished[next(iter(self._finished))]

    async def _track(self, leases: Mapping[str, MeteredLease]) -> set[str]:
        """Start meters for leases seen for the first time, from their stored cursors.

        Returns the leases whose meter starts fresh (no stored cursor)."""
        new = [lid for lid in leases if lid not in self._tracked and lid not in self._finished]
        fresh: set[str] = set()
        if not new:
            return fresh
        cursors = await asyncio.to_thread(lambda: {lid: self._outbox.cursor(lid) for lid in new})
        now = Point(self._mono(), self._wall())
        for lease_id in new:
            lease = leases[lease_id]
            cursor = cursors[lease_id]
            if cursor is not None and cursor.closed:
                log.warning(
                    "lease already has its final usage record; not metering it again",
                    extra={"lease_id": lease_id},
                )
                self._finish(lease_id)
                continue
            if cursor is None:
                start_ns = min(round(lease.started_monotonic * 1e9), now.mono_ns)
                if lease.started_monotonic <= 0:
                    # Unknown start: billing from the clock's epoch (boot) would invent
                    # hours of use, so metering starts now instead.
                    log.warning(
                        "lease has no start time; metering it from now",
                        extra={"lease_id": lease_id},
                    )
                    start_ns = now.mono_ns
                start = Point(start_ns, wall_at(start_ns, now, 0))
                meter = LeaseMeter.new_lease(lease_id, start, lease.gpu_uuids)
                fresh.add(lease_id)
            else:
                if cursor.end_mono_ns > now.mono_ns:
                    # The monotonic clock restarted (host reboot): the time in between
                    # cannot be measured, so metering resumes from now.
                    log.warning(
                        "monotonic clock is behind the lease's last record; resuming from now",
                        extra={"lease_id": lease_id, "cursor_mono_ns": cursor.end_mono_ns},
                    )
                    cursor = LeaseCursor(lease_id, now.mono_ns, cursor.end_wall_ns, cursor.counters)
                meter = LeaseMeter(cursor, lease.gpu_uuids)
                log.info(
                    "resuming usage metering from the last closed interval",
                    extra={"lease_id": lease_id, "since_unix_ns": cursor.end_wall_ns},
                )
            self._tracked[lease_id] = _Tracked(meter, self._reader_factory(lease))
        return fresh

    def _read(
        self, targets: Sequence[tuple[str, _Tracked]]
    ) -> dict[str, tuple[ContainerCounters, Mapping[str, GpuUsage]]]:
        """Blocking: every lease's container counters and one GPU read for all."""
        uuids = sorted({u for _, t in targets for u in t.meter.gpu_uuids})
        gpus: Mapping[str, GpuUsage] = {}
        if uuids:
            try:
                gpus = self._gpu_source.read(uuids)
            except Exception:
                log.exception("reading GPUs for metering failed", extra={"gpus": uuids})
        out: dict[str, tuple[ContainerCounters, Mapping[str, GpuUsage]]] = {}
        for lease_id, tracked in targets:
            try:
                counters = tracked.reader.read()
            except Exception:
                log.exception("reading container counters failed", extra={"lease_id": lease_id})
                counters = ContainerCounters()
            out[lease_id] = (counters, gpus)
        return out

    async def _append(
        self, due: Sequence[tuple[str, list[UsageRecord], LeaseCursor]]
    ) -> list[SignedUsageRecord]:
        if not due:
            return []
        records = [record for _, batch, _ in due for record in batch]
        cursors = [cursor for _, _, cursor in due]

        def write() -> tuple[list[SignedUsageRecord], OutboxStats]:
            signed = self._outbox.append_many(records, self._sign, cursors)
            return signed, self._outbox.stats()

        try:
            signed, stats = await asyncio.to_thread(write)
        except Exception:
            # The meters keep their totals and cursors: the next tick closes the
            # same span again, so a failed write (disk full...) loses nothing.
            log.exception(
                "appending usage records failed; will retry",
                extra={"records": len(records), "outbox": str(self._outbox.path)},
            )
            return []
        for lease_id, _, cursor in due:
            tracked = self._tracked.get(lease_id)
            if tracked is not None:
                tracked.meter.commit(cursor)
                if cursor.closed:
                    del self._tracked[lease_id]
                    self._finish(lease_id)
        if stats.backlog_alert and not self.backlog_alert:
            log.warning(
                "usage outbox backlog above its alert bound; records are kept, none dropped",
                extra={"pending": stats.pending, "bound": self._outbox.alert_records},
            )
        self.stats = stats
        if self._on_records is not None:
            self._on_records(signed)
        return signed
