"""The AMD backend's real code path (amdsmi) against a fake shaped like amdsmi."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import agent.gpu as gpu_pkg
from agent.cli import main
from agent.config import GpuConfig
from agent.gpu import AmdSmiBackend, AmdSmiUnavailable, NvmlBackend, open_backend
from agent.gpu.amd_profiles import AMD_PROFILES
from agent.gpu.amdsmi_backend import compute_capability, import_amdsmi
from agent.gpu.detect import SCHEMA_PATH
from agent.gpu.fakeamdsmi import AMDSMI_STATUS_DRIVER_NOT_LOADED, FakeAmdSmi
from agent.gpu.fakenvml import FakeNvml
from agent.gpu.health import evaluate
from agent.gpu.model import HealthState
from agent.metrics.backend_source import gpu_source_for
from gpuagent.attest.skus import SKUS, identity_problem


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _backend(*profiles: str, clock: Clock | None = None) -> tuple[FakeAmdSmi, AmdSmiBackend]:
    fake = FakeAmdSmi(profiles, clock=clock or Clock())
    backend = AmdSmiBackend(fake)
    backend.open()
    return fake, backend


def test_inventory_reads_identity_memory_partition_and_render_node() -> None:
    """Two MI300X: UUID, market name, VRAM, BDF, driver and ROCm, SPX/NPS1, own render nodes."""
    _, backend = _backend("mi300x", "mi300x")
    infos = backend.inventory()
    assert [i.render_node for i in infos] == ["/dev/dri/renderD128", "/dev/dri/renderD129"]
    first = infos[0]
    assert first.uuid is not None and first.uuid.startswith("GPU-74a1")
    assert len({i.uuid for i in infos}) == 2
    assert first.name == "AMD Instinct MI300X"
    assert first.memory_total_bytes == SKUS["mi300x"].reported_memory_mib * 1024**2
    assert first.pci_bus_id == "0000:05:00.0"
    assert (first.driver_version, first.rocm_version) == ("6.8.5", "6.4.1")
    assert (first.compute_partition, first.memory_partition) == ("SPX", "NPS1")
    assert (first.compute_capability, first.architecture) == ("9.4", "cdna3")
    assert first.power_limit_watts == 750.0  # amdsmi reports the cap in microwatts
    assert (first.pcie_max_generation, first.pcie_max_width) == (5, 16)
    assert first.ecc_enabled is True and first.mig_enabled is None
    assert identity_problem(SKUS["mi300x"], first.name or "", first.memory_total_bytes) is None


def test_unsupported_partition_calls_are_dropped_once_and_listed() -> None:
    """MI250X answers NOT_SUPPORTED for partitions: None, listed, never asked again."""
    fake, backend = _backend("mi250x")
    info = backend.inventory()[0]
    backend.inventory()
    assert info.compute_partition is None and info.memory_partition is None
    assert {"compute_partition", "memory_partition"} <= set(info.unsupported)
    assert fake.calls["amdsmi_get_gpu_compute_partition"] == 1
    assert info.compute_capability == "9.0" and info.architecture == "cdna2"


def test_sample_reads_activity_power_memory_and_hotspot_temperature() -> None:
    """A busy MI250X: utilization, average socket power (no current on MI200), VRAM, clocks."""
    fake, backend = _backend("mi250x")
    fake.set_busy(0, 0.5, memory_used=3 * 1024**3)
    s = backend.sample(0)
    assert s.utilization_ratio == 0.5
    assert s.power_watts == pytest.approx(90 + 0.5 * (280 - 90), abs=1)
    assert s.memory_used_bytes == 3 * 1024**3
    assert s.temperature_celsius == 60.0
    assert s.sm_clock_mhz is not None and s.sm_clock_mhz > 0
    assert (s.ecc_corrected, s.ecc_uncorrected, s.retired_pages_double_bit) == (0, 0, 0)


def test_uncorrectable_ecc_makes_the_gpu_unhealthy() -> None:
    """RAS counters drive health: an uncorrectable error and its pending retired page."""
    fake, backend = _backend("mi300x")
    assert evaluate(backend.sample(0), Counter())[0] == HealthState.HEALTHY
    fake.inject_ecc(0, uncorrectable=1)
    sample = backend.sample(0)
    assert sample.ecc_uncorrected == 1 and sample.retired_pages_pending is True
    state, reasons = evaluate(sample, Counter())
    assert state == HealthState.UNHEALTHY and any("ECC" in r for r in reasons)


def test_vanished_gpu_is_lost_not_an_exception() -> None:
    """NOT_FOUND from a GPU that answered before marks it lost in samples and inventory."""
    fake, backend = _backend("mi210", "mi210")
    backend.inventory()
    fake.lose(1)
    assert backend.sample(1).lost and not backend.sample(0).lost
    assert [i.lost for i in backend.inventory()] == [False, True]


def test_retry_leaves_one_sample_empty_then_reads_again() -> None:
    """AmdSmiRetryException is transient: that field is None once, and is not dropped."""
    fake, backend = _backend("mi300x")
    fake.retry_once.add("amdsmi_get_gpu_activity")
    assert backend.sample(0).utilization_ratio is None
    assert backend.sample(0).utilization_ratio == 0.0
    assert "utilization" not in backend.dropped_fields(0)


def test_energy_counter_in_joules_rises_with_time_at_power() -> None:
    """Energy = accumulator x resolution (uJ); 10 s at a known power adds that many joules."""
    clock = Clock()
    _, backend = _backend("mi300x", clock=clock)
    before = backend.energy_joules(0)
    clock.now += 10
    after = backend.energy_joules(0)
    assert before is not None and after is not None
    assert after - before == pytest.approx(10 * AMD_PROFILES["mi300x"].idle_power_watts, rel=1e-3)


def test_metrics_source_maps_amd_readings_onto_the_collector_series() -> None:
    """The AMD GpuSource gives UUID, model, memory, power limit, energy; drops are counted."""
    _, backend = _backend("mi250x")
    source = gpu_source_for(backend)
    snap = source.read()
    (reading,) = snap.gpus
    assert reading.model == "AMD Instinct MI250X"
    assert reading.power_limit_watts == 280.0
    assert reading.energy_joules_total is not None
    assert reading.memory_free_bytes == reading.memory_total_bytes
    assert ("compute_partition", "not_supported") in {
        (e.field, e.reason) for e in snap.field_errors
    }
    assert source.device_count() == 1


def test_open_backend_selects_amd_and_reports_a_missing_driver() -> None:
    """gpu.backend amd opens amdsmi; a driver not loaded is AmdSmiUnavailable with the fix."""
    backend = open_backend(GpuConfig(backend="amd"), amdsmi_module=FakeAmdSmi(["mi210"]))
    assert isinstance(backend, AmdSmiBackend) and backend.name == "amd"
    broken = FakeAmdSmi(["mi210"], init_error=AMDSMI_STATUS_DRIVER_NOT_LOADED)
    with pytest.raises(AmdSmiUnavailable, match="amdgpu kernel driver") as exc:
        open_backend(GpuConfig(backend="amd"), amdsmi_module=broken)
    assert "modprobe amdgpu" in exc.value.fix


def test_auto_detects_amd_when_nvml_is_absent_and_simulates_when_neither() -> None:
    """auto: NVML first, then amdsmi with GPUs, then simulated."""
    no_nvml = FakeNvml(["rtx-4090"], init_error=12)  # NVML_ERROR_LIBRARY_NOT_FOUND
    amd = open_backend(
        GpuConfig(backend="auto"), nvml_module=no_nvml, amdsmi_module=FakeAmdSmi(["mi300x"])
    )
    assert isinstance(amd, AmdSmiBackend)
    empty = FakeAmdSmi([])
    sim = open_backend(GpuConfig(backend="auto"), nvml_module=no_nvml, amdsmi_module=empty)
    assert isinstance(sim, NvmlBackend) and sim.simulated
    assert empty.initialized == 0, "an amdsmi without GPUs is shut down again"


def test_missing_amdsmi_module_is_unavailable_with_a_fix() -> None:
    """Without the amdsmi package (as here) the backend says what to install."""
    with pytest.raises(AmdSmiUnavailable, match="amdsmi"):
        import_amdsmi()


@pytest.mark.parametrize(
    ("gfx", "cc"), [("gfx942", "9.4"), ("gfx90a", "9.0"), ("gfx1100", "11.0"), ("gfx", None)]
)
def test_gfx_target_to_hip_compute_capability(gfx: str, cc: str | None) -> None:
    """HIP's major.minor comes from the gfx target (the last digit is the stepping)."""
    assert compute_capability(gfx) == cc


