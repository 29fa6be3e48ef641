"""The metering sampler: intervals, restarts, clock steps, counters, energy."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MeteringConfig
from agent.metrics.gpu_sample import GpuReading, GpuSnapshot
from agent.usage.cgroup import ContainerCounters
from agent.usage.outbox import Outbox
from agent.usage.sampler import Sampler
from agent.usage.sources import GpuUsage, MeteredLease, SnapshotGpuUsage, StaticLease
from gpuagent.usage import SignedUsageRecord, Unmeasured, UsageRecord, verify_record

S = 10**9
KEY = Ed25519PrivateKey.generate()
LEASE = StaticLease("lease-1", "c0ffee", 4242, ("GPU-a", "GPU-b"), started_monotonic=1000.0)


@dataclass
class Clock:
    mono_ns: int = 1000 * S
    wall_ns: int = 1_700_000_000 * S

    def advance(self, seconds: float) -> None:
        self.mono_ns += round(seconds * S)
        self.wall_ns += round(seconds * S)


@dataclass
class FakeContainer:
    counters: ContainerCounters = field(
        default_factory=lambda: ContainerCounters(0, 1 << 20, 1 << 20, 0, 0)
    )

    def read(self) -> ContainerCounters:
        return self.counters

    def set(self, **changes: int | None) -> None:
        values = self.counters.__dict__ | changes
        self.counters = ContainerCounters(**values)


@dataclass
class FakeGpus:
    readings: dict[str, GpuUsage] = field(default_factory=dict)

    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        return {u: self.readings[u] for u in uuids if u in self.readings}


@dataclass
class Harness:
    outbox: Outbox
    clock: Clock
    container: FakeContainer
    gpus: FakeGpus
    leases: list[MeteredLease]
    config: MeteringConfig = field(
        default_factory=lambda: MeteringConfig(sample_interval=5, record_interval=60)
    )

    def sampler(self) -> Sampler:
        return Sampler(
            self.outbox,
            lambda: list(self.leases),
            self.gpus,
            KEY.sign,
            "node-test",
            self.config,
            clock_monotonic_ns=lambda: self.clock.mono_ns,
            clock_wall_ns=lambda: self.clock.wall_ns,
            reader_factory=lambda _: self.container,
        )

    def records(self, lease_id: str = "lease-1") -> list[UsageRecord]:
        return [s.record for s in self.outbox.pending(10_000) if s.record.lease_id == lease_id]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    gpus = FakeGpus(
        {
            "GPU-a": GpuUsage(80.0, 10 << 30, 1_000_000, 300.0),
            "GPU-b": GpuUsage(40.0, 20 << 30, 2_000_000, 200.0),
        }
    )
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    yield Harness(outbox, Clock(), FakeContainer(), gpus, [LEASE])
    outbox.close()


async def run_ticks(
    h: Harness, sampler: Sampler, seconds: int, step: int = 5, *, cpu: bool = True
) -> None:
    """Tick every ``step`` s, with 1 ms of CPU per elapsed second on the fake counter."""
    for _ in range(seconds // step):
        h.clock.advance(step)
        if cpu:
            h.container.set(cpu_usec=(h.container.counters.cpu_usec or 0) + step * 1000)
        await sampler.tick()


def assert_contiguous(records: Sequence[UsageRecord]) -> None:
    for before, after in itertools.pairwise(records):
        assert after.start_unix_ns == before.end_unix_ns
        assert after.seq > before.seq


@pytest.mark.asyncio
async def test_records_close_every_record_interval(h: Harness) -> None:
    """Ticks every 5 s close a 60 s record twice in 130 s; GPU-seconds are GPUs x time,
    CPU is the counter's delta, and the first record starts when the lease started."""
    sampler = h.sampler()
    await sampler.tick()  # at the lease's start
    await run_ticks(h, sampler, 130)
    records = h.records()
    assert [r.seq for r in records] == [1, 2]
    assert [r.duration_ns for r in records] == [60 * S, 60 * S]
    assert [r.gpu_ns for r in records] == [120 * S, 120 * S]
    assert [r.cpu_usec for r in records] == [60_000, 60_000]
    assert records[0].start_unix_ns == 1_700_000_000 * S
    assert_contiguous(records)
    assert records[0].gpu_util_permille == 600  # mean of 80 % and 40 %
    assert records[0].peak_gpu_memory_bytes == 30 << 30
    assert records[0].unmeasured == 0
    assert not any(r.final for r in records)
    assert all(verify_record(s.record, s.signature, KEY.public_key()) for s in h.outbox.pending(10))


