"""One lease's running totals between closed intervals (no I/O, no clocks).

Cumulative counters (CPU, network, NVML energy) are turned into deltas sample by
sample; the last good reading of each is kept in the lease's cursor so the first
interval after an agent restart bills what ran while the agent was down. Gauges
(utilization, memory) are folded into a time-weighted mean and peaks.

Counters that go backwards were reset (container restarted, driver reloaded):
the new value is the delta since the reset, as Prometheus treats counters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuagent.usage import Unmeasured, UsageRecord

from .cgroup import ContainerCounters
from .intervals import Interval, Point, apportion, split
from .outbox import LeaseCursor
from .sources import GpuUsage

# Keys of LeaseCursor.counters.
CPU = "cpu_usec"
RX = "net_rx_bytes"
TX = "net_tx_bytes"
MEM_PEAK = "memory_peak_bytes"
ENERGY = "energy_mj"  # maps GPU uuid -> NVML counter


def _delta(current: int, previous: int | None) -> int:
    if previous is None:
        return 0  # no baseline: the reading only becomes one
    if current < previous:
        return current  # reset: counted from zero again
    return current - previous


@dataclass
class _Accumulated:
    cpu_usec: int = 0
    net_rx: int = 0
    net_tx: int = 0
    energy_mj: int = 0
    energy_estimated: bool = False
    util_weighted: int = 0  # per-mille x ns
    util_ns: int = 0
    gpu_memory_peak: int = 0
    memory_peak: int = 0
    seen: int = 0  # Unmeasured bits of the fields with at least one reading


class LeaseMeter:
    """Folds samples of one lease into records; ``cursor`` is its last closed point."""

    def __init__(self, cursor: LeaseCursor, gpu_uuids: Sequence[str]) -> None:
        self.cursor = cursor
        self.gpu_uuids = tuple(gpu_uuids)
        self.last_sample_mono_ns = cursor.end_mono_ns
        self.missed_ticks = 0  # ticks the lease source no longer listed it
        counters = dict(cursor.counters)
        self._cpu: int | None = counters.get(CPU)
        self._rx: int | None = counters.get(RX)
        self._tx: int | None = counters.get(TX)
        self._mem_peak: int | None = counters.get(MEM_PEAK)
        self._energy: dict[str, int] = dict(counters.get(ENERGY, {}))
        self._acc = _Accumulated()

    @classmethod
    def new_lease(cls, lease_id: str, start: Point, gpu_uuids: Sequence[str]) -> LeaseMeter:
        """A lease never metered before: its container's counters start at zero."""
        counters: dict[str, Any] = {CPU: 0, RX: 0, TX: 0, MEM_PEAK: 0, ENERGY: {}}
        return cls(LeaseCursor(lease_id, start.mono_ns, start.wall_ns, counters), gpu_uuids)

    def counters(self) -> dict[str, Any]:
        return {
            CPU: self._cpu,
            RX: self._rx,
            TX: self._tx,
            MEM_PEAK: self._mem_peak,
            ENERGY: dict(sorted(self._energy.items())),
        }

    def prime_energy(self, readings: Mapping[str, int]) -> None:
        """Energy counters (mJ) read when the lease started: its first interval is then
        the counter's delta, not power integrated over it. GPUs already with a baseline
        keep theirs."""
        for uuid, energy_mj in readings.items():
            if uuid in self.gpu_uuids:
                self._energy.setdefault(uuid, energy_mj)

    def add_sample(
        self, mono_ns: int, container: ContainerCounters, gpus: Mapping[str, GpuUsage]
    ) -> None:
        dt = max(0, mono_ns - self.last_sample_mono_ns)
        self.last_sample_mono_ns = max(mono_ns, self.last_sample_mono_ns)
        acc = self._acc
        if container.cpu_usec is not None:
            acc.cpu_usec += _delta(container.cpu_usec, self._cpu)
            self._cpu = container.cpu_usec
            acc.seen |= Unmeasured.CPU
        if container.net_rx_bytes is not None and container.net_tx_bytes is not None:
            if self._rx is not None and self._tx is not None:
                acc.net_rx += _delta(container.net_rx_bytes, self._rx)
                acc.net_tx += _delta(container.net_tx_bytes, self._tx)
                acc.seen |= Unmeasured.NETWORK
            # Else the first reading after the counters were unknown (e.g. carried
            # across a restart as unknown) is only a baseline: the traffic before it
            # is unknown, so the interval stays unmeasured rather than "0 bytes".
            self._rx, self._tx = container.net_rx_bytes, container.net_tx_bytes
        self._add_memory(container)
        self._add_gpus(dt, gpus)

    def _add_memory(self, container: ContainerCounters) -> None:
        acc = self._acc
        if container.memory_current_bytes is not None:
            acc.memory_peak = max(acc.memory_peak, container.memory_current_bytes)
            acc.seen |= Unmeasured.MEMORY
        peak = container.memory_peak_bytes
        if peak is not None:
            # The kernel's high-water mark is for the container's whole life; when it
            # rose since the last reading, the new high happened in this interval.
            if self._mem_peak is None or peak > self._mem_peak:
                acc.memory_peak = max(acc.memory_peak, peak)
            self._mem_peak = peak
            acc.seen |= Unmeasured.MEMORY

    def _add_gpus(self, dt_ns: int, gpus: Mapping[str, GpuUsage]) -> None:
        acc = self._acc
        utils: list[int] = []
        memory = 0
        memory_seen = False
        for uuid in self.gpu_uuids:
            reading = gpus.get(uuid)
            if reading is None:
                self._energy.pop(uuid, None)
                continue
            if reading.utilization_percent is not None:
                utils.append(min(1000, max(0, round(reading.utilization_percent * 10))))
            if reading.memory_used_bytes is not None:
                memory += reading.memory_used_bytes
                memory_seen = True
            self._add_energy(uuid, dt_ns, reading)
        if utils and dt_ns > 0:
            acc.util_weighted += sum(utils) * dt_ns // len(utils)
            acc.util_ns += dt_ns
        if utils:
            acc.seen |= Unmeasured.GPU_UTIL
        if memory_seen:
            acc.gpu_memory_peak = max(acc.gpu_memory_peak, memory)
            acc.seen |= Unmeasured.GPU_MEMORY

    def _add_energy(self, uuid: str, dt_ns: int, reading: GpuUsage) -> None:
        acc = self._acc
        previous = self._energy.get(uuid)
        if reading.energy_mj is not None and previous is not None:
            acc.energy_mj += _delta(reading.energy_mj, previous)
            acc.seen |= Unmeasured.ENERGY
        elif reading.power_watts is not None and dt_ns > 0:
            # No counter, or no baseline for it yet: integrate power over the step
            # (W x ns / 1e6 = mJ) and say the figure is an estimate.
            acc.energy_mj += round(max(0.0, reading.power_watts) * dt_ns / 1e6)
            acc.energy_estimated = True
            acc.seen |= Unmeasured.ENERGY
        if reading.energy_mj is not None:
            self._energy[uuid] = reading.energy_mj
        else:
            # A gap in the counter: the next reading is a new baseline, so the
            # estimated stretch is never billed a second time from the counter.
            self._energy.pop(uuid, None)

    def close(
        self, node_id: str, now: Point, record_ns: int, *, final: bool
    ) -> tuple[list[UsageRecord], LeaseCursor] | None:
        """Records (``seq=0``) for the intervals due at ``now`` and the cursor after them.

        ``None`` when nothing is due. The meter is unchanged until ``commit``: if
        storing the records fails, the next attempt covers the same span again.
        """
        last = Point(self.cursor.end_mono_ns, self.cursor.end_wall_ns)
        if now.mono_ns < last.mono_ns:
            now = Point(last.mono_ns, max(now.wall_ns, last.wall_ns))
        intervals = split(last, now, record_ns, final=final)
        if not intervals:
            return None
        records = self._records(node_id, intervals, final=final)
        end = intervals[-1].end
        cursor = LeaseCursor(
            self.cursor.lease_id, end.mono_ns, end.wall_ns, self.counters(), closed=final
        )
        return records, cursor

    def commit(self, cursor: LeaseCursor) -> None:
        """The records up to ``cursor`` are stored: start accumulating afresh."""
        self.cursor = cursor
        self._acc = _Accumulated()

    def _records(
        self, node_id: str, intervals: list[Interval], *, final: bool
    ) -> list[UsageRecord]:
        acc = self._acc
        weights = [iv.duration_ns for iv in intervals]
        cpu = apportion(acc.cpu_usec, weights)
        rx = apportion(acc.net_rx, weights)
        tx = apportion(acc.net_tx, weights)
        energy = apportion(acc.energy_mj, weights)
        util = (acc.util_weighted + acc.util_ns // 2) // acc.util_ns if acc.util_ns else 0
        expected = Unmeasured.CPU | Unmeasured.MEMORY | Unmeasured.NETWORK
        if self.gpu_uuids:
            expected |= Unmeasured.GPU_UTIL | Unmeasured.GPU_MEMORY | Unmeasured.ENERGY
        unmeasured = int(expected & ~acc.seen)
        gpu_count = len(self.gpu_uuids)
        records = []
        for index, interval in enumerate(intervals):
            records.append(
                UsageRecord(
                    node_id=node_id,
                    seq=0,
                    lease_id=self.cursor.lease_id,
                    start_unix_ns=interval.start.wall_ns,
                    end_unix_ns=interval.end.wall_ns,
                    duration_ns=interval.duration_ns,
                    gpu_count=gpu_count,
                    gpu_ns=gpu_count * interval.duration_ns,
                    gpu_util_permille=min(1000, util),
                    peak_gpu_memory_bytes=acc.gpu_memory_peak,
                    energy_mj=energy[index],
                    energy_estimated=acc.energy_estimated,
                    cpu_usec=cpu[index],
                    peak_memory_bytes=acc.memory_peak,
                    net_rx_bytes=rx[index],
                    net_tx_bytes=tx[index],
                    unmeasured=unmeasured,
                    final=final and index == len(intervals) - 1,
                )
            )
        return records
