"""Profiles, the simulated backend and its fault schedule from config."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import SimulatedGpuConfig, load_agent_config
from agent.gpu.profiles import PROFILES, get_profile
from agent.gpu.simulated import build_fake_nvml, simulated_backend
from gpuagent.configload import ConfigError


@pytest.mark.parametrize(
    ("key", "name", "mem_mib", "cc", "watts"),
    [
        ("h100-sxm-80gb", "NVIDIA H100 80GB HBM3", 81559, (9, 0), 700),
        ("a100-sxm-80gb", "NVIDIA A100-SXM4-80GB", 81920, (8, 0), 400),
        ("rtx-4090", "NVIDIA GeForce RTX 4090", 24564, (8, 9), 450),
        ("rtx-3080", "NVIDIA GeForce RTX 3080", 10240, (8, 6), 320),
    ],
)
def test_profiles_carry_real_figures(
    key: str, name: str, mem_mib: int, cc: tuple[int, int], watts: int
) -> None:
    """Every shipped profile has the board's real name, memory, CC and power limit."""
    p = get_profile(key)
    assert (p.name, p.memory_total_bytes, p.compute_capability, p.power_limit_watts) == (
        name,
        mem_mib * 1024**2,
        cc,
        watts,
    )


def test_unknown_profile_lists_known_ones() -> None:
    """An unknown profile key names the valid keys."""
    with pytest.raises(ValueError, match="rtx-4090"):
        get_profile("rtx-9999")


def test_config_profiles_match_shipped_profiles() -> None:
    """Every profile the config accepts exists in PROFILES."""
    annotation = SimulatedGpuConfig.model_fields["profile"].annotation
    assert set(annotation.__args__) == set(PROFILES)  # type: ignore[union-attr]


def test_simulated_backend_count_and_stable_uuids() -> None:
    """Count comes from config; UUIDs are stable for one seed and differ across seeds."""
    cfg = SimulatedGpuConfig(profile="rtx-4090", count=3)
    a = simulated_backend(cfg, "host-a")
    a.open()
    b = simulated_backend(cfg, "host-a")
    b.open()
    c = simulated_backend(cfg, "host-b")
    c.open()
    uuids = [g.uuid for g in a.inventory()]
    assert len(uuids) == 3 and all(g.simulated for g in a.inventory())
    assert uuids == [g.uuid for g in b.inventory()]
    assert set(uuids).isdisjoint(g.uuid for g in c.inventory())


def test_faults_from_config_are_scheduled() -> None:
    """A configured fault with after: 0 has taken effect by the first sample."""
    cfg = SimulatedGpuConfig.model_validate(
        {"count": 2, "faults": [{"gpu": 1, "kind": "thermal", "after": "0s"}]}
    )
    backend = simulated_backend(cfg)
    backend.open()
    assert "hw_thermal" in backend.sample(1).throttle_reasons
    assert "hw_thermal" not in backend.sample(0).throttle_reasons


def test_future_fault_waits_for_its_time() -> None:
    """A fault scheduled in the future has not fired yet."""
    cfg = SimulatedGpuConfig.model_validate(
        {"count": 1, "faults": [{"gpu": 0, "kind": "lost", "after": "1h"}]}
    )
    fake = build_fake_nvml(cfg)
    assert len(fake._scheduled) == 1
    backend = simulated_backend(cfg)
    backend.open()
    assert not backend.sample(0).lost


def test_fault_on_missing_gpu_is_a_config_error(tmp_path: Path) -> None:
    """A fault naming a GPU index beyond count fails config load with its key path."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "gpu:\n  simulated:\n    count: 2\n    faults: [{gpu: 5, kind: xid, after: 30s}]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_agent_config(cfg)
    assert any(
        p.startswith("gpu.simulated") and "only 2 simulated GPUs" in p for p in err.value.problems
    )


def test_fault_validation_messages() -> None:
    """Bad faults are rejected with a message naming the problem."""
    with pytest.raises(ValueError, match="only 2 simulated GPUs"):
        SimulatedGpuConfig.model_validate({"count": 2, "faults": [{"gpu": 5, "kind": "xid"}]})
    with pytest.raises(ValueError, match="code applies only to kind xid"):
        SimulatedGpuConfig.model_validate(
            {"count": 2, "faults": [{"gpu": 0, "kind": "ecc", "code": 48}]}
        )
    with pytest.raises(ValueError, match="kind"):
        SimulatedGpuConfig.model_validate({"count": 2, "faults": [{"gpu": 0, "kind": "fire"}]})
