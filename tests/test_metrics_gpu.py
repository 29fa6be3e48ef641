"""The GPU collector: units, labels, unsupported fields, and scrapes while NVML hangs."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, generate_latest

from agent.metrics.gpu_collector import GpuHealth
from agent.metrics.gpu_sample import XidCounter
from agent.metrics.nvml_source import NvmlGpuSource
from agent.metrics.registry import build_telemetry
from tests.metrics_fakes import FakeNvml


def _gpu_labels(nvml: FakeNvml, i: int, lease: str = "") -> dict[str, str]:
    return {
        "gpu": str(i),
        "uuid": nvml.gpus[i].uuid,
        "model": nvml.gpus[i].name,
        "lease_id": lease,
    }


def _registry(nvml: FakeNvml, timeout: float = 2.0, **kw: object) -> CollectorRegistry:
    return build_telemetry(
        gpu_source=NvmlGpuSource(nvml, kw.pop("xids", None)),  # type: ignore[arg-type]
        scrape_timeout=timeout,
        **kw,  # type: ignore[arg-type]
    ).registry


def test_values_are_exported_in_base_units() -> None:
    """NVML's percent, milliwatts, millijoules and megahertz become ratios, W, J and Hz."""
    nvml = FakeNvml.with_gpus(1)
    reg = _registry(nvml)
    labels = _gpu_labels(nvml, 0)
    assert reg.get_sample_value("gpu_utilization_ratio", labels) == 0.4
    assert reg.get_sample_value("gpu_power_watts", labels) == 350.0
    assert reg.get_sample_value("gpu_energy_joules_total", labels) == 1000.0
    assert reg.get_sample_value("gpu_sm_clock_hertz", labels) == 1980e6
    assert reg.get_sample_value("gpu_memory_used_bytes", labels) == 10 * 1024**3
    assert reg.get_sample_value("gpu_memory_free_bytes", labels) == 70 * 1024**3
    assert reg.get_sample_value("gpu_temperature_celsius", labels) == 55.0
    throttle = {**labels, "reason": "thermal"}
    nvml.gpus[0].violation_ns = 3 * 10**9
    # thermal is policy 1: the fake reports violation_ns * (policy + 1) nanoseconds
    assert reg.get_sample_value("gpu_throttle_seconds_total", throttle) == 6.0


def test_gpu_info_carries_identity_labels() -> None:
    """gpu_info is 1 with PCI bus, driver, CUDA (decoded from 12040) and compute capability."""
    nvml = FakeNvml.with_gpus(1)
    reg = _registry(nvml)
    info = {
        **_gpu_labels(nvml, 0),
        "pci_bus_id": "00000000:18:00.0",
        "driver_version": "550.54.15",
        "cuda_version": "12.4",
        "compute_capability": "9.0",
    }
    assert reg.get_sample_value("gpu_info", info) == 1.0


def test_leased_gpus_carry_the_lease_id() -> None:
    """A leased GPU's series are labelled with its lease; a free GPU's lease_id is empty."""
    nvml = FakeNvml.with_gpus(2)
    reg = _registry(nvml, gpu_leases=lambda: {nvml.gpus[1].uuid: "lease-42"})
    assert reg.get_sample_value("gpu_power_watts", _gpu_labels(nvml, 1, "lease-42")) == 350.0
    assert reg.get_sample_value("gpu_power_watts", _gpu_labels(nvml, 0, "")) == 350.0
    assert reg.get_sample_value("gpu_power_watts", _gpu_labels(nvml, 1, "")) is None


def test_unsupported_field_is_left_out_and_counted() -> None:
    """NotSupported drops that one field, keeps the others, and counts the error per read."""
    nvml = FakeNvml.with_gpus(2)
    nvml.unsupported = {"nvmlDeviceGetPowerUsage"}
    nvml.failing = {"nvmlDeviceGetPcieReplayCounter"}
    reg = _registry(nvml)
    labels = _gpu_labels(nvml, 0)
    assert reg.get_sample_value("gpu_power_watts", labels) is None
    assert reg.get_sample_value("gpu_pcie_replays_total", labels) is None
    assert reg.get_sample_value("gpu_temperature_celsius", labels) == 55.0
    assert reg.get_sample_value("gpu_agent_collector_success", {"collector": "gpu"}) == 1.0
    power = {"collector": "gpu", "field": "power", "reason": "not_supported"}
    replays = {"collector": "gpu", "field": "pcie_replays", "reason": "error"}
    # Each scrape reads once; two GPUs add two of each per read.
    before = reg.get_sample_value("gpu_agent_collector_errors_total", power)
    after = reg.get_sample_value("gpu_agent_collector_errors_total", power)
    assert before is not None and after == before + 2
    assert reg.get_sample_value("gpu_agent_collector_errors_total", replays) == after + 2


