"""The real NVML backend code against a pynvml-shaped fake built from SKU profiles."""

from __future__ import annotations

import logging

import pynvml
import pytest

from agent.config import GpuConfig
from agent.gpu import NvmlUnavailable, open_backend
from agent.gpu.fakenvml import FakeNvml
from agent.gpu.nvml import NvmlBackend


def _open(fake: FakeNvml) -> NvmlBackend:
    backend = NvmlBackend(fake)
    backend.open()
    return backend


def test_h100_inventory_reports_datasheet_figures() -> None:
    """An H100 SXM is reported with its real name, memory, CC, power, clocks, PCIe and NVLink."""
    backend = _open(FakeNvml(["h100-sxm-80gb"] * 2))
    info = backend.inventory()[0]
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert info.memory_total_bytes == 81559 * 1024**2
    assert info.compute_capability == "9.0"
    assert info.architecture == "hopper"
    assert info.power_limit_watts == 700.0
    assert (info.max_sm_clock_mhz, info.max_memory_clock_mhz) == (1980, 2619)
    assert (info.pcie_max_generation, info.pcie_max_width) == (5, 16)
    assert info.driver_version == "550.90.07"
    assert info.cuda_driver_version == "12.4"
    assert info.ecc_enabled is True
    assert info.mig_enabled is False
    assert info.serial is not None
    assert len(info.nvlink_peers) == 18
    assert info.uuid is not None and info.uuid.startswith("GPU-")
    assert info.uuid != backend.inventory()[1].uuid


def test_consumer_card_drops_unsupported_fields_once() -> None:
    """An RTX 3080 answers NotSupported for ECC, energy and serial: fields are None, called once."""
    fake = FakeNvml(["rtx-3080"])
    backend = _open(fake)
    info = backend.inventory()[0]
    assert info.serial is None and info.ecc_enabled is None and info.mig_enabled is None
    assert {"serial", "ecc_mode", "mig_mode"} <= set(info.unsupported)
    assert info.name == "NVIDIA GeForce RTX 3080"
    for _ in range(3):
        sample = backend.sample(0)
    assert sample.ecc_uncorrected is None
    assert sample.temperature_celsius is not None
    assert "ecc_uncorrected" in sample.unsupported
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 2  # corrected + uncorrected, once each
    assert fake.calls["nvmlDeviceGetSerial"] == 1
    assert backend.dropped_fields(0)["serial"] == "not_supported"


