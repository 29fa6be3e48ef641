"""`make gpu-check`: its checks and report, run against the fakes (no GPU here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.gpu.detect import build_report
from agent.gpu.fakenvml import FakeNvml
from agent.gpu.nvml import NvmlBackend
from agent.hostinfo import collect_host_info
from benchmarks.attest.backends import Backend, NumpyBackend
from benchmarks.gpucheck import report, smi
from benchmarks.gpucheck.checks import Check, check_detect, check_footprint, check_scrape, run_all
from gpuagent.attest.skus import SkuSpec, sku_for_name
from scheduler.attestation import simulated_variant

REPO = Path(__file__).resolve().parents[1]
BAND_LIMIT_S = 0.5  # the relaxed band's upper edge: an honest CPU round takes milliseconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CpuAsGpu(NumpyBackend):
    """The CPU backend wearing GPU 0's name, as torch would report it on that card."""

    simulated = False

    def __init__(self, name: str, bandwidth: float) -> None:
        self.name = "torch"
        self._device = name
        self._bandwidth = bandwidth

    def device_name(self) -> str:
        return self._device

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        return self._bandwidth


def smi_csv(fake: FakeNvml, **override: str) -> str:
    """What nvidia-smi prints for the fake's GPUs (its own formatting: MiB, W with 2 dp)."""
    lines = []
    for gpu in fake.gpus:
        p = gpu.profile
        fields = {
            "uuid": gpu.uuid,
            "name": p.name,
            "memory.total": str(p.memory_total_bytes // 1024**2),
            "driver_version": fake.driver_version,
            "power.limit": f"{p.power_limit_watts:.2f}",
            "clocks.max.sm": str(p.max_sm_clock_mhz),
            "pcie.link.gen.max": str(p.pcie_generation),
            "pcie.link.width.max": str(p.pcie_width),
            "mig.mode.current": "Disabled" if p.mig_profile else "[N/A]",
        } | override
        lines.append(", ".join(fields[f] for f in smi.QUERY_FIELDS))
    return "\n".join(lines) + "\n"


class FakeMachine:
    """The check's Machine over FakeNvml: detect is the agent's real report code."""

    def __init__(self, tmp: Path, profiles: Sequence[str] = ("h100-sxm-80gb", "h100-sxm-80gb"),
                 *, smi_override: Mapping[str, str] | None = None, work_advances: bool = True,
                 footprint: tuple[float, float] = (0.2, 60.0)) -> None:  # fmt: skip
        self.clock = Clock()
        self.fake = FakeNvml(profiles, clock=self.clock)
        self.nvml: Any = self.fake
        self._tmp = tmp
        self._smi_override = dict(smi_override or {})
        self._work_advances = work_advances
        self._footprint = footprint
        self.footprint_seconds: list[float] = []

    def smi_csv(self) -> str:
        return smi_csv(self.fake, **self._smi_override)

    def detect(self) -> Mapping[str, Any]:
        backend = NvmlBackend(self.fake)
        backend.open()
        try:
            host = collect_host_info(self._tmp, "unix:///nonexistent/docker.sock", timeout=0.2)
            return build_report(backend, host)
        finally:
            backend.close()

    def allocate(self, nbytes: int) -> None:
        pass  # the fake's memory used is never zero

    def release(self) -> None:
        pass

    def work(self, seconds: float) -> None:
        self.fake.set_utilization(0, 1.0)
        if self._work_advances:
            self.clock.now += seconds
        self.fake.set_utilization(0, 0.0)

    def backends(self) -> Sequence[Backend]:
        return [CpuAsGpu(self.fake.gpus[0].profile.name, 2.0e12)]

    def footprint(self, seconds: float) -> tuple[float, float]:
        self.footprint_seconds.append(seconds)
        return self._footprint


def relaxed(name: str) -> SkuSpec | None:
    sku = sku_for_name(name)
    return simulated_variant(sku, BAND_LIMIT_S) if sku else None


def _run(machine: FakeMachine) -> list[Check]:
    return run_all(
        machine, idle_seconds=0.25, skus=relaxed, sizes=(64, 256), bandwidth_bytes=1 << 20
    )


def test_honest_fake_machine_passes_every_check_and_the_report_says_so(tmp_path: Path) -> None:
    """All five checks pass on a consistent machine; JSON and table carry each one."""
    machine = FakeMachine(tmp_path)
    checks = _run(machine)
    assert [(c.name, c.passed) for c in checks] == [
        ("detect", True), ("scrape", True), ("events", True), ("attestation", True),
        ("footprint", True),
    ], [c.summary for c in checks]  # fmt: skip
    assert machine.footprint_seconds == [0.25], "the idle window is the parameter"
    doc = report.build(checks, ["NVIDIA H100 80GB HBM3"] * 2, 12.3)
    json_path, text_path = report.write(doc, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert loaded["schema"] == "gpu-check/1" and loaded["passed"] is True
    assert [c["name"] for c in loaded["checks"]] == [c.name for c in checks]
    text = text_path.read_text()
    assert text.rstrip().endswith("PASSED")
    assert all(f"{c.name:<12} pass" in text for c in checks)


def test_honest_run_passes_and_the_slowed_run_fails_on_timing(tmp_path: Path) -> None:
    """The attestation check judges both rounds: honest ok, the sleep-inserted one too_slow."""
    (attest,) = [c for c in _run(FakeMachine(tmp_path)) if c.name == "attestation"]
    result = attest.details["backends"]["torch"]
    assert (result["honest"]["passed"], result["honest"]["reason"]) == (True, "ok")
    assert (result["slowed"]["passed"], result["slowed"]["reason"]) == (False, "too_slow")
    assert result["bandwidth_vs_peak"] == pytest.approx(2.0e12 / 3.35e12)


def test_a_field_that_differs_from_nvidia_smi_fails_detect_and_is_named(tmp_path: Path) -> None:
    """nvidia-smi saying 350 W where the agent says 700 W fails detect on power_limit_watts."""
    check = check_detect(FakeMachine(tmp_path, smi_override={"power.limit": "350.00"}))
    assert not check.passed
    bad = {(f["field"], f["agent"], f["smi"]) for f in check.details["fields"] if not f["ok"]}
    assert bad == {("power_limit_watts", 700.0, 350.0)}
    doc = report.build([check], [], 1.0)
    assert "power_limit_watts" in report.table(doc) and "FAILED" in report.table(doc)


def test_a_gpu_nvidia_smi_sees_but_the_agent_does_not_fails(tmp_path: Path) -> None:
    """A UUID on one side only is a failed uuid check, not silently skipped."""
    check = check_detect(FakeMachine(tmp_path, smi_override={"uuid": "GPU-other"}))
    assert not check.passed
    assert {f["field"] for f in check.details["fields"] if not f["ok"]} == {"uuid"}


def test_smi_parser_reads_units_and_not_available_values() -> None:
    """[N/A] and [Not Supported] become None; MIG Enabled/Disabled become booleans."""
    rows = smi.parse(
        "GPU-a, NVIDIA GeForce RTX 4090, 24564, 550.90.07, 450.00, 3120, 4, 16, [N/A]\n"
        "GPU-b, NVIDIA H100 80GB HBM3, 81559, 550.90.07, [Not Supported], 1980, 5, 16, Enabled\n"
    )
    assert rows[0].mig_enabled is None and rows[0].power_limit_watts == 450.0
    assert rows[1].power_limit_watts is None and rows[1].mig_enabled is True
    with pytest.raises(ValueError, match="fields"):
        smi.parse("GPU-a, short row\n")


def test_energy_that_does_not_increase_across_the_matmul_fails_the_scrape(tmp_path: Path) -> None:
    """A frozen energy counter (no time passes during the work) is reported, not passed."""
    check = check_scrape(FakeMachine(tmp_path, work_advances=False))
    assert not check.passed and "energy counter did not increase" in check.summary


def test_a_gpu_without_an_energy_counter_misses_a_series(tmp_path: Path) -> None:
    """The RTX 3080 profile has no energy counter: the expected series is named as missing."""
    check = check_scrape(FakeMachine(tmp_path, profiles=("rtx-3080",)))
    assert not check.passed and "gpu_energy_joules_total missing" in check.summary


def test_footprint_over_target_fails_with_the_figures(tmp_path: Path) -> None:
    """CPU over the idle target fails; the summary gives the measured figures."""
    check = check_footprint(FakeMachine(tmp_path, footprint=(3.0, 70.0)), 60.0)
    assert not check.passed and "3.00 % of one core" in check.summary


def test_a_check_that_raises_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    """nvidia-smi missing mid-run: detect fails with the error, the other checks still run."""
    machine = FakeMachine(tmp_path)

    def broken() -> str:
        raise FileNotFoundError("nvidia-smi not found on PATH")

    machine.smi_csv = broken  # type: ignore[method-assign]
    checks = _run(machine)
    assert len(checks) == 5 and not checks[0].passed and "nvidia-smi" in checks[0].summary
    assert checks[1].passed


def test_without_a_gpu_the_check_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    """`python -m benchmarks.gpucheck` on a machine without nvidia-smi: one line, status 2."""
    env = dict(os.environ, PATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpucheck", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout.count("\n") == 1 and "no NVIDIA GPU" in done.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the check")
def test_make_gpu_check_without_a_gpu_exits_2_with_one_line_of_its_own() -> None:
    """`make gpu-check` here: the check's one line, and make's status 2."""
    done = subprocess.run(
        ["make", "-s", "gpu-check"], capture_output=True, text=True, cwd=REPO, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout.splitlines() == [
        "gpu-check: no NVIDIA GPU on this machine (nvidia-smi not found); nothing to check"
    ]


@pytest.mark.asyncio
async def test_idle_loops_run_the_health_monitor_and_scrapes_then_stop(tmp_path: Path) -> None:
    """What `footprint` measures: the monitor samples and scrapes run, and stop on time."""
    import asyncio

    from benchmarks.gpucheck.idle import idle

    fake = FakeNvml(["h100-sxm-80gb"])
    scrapes = await asyncio.wait_for(idle(0.3, tmp_path, fake), 10)
    assert scrapes == 1  # one at the start; the next would be 15 s later
    assert fake.calls["nvmlDeviceGetTemperature"] >= 2, "health monitor and scrape both read"
    assert fake.calls["nvmlEventSetCreate"] == 1 and fake.calls["nvmlEventSetFree"] == 1
