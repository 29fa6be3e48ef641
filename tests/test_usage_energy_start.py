"""A lease's first usage record is measured from the energy counter read at its start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.usage.outbox import Outbox
from agent.usage.sources import GpuUsage
from tests.test_usage_sampler import LEASE, Clock, FakeContainer, FakeGpus, Harness

WATTS = 250.0


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    gpus = FakeGpus({u: GpuUsage(90.0, 1 << 30, 5_000_000, WATTS) for u in LEASE.gpu_uuids})
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    yield Harness(outbox, Clock(), FakeContainer(), gpus, [LEASE])
    outbox.close()


def burn(h: Harness, seconds: int) -> None:
    """Time passes at WATTS on both GPUs; their counters rise by exactly that."""
    h.clock.advance(seconds)
    for uuid, r in h.gpus.readings.items():
        energy = (r.energy_mj or 0) + round(WATTS * seconds * 1000)
        h.gpus.readings[uuid] = GpuUsage(r.utilization_percent, r.memory_used_bytes, energy, 9999.0)


async def meter_a_minute(h: Harness, *, started_hook: bool) -> None:
    sampler = h.sampler()
    if started_hook:
        await sampler.lease_started(LEASE)  # at the lease's start (clock = started_monotonic)
    burn(h, 3)  # the first tick comes 3 s after the start, as it does in the daemon
    await sampler.tick()
    for _ in range(57 // 3):
        burn(h, 3)
        await sampler.tick()


@pytest.mark.asyncio
async def test_counter_read_at_lease_start_makes_the_first_record_exact(h: Harness) -> None:
    """With the start hook, the first minute's energy is the counters' delta, not estimated."""
    await meter_a_minute(h, started_hook=True)
    [record] = h.records()
    assert not record.energy_estimated
    assert record.energy_mj == 2 * round(WATTS * 60 * 1000)


@pytest.mark.asyncio
async def test_without_the_start_reading_the_first_stretch_is_an_estimate(h: Harness) -> None:
    """Without it, the stretch before the first tick is power x time and flagged (what the
    hook prevents): the power reading (9999 W here) shows up in the bill."""
    await meter_a_minute(h, started_hook=False)
    [record] = h.records()
    assert record.energy_estimated
    assert record.energy_mj == 2 * (round(9999.0 * 3 * 1000) + round(WATTS * 57 * 1000))


@pytest.mark.asyncio
async def test_start_hook_leaves_an_already_metered_lease_alone(h: Harness) -> None:
    """A second RUNNING update (or a re-adopted lease) does not move an existing baseline."""
    sampler = h.sampler()
    await sampler.lease_started(LEASE)
    burn(h, 3)
    await sampler.lease_started(LEASE)  # the counters are higher now; must not re-baseline
    await sampler.tick()
    for _ in range(19):
        burn(h, 3)
        await sampler.tick()
    [record] = h.records()
    assert record.energy_mj == 2 * round(WATTS * 60 * 1000)