def test_nvml_raising_everywhere_never_fails_the_scrape() -> None:
    """Every NVML call raising yields a scrape with no GPU series but the collector's own."""
    nvml = FakeNvml.with_gpus(2)
    nvml.failing = {
        name for name in dir(FakeNvml) if name.startswith("nvml") and "Init" not in name
    }
    reg = _registry(nvml)
    text = generate_latest(reg).decode()
    assert "gpu_temperature_celsius{" not in text
    assert reg.get_sample_value("gpu_agent_collector_success", {"collector": "gpu"}) == 1.0
    errors = {"collector": "gpu", "field": "device_count", "reason": "error"}
    assert reg.get_sample_value("gpu_agent_collector_errors_total", errors) is not None


def test_hung_nvml_serves_last_good_sample_within_the_bound() -> None:
    """While NVML hangs, scrapes return within the timeout with the last sample and its age."""
    now = [1000.0]
    nvml = FakeNvml.with_gpus(1)
    telemetry = build_telemetry(
        gpu_source=NvmlGpuSource(nvml), scrape_timeout=0.2, clock=lambda: now[0]
    )
    reg = telemetry.registry
    generate_latest(reg)  # one good read at t=1000
    release = threading.Event()
    nvml.hang = release
    now[0] = 1030.0
    try:
        started = time.monotonic()
        text = generate_latest(reg).decode()
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"scrape took {elapsed:.2f}s with a 0.2s bound"
        assert 'gpu_power_watts{gpu="0"' in text  # stale values still served
        assert reg.get_sample_value("gpu_agent_collector_success", {"collector": "gpu"}) == 0.0
        age = reg.get_sample_value("gpu_agent_collector_sample_age_seconds", {"collector": "gpu"})
        assert age == 30.0
        last = {"collector": "gpu"}
        assert (
            reg.get_sample_value("gpu_agent_collector_last_success_timestamp_seconds", last)
            == 1000.0
        )
        timeouts = {"collector": "gpu", "field": "read", "reason": "timeout"}
        assert reg.get_sample_value("gpu_agent_collector_errors_total", timeouts) >= 1
        # Repeated scrapes wait on the one stuck read rather than piling up threads.
        for _ in range(3):
            generate_latest(reg)
        stuck = [t for t in threading.enumerate() if t.name == "bounded-gpu"]
        assert len(stuck) == 1
    finally:
        release.set()
    nvml.hang = None
    deadline = time.monotonic() + 5
    while reg.get_sample_value("gpu_agent_collector_success", {"collector": "gpu"}) != 1.0:
        assert time.monotonic() < deadline, "collector did not recover after NVML came back"


def test_hung_nvml_before_any_sample_still_answers() -> None:
    """A hang on the very first read yields a scrape without GPU series, not a stuck one."""
    release = threading.Event()
    nvml = FakeNvml.with_gpus(1)
    nvml.hang = release
    try:
        reg = _registry(nvml, timeout=0.1)
        started = time.monotonic()
        text = generate_latest(reg).decode()
        assert time.monotonic() - started < 1.0
        assert "gpu_power_watts{" not in text
        assert 'gpu_agent_collector_success{collector="gpu"} 0.0' in text
    finally:
        release.set()


def test_xids_are_counted_by_code_with_last_timestamp() -> None:
    """Xid events recorded by the health monitor appear per code, with the last-seen time."""
    nvml = FakeNvml.with_gpus(1)
    xids = XidCounter()
    uuid = nvml.gpus[0].uuid
    xids.record(uuid, 79, 100.0)
    xids.record(uuid, 79, 200.0)
    xids.record(uuid, 13, 150.0)
    reg = _registry(nvml, xids=xids)
    labels = _gpu_labels(nvml, 0)
    assert reg.get_sample_value("gpu_xid_errors_total", {**labels, "xid": "79"}) == 2.0
    assert reg.get_sample_value("gpu_xid_errors_total", {**labels, "xid": "13"}) == 1.0
    assert reg.get_sample_value("gpu_xid_last_timestamp_seconds", labels) == 200.0