@pytest.mark.asyncio
@pytest.mark.parametrize("jump_s", [300, -300])
async def test_wall_clock_steps_do_not_change_durations(h: Harness, jump_s: int) -> None:
    """A wall clock stepped by 5 min either way mid-interval leaves every duration at
    60 s and the monotonic total intact; wall timestamps stay contiguous and ordered."""
    sampler = h.sampler()
    await run_ticks(h, sampler, 30)
    h.clock.wall_ns += jump_s * S
    await run_ticks(h, sampler, 120)
    records = h.records()
    assert [r.duration_ns for r in records] == [60 * S, 60 * S]
    assert_contiguous(records)
    for r in records:
        assert r.end_unix_ns >= r.start_unix_ns


@pytest.mark.asyncio
async def test_restart_continues_from_the_last_closed_interval(h: Harness) -> None:
    """A new sampler on the same outbox (agent restarted, lease re-adopted) starts at
    the last record's end: no gap, no overlap, and CPU used while the agent was down
    is billed from the stored counter baseline."""
    first = h.sampler()
    await run_ticks(h, first, 70)  # one record [0, 60); 10 s accumulated, then "crash"
    del first
    h.clock.advance(30)  # the agent is down; the container keeps running
    h.container.set(cpu_usec=(h.container.counters.cpu_usec or 0) + 30_000)
    second = h.sampler()
    await run_ticks(h, second, 20)
    records = h.records()
    assert [r.duration_ns for r in records] == [60 * S, 60 * S]
    assert_contiguous(records)
    assert sum(r.cpu_usec for r in records) == h.container.counters.cpu_usec


@pytest.mark.asyncio
async def test_close_lease_writes_one_final_record(h: Harness) -> None:
    """close_lease ends the lease at the given instant with a final record; calling it
    again, or the lease lingering in the source, adds nothing."""
    sampler = h.sampler()
    await run_ticks(h, sampler, 75)
    end = (h.clock.mono_ns - 3 * S) / S
    closed = await sampler.close_lease(LEASE, end)
    assert [s.record.final for s in closed] == [True]
    assert closed[0].record.duration_ns == 12 * S  # from 60 s to 72 s
    assert await sampler.close_lease(LEASE) == []
    await run_ticks(h, sampler, 120)
    records = h.records()
    assert [r.final for r in records] == [False, True]
    assert_contiguous(records)
    assert sampler.metered_leases == []
    assert await h.sampler().close_lease(LEASE) == []  # also after a restart