def test_detect_json_on_amd_validates_against_the_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpu-agent detect --json` with gpu.backend amd: backend "amd", AMD fields, valid."""
    fake = FakeAmdSmi(["mi300x", "mi300x"])
    monkeypatch.setattr(gpu_pkg, "import_amdsmi", lambda: fake)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"node:\n  state_dir: {tmp_path / 'state'}\ngpu:\n  backend: amd\n")
    assert main(["-c", str(cfg), "detect", "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["backend"] == "amd"
    assert report["gpus"][1]["render_node"] == "/dev/dri/renderD129"
    assert report["gpus"][0]["health"]["state"] == "healthy"


def test_torch_backend_runs_on_rocm_through_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ROCm torch (torch.version.hip set) is accepted on its torch.cuda device, by index."""
    import sys
    import types

    from benchmarks.attest.backends import get_backend

    fake = types.ModuleType("torch")
    fake.version = types.SimpleNamespace(hip="6.4.1", cuda=None)  # type: ignore[attr-defined]
    fake.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: True, get_device_name=lambda d: f"AMD Instinct MI300X on {d}"
    )
    fake.device = lambda name: name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    backend = get_backend("torch", 3)
    assert backend.platform == "rocm"  # type: ignore[attr-defined]
    assert backend.device_name() == "AMD Instinct MI300X on cuda:3"
    assert SKUS["mi300x"].matches_name(backend.device_name().split(" on ")[0])


def test_detect_table_names_rocm_and_the_partition_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readable table says ROCm (not CUDA) and shows SPX/NPS1 where NVIDIA shows MIG."""
    monkeypatch.setattr(gpu_pkg, "import_amdsmi", lambda: FakeAmdSmi(["mi300x"]))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"node:\n  state_dir: {tmp_path / 'state'}\ngpu:\n  backend: amd\n")
    assert main(["-c", str(cfg), "detect"]) == 0
    out = capsys.readouterr().out
    assert "Driver     6.8.5, ROCm 6.4.1" in out
    assert "AMD Instinct MI300X" in out and "SPX/NPS1" in out


def test_gpu_reset_arrives_as_a_degrading_event_and_is_counted(tmp_path: Path) -> None:
    """A driver reset of GPU 1 is one AMD_GPU_RESET event for GPU 1 only: degraded, counted,
    still leasable; with no event, a wait times out empty (amdsmi's NO_DATA)."""
    from agent.gpu.cordons import CordonStore
    from agent.gpu.health import HealthMonitor
    from agent.gpu.xid import AMD_GPU_RESET

    fake, backend = _backend("mi300x", "mi300x")
    monitor = HealthMonitor(backend, CordonStore(tmp_path))
    monitor.start()
    assert backend.events_available
    assert backend.wait_events(0) == []
    fake.inject_reset(1)
    events = backend.wait_events(1.0)
    assert [(e.index, e.code) for e in events] == [(1, AMD_GPU_RESET)]
    assert events[0].uuid == backend.inventory()[1].uuid
    assert not monitor.record_events(events), "a reset is not critical"
    health = {h.index: h for h in monitor.check_once()}
    assert health[1].state == HealthState.DEGRADED and health[1].leasable
    assert health[1].xid_counts == {AMD_GPU_RESET: 1}
    assert health[0].state == HealthState.HEALTHY
    backend.close()
    assert fake.calls["amdsmi_stop_gpu_event_notification"] == 2
