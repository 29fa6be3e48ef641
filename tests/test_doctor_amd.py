"""`gpu-agent doctor` on an AMD host: amdgpu driver, amdsmi, /dev/kfd and render permissions."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import AgentConfig
from agent.doctor import Severity, check_amdsmi, check_kfd, check_rocm_driver, run_preflight
from agent.gpu.fakeamdsmi import AMDSMI_STATUS_NO_PERM, FakeAmdSmi


def test_rocm_driver_live_missing_or_failed(tmp_path: Path) -> None:
    """initstate "live" passes; a missing module or a non-live state is fatal with a fix."""
    state = tmp_path / "initstate"
    assert check_rocm_driver(state).severity == Severity.FATAL
    state.write_text("coming\n")
    assert "not live" in check_rocm_driver(state).message
    state.write_text("live\n")
    assert check_rocm_driver(state).severity == Severity.OK


def test_kfd_and_render_nodes_must_be_openable(tmp_path: Path) -> None:
    """/dev/kfd missing or a render node the agent cannot open is fatal and names the node."""
    kfd, dri = tmp_path / "kfd", tmp_path / "dri"
    dri.mkdir()
    assert "missing" in check_kfd(kfd, dri).message
    kfd.touch()
    (dri / "renderD128").touch()
    (dri / "renderD129").touch()
    assert check_kfd(kfd, dri, access=lambda p, m: True).severity == Severity.OK
    denied = check_kfd(kfd, dri, access=lambda p, m: p.name != "renderD129")
    assert denied.severity == Severity.FATAL and "renderD129" in denied.message
    assert denied.fix is not None and "render" in denied.fix
    assert check_kfd(kfd, dri).severity == Severity.OK, "real os.access on files we own"
    assert os.access(kfd, os.R_OK | os.W_OK)


def test_amdsmi_check_counts_gpus_and_reports_permission_problems() -> None:
    """amdsmi with GPUs is ok with versions; NO_PERM at init is fatal with the group fix."""
    ok, real = check_amdsmi(FakeAmdSmi(["mi300x", "mi300x"]))
    assert (
        ok.severity == Severity.OK
        and real
        and "2 GPU(s)" in ok.message
        and "ROCm 6.4.1" in ok.message
    )
    bad, real = check_amdsmi(FakeAmdSmi(["mi300x"], init_error=AMDSMI_STATUS_NO_PERM))
    assert bad.severity == Severity.FATAL and not real
    assert bad.fix is not None and "render" in bad.fix


def test_preflight_on_amd_skips_the_nvidia_toolkit(tmp_path: Path) -> None:
    """With gpu.backend amd the checks are driver, amdsmi, docker, kfd: no NVIDIA toolkit."""
    config = AgentConfig.model_validate(
        {"node": {"state_dir": str(tmp_path)}, "gpu": {"backend": "amd"}}
    )
    results = run_preflight(config, amdsmi_module=FakeAmdSmi(["mi210"]), log_problems=False)
    names = [r.name for r in results]
    assert names[:4] == ["driver", "amdsmi", "docker", "kfd"]
    assert "container_toolkit" not in names
    assert results[1].severity == Severity.OK


def test_preflight_on_auto_checks_amd_when_nvml_is_absent(tmp_path: Path) -> None:
    """gpu.backend auto without NVML but with AMD GPUs checks what auto will run on: AMD."""
    from agent.gpu.fakenvml import FakeNvml

    config = AgentConfig.model_validate(
        {"node": {"state_dir": str(tmp_path)}, "gpu": {"backend": "auto"}}
    )
    results = run_preflight(
        config,
        nvml_module=FakeNvml(["rtx-4090"], init_error=12),  # NVML library not found
        amdsmi_module=FakeAmdSmi(["mi300x"]),
        log_problems=False,
    )
    assert [r.name for r in results][:2] == ["driver", "amdsmi"]
    assert results[1].severity == Severity.OK