@pytest.mark.asyncio
async def test_finished_leases_are_remembered_in_a_bounded_set(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent runs leases without end: the sampler remembers only the most recent
    finished ones, and one it has forgotten still gets no second final record (the
    outbox's closed cursor says so)."""
    monkeypatch.setattr("agent.usage.sampler.FINISHED_REMEMBERED", 3)
    sampler = h.sampler()
    leases = [
        StaticLease(f"lease-{i}", f"c{i}", None, ("GPU-a",), started_monotonic=1000.0)
        for i in range(5)
    ]
    h.leases = list(leases)
    await run_ticks(h, sampler, 10)
    for lease in leases:
        assert len(await sampler.close_lease(lease)) == 1
    h.leases = []
    assert len(sampler._finished) == 3
    assert "lease-0" not in sampler._finished
    assert await sampler.close_lease(leases[0]) == []
    assert [r.final for r in h.records("lease-0")] == [True]


@pytest.mark.asyncio
async def test_a_lease_closed_right_after_a_record_gets_a_zero_length_final(h: Harness) -> None:
    """Even when nothing is left to bill, the lease's last record says final."""
    sampler = h.sampler()
    await run_ticks(h, sampler, 60)
    [final] = await sampler.close_lease(LEASE)
    assert final.record.final and final.record.duration_ns == 0


@pytest.mark.asyncio
async def test_energy_counter_deltas_are_exact_and_not_estimated(h: Harness) -> None:
    """With NVML's energy counter, a record's energy is the counter's delta over both
    GPUs; only the stretch before the first reading is power-integrated."""
    sampler = h.sampler()
    await sampler.tick()  # baseline reading at the lease's start: nothing estimated yet
    for _ in range(12):
        h.clock.advance(5)
        for uuid, reading in h.gpus.readings.items():
            h.gpus.readings[uuid] = GpuUsage(
                reading.utilization_percent,
                reading.memory_used_bytes,
                (reading.energy_mj or 0) + 5 * 250_000,  # 250 W for 5 s
                250.0,
            )
        await sampler.tick()
    [record] = h.records()
    assert record.energy_mj == 2 * 60 * 250_000
    assert not record.energy_estimated


@pytest.mark.asyncio
async def test_energy_without_a_counter_is_integrated_power_and_flagged(h: Harness) -> None:
    """GPUs without the counter are billed power x time, marked as an estimate."""
    h.gpus.readings = {u: GpuUsage(50.0, 1 << 30, None, 300.0) for u in LEASE.gpu_uuids}
    sampler = h.sampler()
    await run_ticks(h, sampler, 60)
    [record] = h.records()
    assert record.energy_estimated
    assert record.energy_mj == 2 * 300 * 60 * 1000
    assert not record.unmeasured & Unmeasured.ENERGY


@pytest.mark.asyncio
async def test_unreadable_sources_are_flagged_not_guessed(h: Harness) -> None:
    """No cgroup files and no GPU readings: the record bills time and flags the rest."""
    h.container.counters = ContainerCounters()
    h.gpus.readings = {}
    sampler = h.sampler()
    await run_ticks(h, sampler, 60, cpu=False)
    [record] = h.records()
    assert record.duration_ns == 60 * S and record.gpu_ns == 120 * S
    assert record.unmeasured == int(
        Unmeasured.CPU
        | Unmeasured.MEMORY
        | Unmeasured.NETWORK
        | Unmeasured.GPU_UTIL
        | Unmeasured.GPU_MEMORY
        | Unmeasured.ENERGY
    )
    assert (record.cpu_usec, record.energy_mj, record.gpu_util_permille) == (0, 0, 0)


@pytest.mark.asyncio
async def test_counter_reset_counts_from_zero(h: Harness) -> None:
    """A counter that goes backwards (container restarted) is a reset, not negative use."""
    sampler = h.sampler()
    h.clock.advance(30)
    h.container.set(cpu_usec=50_000, net_rx_bytes=7000, net_tx_bytes=100)
    await sampler.tick()
    h.clock.advance(30)
    h.container.set(cpu_usec=2_000, net_rx_bytes=500, net_tx_bytes=50)
    await sampler.tick()
    [record] = h.records()
    assert (record.cpu_usec, record.net_rx_bytes, record.net_tx_bytes) == (52_000, 7500, 150)


@pytest.mark.asyncio
async def test_memory_peak_uses_the_kernels_high_water_mark(h: Harness) -> None:
    """A spike between samples is caught by memory.peak rising; a later interval in
    which the lifetime peak did not rise reports only what it sampled."""
    sampler = h.sampler()
    h.clock.advance(30)
    h.container.set(memory_current_bytes=100, memory_peak_bytes=5000)
    await sampler.tick()
    h.clock.advance(30)
    h.container.set(memory_current_bytes=200)
    await sampler.tick()
    h.clock.advance(60)
    h.container.set(memory_current_bytes=300)
    await sampler.tick()
    assert [r.peak_memory_bytes for r in h.records()] == [5000, 300]


@pytest.mark.asyncio
async def test_a_vanished_lease_is_closed_where_last_seen(h: Harness) -> None:
    """A lease that leaves the running set without close_lease is closed at the last
    instant it was seen running, after a grace tick."""
    sampler = h.sampler()
    await run_ticks(h, sampler, 70)
    h.leases.clear()
    await run_ticks(h, sampler, 5)
    assert [r.final for r in h.records()] == [False]
    await run_ticks(h, sampler, 5)
    records = h.records()
    assert [r.final for r in records] == [False, True]
    assert records[1].duration_ns == 10 * S


@pytest.mark.asyncio
async def test_a_failed_append_is_retried_without_loss(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full at close time: the next tick writes the whole span, nothing lost."""
    real = h.outbox.append_many
    calls = 0

    def failing_once(*args: object, **kwargs: object) -> list[SignedUsageRecord]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(h.outbox, "append_many", failing_once)
    sampler = h.sampler()
    await run_ticks(h, sampler, 65)
    [record] = h.records()
    assert calls == 2
    assert record.duration_ns == 65 * S
    assert record.cpu_usec == 65_000


@pytest.mark.asyncio
async def test_backlog_alert_is_raised_and_metering_continues(h: Harness) -> None:
    """Past the outbox's bound the sampler reports the alert and keeps appending."""
    h.outbox.alert_records = 1
    sampler = h.sampler()
    await run_ticks(h, sampler, 60)
    assert not sampler.backlog_alert
    await run_ticks(h, sampler, 60)
    assert sampler.backlog_alert
    assert len(h.records()) == 2


@pytest.mark.asyncio
async def test_downtime_longer_than_an_interval_splits_and_apportions(h: Harness) -> None:
    """After 3 min without samples the span becomes three 60 s records whose CPU adds
    up exactly to the counter's delta."""
    sampler = h.sampler()
    await sampler.tick()
    h.clock.advance(180)
    h.container.set(cpu_usec=100_001)
    await sampler.tick()
    records = h.records()
    assert [r.duration_ns for r in records] == [60 * S] * 3
    assert sum(r.cpu_usec for r in records) == 100_001
    assert_contiguous(records)


@pytest.mark.asyncio
async def test_run_ticks_until_stopped(tmp_path: Path) -> None:
    """run() with real clocks appends records on its schedule and returns on stop."""
    stop = asyncio.Event()
    got: list[SignedUsageRecord] = []

    def on_records(records: Sequence[SignedUsageRecord]) -> None:
        got.extend(records)
        stop.set()

    with Outbox(tmp_path / "o.sqlite3") as outbox:
        loop_time = asyncio.get_running_loop().time()
        lease = StaticLease("lease-run", started_monotonic=loop_time)
        sampler = Sampler(
            outbox,
            lambda: [lease],
            FakeGpus(),
            KEY.sign,
            "node-test",
            MeteringConfig(sample_interval=0.01, record_interval=0.03),
            reader_factory=lambda _: FakeContainer(),
            on_records=on_records,
        )
        await asyncio.wait_for(sampler.run(stop), timeout=10)
    assert got and got[0].record.lease_id == "lease-run"
    assert got[0].record.duration_ns >= 30_000_000


def test_snapshot_adapter_maps_collector_readings() -> None:
    """The metrics collector's snapshot feeds metering in metering's units."""

    class Source:
        def read(self) -> GpuSnapshot:
            return GpuSnapshot(
                gpus=(
                    GpuReading(
                        0,
                        "GPU-a",
                        "H100",
                        utilization_ratio=0.5,
                        memory_used_bytes=7,
                        energy_joules_total=12.3456,
                        power_watts=250.0,
                    ),
                    GpuReading(1, "GPU-z", "H100"),
                )
            )

    usage = SnapshotGpuUsage(Source()).read(["GPU-a", "GPU-missing"])
    assert usage == {"GPU-a": GpuUsage(50.0, 7, 12346, 250.0)}


@pytest.mark.asyncio
async def test_a_lease_without_a_start_time_is_not_billed_from_boot(h: Harness) -> None:
    """A lease closed before any tick, whose start is unknown (0), gets a zero-length
    final record rather than one spanning the whole monotonic clock."""
    h.clock.advance(3600)
    unknown = StaticLease("lease-x", "c1", None, ("GPU-a",), started_monotonic=0.0)
    [final] = await h.sampler().close_lease(unknown)
    assert final.record.final
    assert final.record.duration_ns == 0


@pytest.mark.asyncio
async def test_a_new_record_interval_applies_from_the_next_record(h: Harness) -> None:
    """The coordinator's metering_interval (NodeParams) changes record length while the
    sampler runs; it never goes below one sample (issue #19: it used to be ignored)."""
    sampler = h.sampler()
    await sampler.tick()
    await run_ticks(h, sampler, 60)
    assert sampler.set_record_interval(30) == 30
    await run_ticks(h, sampler, 60)
    assert [r.duration_ns for r in h.records()] == [60 * S, 30 * S, 30 * S]
    assert sampler.set_record_interval(1) == 5  # the sample interval
    assert sampler.record_interval == 5