def test_ecc_and_remapped_rows() -> None:
    """ECC counts by type and remapped rows by kind, with pending/failed flags."""
    nvml = FakeNvml.with_gpus(1)
    nvml.gpus[0].ecc = (7, 1)
    nvml.gpus[0].remapped = (2, 1, 1, 0)
    reg = _registry(nvml)
    labels = _gpu_labels(nvml, 0)
    assert reg.get_sample_value("gpu_ecc_errors_total", {**labels, "type": "corrected"}) == 7.0
    assert reg.get_sample_value("gpu_ecc_errors_total", {**labels, "type": "uncorrected"}) == 1.0
    assert reg.get_sample_value("gpu_remapped_rows", {**labels, "kind": "uncorrectable"}) == 1.0
    assert reg.get_sample_value("gpu_row_remap_pending", labels) == 1.0
    assert reg.get_sample_value("gpu_row_remap_failed", labels) == 0.0


def test_health_and_cordon_state() -> None:
    """Health is exported as one 1 among the states; cordoned GPUs carry their reason."""
    nvml = FakeNvml.with_gpus(2)
    health = {nvml.gpus[1].uuid: GpuHealth("unhealthy", True, "xid 79")}
    reg = _registry(nvml, gpu_health=lambda: health)
    bad = _gpu_labels(nvml, 1)
    assert reg.get_sample_value("gpu_health_state", {**bad, "state": "unhealthy"}) == 1.0
    assert reg.get_sample_value("gpu_health_state", {**bad, "state": "healthy"}) == 0.0
    assert reg.get_sample_value("gpu_cordoned", {**bad, "reason": "xid 79"}) == 1.0
    good = _gpu_labels(nvml, 0)
    assert reg.get_sample_value("gpu_cordoned", {**good, "reason": ""}) == 0.0
    assert reg.get_sample_value("gpu_agent_gpus_cordoned") == 1.0


def test_broken_lease_provider_costs_only_the_label() -> None:
    """A lease map that raises leaves lease_id empty and counts the failure."""
    nvml = FakeNvml.with_gpus(1)

    def broken() -> dict[str, str]:
        raise RuntimeError("lease manager gone")

    reg = _registry(nvml, gpu_leases=broken)
    assert reg.get_sample_value("gpu_power_watts", _gpu_labels(nvml, 0)) == 350.0
    errors = {"collector": "gpu", "field": "leases", "reason": "error"}
    assert reg.get_sample_value("gpu_agent_collector_errors_total", errors) >= 1


def test_reads_the_simulated_backend_without_field_errors() -> None:
    """Against the simulated backend's FakeNvml (real pynvml errors), every field reads."""
    from agent.config import SimulatedGpuConfig
    from agent.gpu.simulated import build_fake_nvml

    nvml = build_fake_nvml(SimulatedGpuConfig(profile="h100-sxm-80gb", count=2), "test")
    snapshot = NvmlGpuSource(nvml).read()
    assert snapshot.field_errors == ()
    assert [g.model for g in snapshot.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert snapshot.gpus[0].memory_total_bytes == 85520809984
    assert snapshot.cuda_version == "12.4"


def test_lost_gpu_on_the_simulated_backend_is_counted_not_raised() -> None:
    """A GPU that falls off the bus drops its series; the other GPU and the scrape survive."""
    from agent.config import SimulatedGpuConfig
    from agent.gpu.simulated import build_fake_nvml

    nvml = build_fake_nvml(SimulatedGpuConfig(profile="rtx-4090", count=2), "test")
    nvml.lose_gpu(1)
    reg = build_telemetry(gpu_source=NvmlGpuSource(nvml), scrape_timeout=2).registry
    alive = {"gpu": "0", "uuid": nvml.gpus[0].uuid, "model": "NVIDIA GeForce RTX 4090"}
    assert reg.get_sample_value("gpu_temperature_celsius", {**alive, "lease_id": ""}) is not None
    text = generate_latest(reg).decode()
    assert nvml.gpus[1].uuid not in text
    assert 'reason="gpu_lost"' in text
