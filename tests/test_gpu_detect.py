"""`gpu-agent detect | cordon | uncordon` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pynvml
import pytest

from agent.cli import main
from agent.gpu.detect import SCHEMA_PATH


def _config(tmp_path: Path, profile: str = "a100-sxm-80gb", count: int = 2) -> str:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"node:\n  state_dir: {tmp_path / 'state'}\n"
        f"gpu:\n  backend: simulated\n  simulated:\n    profile: {profile}\n    count: {count}\n"
    )
    return str(cfg)


def _detect_json(cfg: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["-c", cfg, "detect", "--json"]) == 0
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


@pytest.mark.parametrize("profile", ["h100-sxm-80gb", "rtx-3080"])
def test_detect_json_validates_against_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profile: str
) -> None:
    """detect --json output validates against the shipped JSON Schema, for DC and consumer cards."""
    report = _detect_json(_config(tmp_path, profile), capsys)
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema, format_checker=jsonschema.FormatChecker())
    gpus = report["gpus"]
    assert isinstance(gpus, list) and len(gpus) == 2
    assert report["backend"] == "simulated"


def test_schema_rejects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown field or a wrong type is caught by the schema (it is not vacuous)."""
    report = _detect_json(_config(tmp_path), capsys)
    schema = json.loads(SCHEMA_PATH.read_text())
    report["gpus"][0]["surprise"] = 1  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, schema)


def test_detect_table_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table names the GPUs, their memory and health, and says the GPUs are simulated."""
    assert main(["-c", _config(tmp_path), "detect"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA A100-SXM4-80GB" in out
    assert "80 GiB" in out and "healthy" in out
    assert "SIMULATED" in out


def test_cordon_and_uncordon_by_index_and_uuid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cordon by index shows in detect; uncordon by UUID prefix lifts it."""
    cfg = _config(tmp_path)
    assert main(["-c", cfg, "cordon", "1", "--reason", "fan failure"]) == 0
    capsys.readouterr()
    gpus = _detect_json(cfg, capsys)["gpus"]
    gpu1 = gpus[1]  # type: ignore[index]
    assert gpu1["health"]["cordoned"] is True
    assert gpu1["health"]["cordon_reason"] == "fan failure"
    assert main(["-c", cfg, "uncordon", gpu1["uuid"][:12]]) == 0
    assert "uncordoned" in capsys.readouterr().out
    assert _detect_json(cfg, capsys)["gpus"][1]["health"]["cordoned"] is False  # type: ignore[index]


def test_cordon_unknown_gpu_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown GPU index exits 2 and lists the GPUs that exist."""
    assert main(["-c", _config(tmp_path), "cordon", "7"]) == 2
    err = capsys.readouterr().err
    assert "no GPU '7'" in err and "0=GPU-" in err


def test_detect_without_nvml_exits_2_with_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default nvml backend on a host without NVML: one clear message, exit code 2."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this host")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"node:\n  state_dir: {tmp_path}\n")
    assert main(["-c", str(cfg), "detect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: NVML library not found")
    assert "fix:" in err and "Traceback" not in err
