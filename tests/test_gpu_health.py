"""HealthMonitor: faults become health states, cordons and log lines; the monitor keeps going."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from agent.gpu.cordons import CordonStore
from agent.gpu.fakenvml import FakeNvml
from agent.gpu.health import HealthMonitor, evaluate
from agent.gpu.model import GpuHealth, GpuSample, HealthState
from agent.gpu.nvml import NvmlBackend


def _sample(**kw: object) -> GpuSample:
    return GpuSample(index=0, uuid="GPU-x", timestamp=0.0, **kw)  # type: ignore[arg-type]


def test_evaluate_rules() -> None:
    """Critical Xid, uncorrectable ECC, remap failure, loss: unhealthy; throttling: degraded."""
    assert evaluate(_sample(), Counter()) == (HealthState.HEALTHY, ())
    assert evaluate(_sample(), Counter({79: 2}))[0] == HealthState.UNHEALTHY
    assert evaluate(_sample(ecc_uncorrected=1), Counter())[0] == HealthState.UNHEALTHY
    assert evaluate(_sample(ecc_uncorrected=1), Counter(), acknowledged_ecc=1)[0] == (
        HealthState.HEALTHY
    )
    assert evaluate(_sample(row_remap_failed=True), Counter())[0] == HealthState.UNHEALTHY
    assert evaluate(_sample(lost=True), Counter())[0] == HealthState.UNHEALTHY
    state, reasons = evaluate(_sample(throttle_reasons=("gpu_idle", "hw_thermal")), Counter())
    assert state == HealthState.DEGRADED and "hw_thermal" in reasons[0]
    assert evaluate(_sample(throttle_reasons=("gpu_idle",)), Counter())[0] == HealthState.HEALTHY
    assert evaluate(_sample(), Counter(), recent_degrading_xids=[92])[0] == HealthState.DEGRADED


class Rig:
    def __init__(self, tmp_path: Path, profiles: list[str]) -> None:
        self.fake = FakeNvml(profiles)
        self.backend = NvmlBackend(self.fake)
        self.backend.open()
        self.store = CordonStore(tmp_path)
        self.xids: list[tuple[str, int]] = []
        self.monitor = HealthMonitor(
            self.backend,
            self.store,
            interval=0.05,
            event_timeout=0.05,
            xid_sink=lambda uuid, code, ts: self.xids.append((uuid, code)),
        )
        self.changes: list[GpuHealth] = []
        self._changed = asyncio.Event()
        self.monitor.on_change.append(self._on_change)

    def _on_change(self, health: GpuHealth) -> None:
        self.changes.append(health)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until ``predicate`` holds: woken by change notifications, re-checked after
        each short wait because some conditions (a check count) have no event."""
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.02)

    def health(self, index: int) -> GpuHealth:
        return next(h for h in self.monitor.snapshot() if h.index == index)


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, ["h100-sxm-80gb", "h100-sxm-80gb", "a100-sxm-80gb"])
    stop = asyncio.Event()
    task = asyncio.create_task(r.monitor.run(stop))
    await r.until(lambda: len(r.monitor.snapshot()) == 3)
    yield r
    stop.set()
    async with asyncio.timeout(5):
        await task


@pytest.mark.asyncio
async def test_all_healthy_at_start(rig: Rig) -> None:
    """Idle GPUs are healthy, uncordoned and all leasable."""
    assert [h.state for h in rig.monitor.snapshot()] == [HealthState.HEALTHY] * 3
    assert len(rig.monitor.healthy_uuids()) == 3