def test_unsupported_field_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The drop of a field is logged once per device, not on every sample."""
    backend = _open(FakeNvml(["rtx-4090"]))
    caplog.set_level(logging.INFO, logger="agent.gpu.nvml")
    for _ in range(5):
        backend.sample(0)
    drops = [r for r in caplog.records if getattr(r, "field", None) == "ecc_uncorrected"]
    assert len(drops) == 1
    assert drops[0].reason == "not_supported"  # type: ignore[attr-defined]


def test_no_permission_drops_field_only() -> None:
    """NoPermission on one call drops that field; the rest of the sample is read."""
    fake = FakeNvml(["a100-sxm-80gb"])
    fake.gpus[0].no_permission.add("nvmlDeviceGetPowerUsage")
    backend = _open(fake)
    sample = backend.sample(0)
    assert sample.power_watts is None
    assert sample.temperature_celsius == 30.0
    assert backend.dropped_fields(0)["power"] == "no_permission"


def test_mig_enabled_h100_reports_mig_devices_and_no_utilization() -> None:
    """A MIG-enabled H100 lists its 7 1g.10gb slices and reports no whole-device utilization."""
    fake = FakeNvml(["h100-sxm-80gb"])
    fake.enable_mig(0)
    backend = _open(fake)
    info = backend.inventory()[0]
    assert info.mig_enabled is True
    assert len(info.mig_devices) == 7
    mig = info.mig_devices[0]
    assert mig.profile == "1g.10gb"
    assert mig.uuid.startswith("MIG-")
    assert mig.gpu_instance_id == 7 and mig.compute_instance_id == 0
    sample = backend.sample(0)
    assert sample.utilization_ratio is None
    assert "utilization" in sample.unsupported
    assert sample.memory_used_bytes is not None
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 0


def test_old_driver_missing_functions_falls_back() -> None:
    """An old driver (FunctionNotFound) still reports throttle reasons via the legacy call."""
    fake = FakeNvml(
        ["a100-sxm-80gb"],
        missing_functions={"nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetRemappedRows"},
    )
    fake.set_thermal(0)
    backend = _open(fake)
    sample = backend.sample(0)
    assert "hw_thermal" in sample.throttle_reasons
    assert sample.remapped_rows_uncorrectable is None
    dropped = backend.dropped_fields(0)
    assert dropped["throttle_reasons"] == "function_not_found"
    assert dropped["remapped_rows"] == "function_not_found"
    backend.sample(0)
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2


def test_gpu_lost_mid_run_gives_lost_sample_and_inventory() -> None:
    """GpuIsLost mid-run turns into lost=True in samples and inventory, never an exception."""
    fake = FakeNvml(["h100-sxm-80gb"] * 2)
    backend = _open(fake)
    uuid = backend.inventory()[1].uuid
    fake.lose_gpu(1)
    sample = backend.sample(1)
    assert sample.lost and sample.uuid == uuid
    assert not backend.sample(0).lost
    infos = backend.inventory()
    assert infos[1].lost and infos[1].uuid == uuid
    assert not infos[0].lost


def test_xid_storm_is_drained_in_bounded_batches() -> None:
    """An Xid storm comes back from wait_events in batches of at most 256 events."""
    fake = FakeNvml(["h100-sxm-80gb"])
    backend = _open(fake)
    backend.inventory()
    assert backend.open_events()
    fake.inject_xid(0, 13, count=300)
    first = backend.wait_events(0.5)
    second = backend.wait_events(0.5)
    assert len(first) == 256 and len(second) == 44
    assert {e.code for e in first} == {13}
    assert first[0].index == 0 and first[0].uuid == backend.inventory()[0].uuid
    assert backend.wait_events(0.01) == []


def test_double_bit_ecc_event_reads_as_xid_48() -> None:
    """An uncorrectable ECC event arrives as Xid 48, and the volatile count shows it."""
    fake = FakeNvml(["a100-sxm-80gb"])
    backend = _open(fake)
    backend.open_events()
    fake.inject_ecc(0)
    assert [e.code for e in backend.wait_events(0.5)] == [48]
    sample = backend.sample(0)
    assert sample.ecc_uncorrected == 1 and sample.row_remap_pending is True


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "not installed"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "permission"),
    ],
)
def test_init_failure_names_cause_and_fix(code: int, words: str) -> None:
    """nvmlInit failures become NvmlUnavailable naming the cause and a fix."""
    with pytest.raises(NvmlUnavailable) as err:
        open_backend(GpuConfig(backend="nvml"), nvml_module=FakeNvml([], init_error=code))
    assert words in err.value.cause
    assert err.value.fix


def test_auto_falls_back_to_simulated_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """backend auto without NVML gives simulated GPUs and a WARNING saying so."""
    caplog.set_level(logging.WARNING, logger="agent.gpu")
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    backend = open_backend(GpuConfig(backend="auto"), nvml_module=fake)
    assert backend.simulated and backend.name == "simulated"
    assert any(
        "SIMULATED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


def test_auto_prefers_nvml_when_it_loads() -> None:
    """backend auto uses NVML when it initialises."""
    backend = open_backend(GpuConfig(backend="auto"), nvml_module=FakeNvml(["rtx-4090"]))
    assert not backend.simulated
    assert backend.inventory()[0].name == "NVIDIA GeForce RTX 4090"