@pytest.mark.asyncio
async def test_critical_xid_cordons_and_logs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Xid 79 makes the GPU unhealthy, cordoned (persisted), not leasable, with log lines."""
    caplog.set_level(logging.INFO, logger="agent.gpu.health")
    uuid = rig.health(1).uuid
    rig.fake.inject_xid(1, 79)
    await rig.until(lambda: rig.health(1).cordoned)
    h = rig.health(1)
    assert h.state == HealthState.UNHEALTHY
    assert "Xid 79" in h.reasons[0]
    assert uuid not in rig.monitor.healthy_uuids()
    assert rig.health(0).leasable
    reloaded = CordonStore(rig.store.path.parent)
    reloaded.load()
    assert reloaded.get(uuid) is not None and reloaded.get(uuid).source == "health"  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("GPU cordoned") for m in messages)
    assert any(m == "GPU health changed" for m in messages)
    assert (uuid, 79) in rig.xids
    assert any(c.uuid == uuid and c.cordoned for c in rig.changes)


@pytest.mark.asyncio
async def test_application_xid_does_not_cordon(rig: Rig) -> None:
    """Xid 13 (the workload's own fault) is counted but the GPU stays healthy."""
    rig.fake.inject_xid(0, 13)
    await rig.until(lambda: rig.monitor.xid_counts(0).get(13) == 1)
    checks = rig.monitor.checks
    await rig.until(lambda: rig.monitor.checks > checks + 1)
    assert rig.health(0).state == HealthState.HEALTHY and not rig.health(0).cordoned


@pytest.mark.asyncio
async def test_xid_storm_one_log_line_per_batch_and_monitor_continues(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """1000 Xids are all counted, logged in a few lines, and sampling keeps running."""
    caplog.set_level(logging.INFO, logger="agent.gpu.health")
    rig.fake.inject_xid(2, 31, count=1000)
    await rig.until(lambda: rig.monitor.xid_counts(2).get(31) == 1000)
    lines = [r for r in caplog.records if r.getMessage() == "GPU Xid event"]
    assert 1 <= len(lines) <= 10
    checks = rig.monitor.checks
    await rig.until(lambda: rig.monitor.checks > checks + 2)
    assert len(rig.xids) == 1000


@pytest.mark.asyncio
async def test_lost_gpu_is_unhealthy_and_cordoned(rig: Rig) -> None:
    """A GPU that falls off the bus mid-run is unhealthy and cordoned; others are untouched."""
    rig.fake.lose_gpu(0)
    await rig.until(lambda: rig.health(0).cordoned)
    h = rig.health(0)
    assert h.state == HealthState.UNHEALTHY and h.sample is not None and h.sample.lost
    assert any("lost" in r for r in h.reasons)
    assert rig.health(1).state == HealthState.HEALTHY


@pytest.mark.asyncio
async def test_uncorrectable_ecc_cordons(rig: Rig) -> None:
    """An uncorrectable ECC error cordons the GPU."""
    rig.fake.inject_ecc(2)
    await rig.until(lambda: rig.health(2).cordoned)
    assert any("uncorrectable ECC" in r for r in rig.health(2).reasons)


@pytest.mark.asyncio
async def test_thermal_throttle_degrades_without_cordon_and_recovers(rig: Rig) -> None:
    """Thermal throttling is degraded, still leasable, and clears by itself."""
    rig.fake.set_thermal(1)
    await rig.until(lambda: rig.health(1).state == HealthState.DEGRADED)
    assert rig.health(1).leasable and not rig.health(1).cordoned
    rig.fake.set_thermal(1, False)
    await rig.until(lambda: rig.health(1).state == HealthState.HEALTHY)


@pytest.mark.asyncio
async def test_uncordon_while_running_forgives_seen_faults(rig: Rig) -> None:
    """`uncordon` (another process's store) returns the GPU; ECC seen so far is acknowledged."""
    rig.fake.inject_ecc(1)
    await rig.until(lambda: rig.health(1).cordoned)
    uuid = rig.health(1).uuid
    assert uuid is not None
    operator = CordonStore(rig.store.path.parent)
    assert operator.uncordon(uuid) is not None
    await rig.until(lambda: not rig.health(1).cordoned and rig.health(1).leasable)
    assert uuid in rig.monitor.healthy_uuids()
    # A new error after the uncordon cordons it again.
    rig.fake.inject_ecc(1)
    await rig.until(lambda: rig.health(1).cordoned)


@pytest.mark.asyncio
async def test_uncordon_of_still_lost_gpu_recordons(rig: Rig) -> None:
    """Uncordoning a GPU that is still lost cordons it again at the next check."""
    rig.fake.lose_gpu(2)
    await rig.until(lambda: rig.health(2).cordoned)
    uuid = rig.health(2).uuid
    assert uuid is not None
    CordonStore(rig.store.path.parent).uncordon(uuid)
    checks = rig.monitor.checks
    await rig.until(lambda: rig.monitor.checks > checks + 2)
    assert rig.health(2).cordoned and not rig.health(2).leasable


@pytest.mark.asyncio
async def test_operator_cordon_blocks_leases(rig: Rig) -> None:
    """A healthy GPU cordoned by the operator is not leasable but stays healthy."""
    uuid = rig.health(0).uuid
    assert uuid is not None
    CordonStore(rig.store.path.parent).cordon(uuid, "maintenance", "operator", 0)
    await rig.until(lambda: rig.health(0).cordoned)
    assert rig.health(0).state == HealthState.HEALTHY
    assert uuid not in rig.monitor.healthy_uuids()
    assert rig.health(0).cordon_reason == "maintenance"


@pytest.mark.asyncio
async def test_check_failure_is_logged_and_monitor_keeps_running(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that raises is logged; the next check runs normally."""
    real = rig.backend.sample_all
    calls = {"n": 0}

    def flaky() -> list[GpuSample]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("driver hiccup")
        return real()

    monkeypatch.setattr(rig.backend, "sample_all", flaky)
    checks = rig.monitor.checks
    await rig.until(lambda: rig.monitor.checks > checks + 1)
    assert any("health check failed" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_stop_ends_run_promptly(tmp_path: Path) -> None:
    """run() returns soon after stop is set, even while waiting for events."""
    r = Rig(tmp_path, ["rtx-4090"])
    r.monitor.interval = 30.0
    stop = asyncio.Event()
    task = asyncio.create_task(r.monitor.run(stop))
    await r.until(lambda: r.monitor.checks >= 1)
    stop.set()
    async with asyncio.timeout(2):
        await task


def test_scheduled_fault_fires_through_monitor(tmp_path: Path) -> None:
    """A fault scheduled on the fake's clock fires on the next call and is judged."""
    now = [0.0]
    fake = FakeNvml(["h100-sxm-80gb"], clock=lambda: now[0])
    fake.schedule(0, "lost", after=30)
    backend = NvmlBackend(fake)
    backend.open()
    monitor = HealthMonitor(backend, CordonStore(tmp_path))
    monitor.check_once()
    assert monitor.snapshot()[0].state == HealthState.HEALTHY
    now[0] = 31.0
    monitor.check_once()
    assert monitor.snapshot()[0].state == HealthState.UNHEALTHY
    assert monitor.snapshot()[0].cordoned
