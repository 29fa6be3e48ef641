"""Command lines, the SKU table and the side probes, run as a user would."""

from __future__ import annotations

import pytest

from agent.cli import main as agent_main
from benchmarks.__main__ import main as bench_main
from benchmarks.attest.backends import NumpyBackend
from benchmarks.attest.bandwidth import measure_bandwidth
from benchmarks.attest.space import SpaceFill, check_space
from gpuagent.attest.generator import MAX_INNER
from gpuagent.attest.skus import SKUS, get_sku, identity_problem, task_size

REQUIRED = {"h100-sxm", "h100-pcie", "a100-sxm-40gb", "a100-sxm-80gb", "l40s", "rtx-4090",
            "rtx-3080"}  # fmt: skip


def test_table_covers_the_required_skus_with_sources_and_sane_figures() -> None:
    """Every required SKU is present, cited, and sized to about 2 s at peak within exactness."""
    assert set(SKUS) >= REQUIRED
    for sku in SKUS.values():
        assert sku.source.startswith("[")
        assert sku.fp16_tensor_tflops > sku.fp32_tflops / 2 > 0
        n, inner = task_size(sku)
        assert inner <= MAX_INNER and inner % 4 == 0
        fastest, slowest = sku.time_bounds(n, inner, "fp16")
        assert 1.0 < fastest < 2.0 < slowest
    assert get_sku("H100-SXM") is SKUS["h100-sxm"]
    with pytest.raises(KeyError, match="known"):
        get_sku("voodoo-5")


def test_identity_check_accepts_real_nvml_values_and_rejects_lookalikes() -> None:
    """The NVML name and memory of an H100 SXM pass; an RTX 3080 Ti name or half memory do not."""
    h100 = get_sku("h100-sxm")
    assert identity_problem(h100, "NVIDIA H100 80GB HBM3", 81559 * 1024**2) is None
    assert "not a" in (identity_problem(h100, "NVIDIA H100 PCIe", 81559 * 1024**2) or "")
    assert "memory" in (identity_problem(h100, "NVIDIA H100 80GB HBM3", 40 * 1024**3) or "")
    assert identity_problem(get_sku("rtx-3080"), "NVIDIA GeForce RTX 3080 Ti", 12 * 1024**3)


def test_proof_of_space_answers_verify_and_wrong_blocks_do_not() -> None:
    """Hashes of the filled blocks match the verifier's regeneration; another nonce's do not."""
    fill = SpaceFill(b"s" * 32, 64 * 1024, block_bytes=4096)
    assert fill.count == 16
    picks = [0, 5, 15]
    assert check_space(b"s" * 32, 4096, picks, fill.answer(picks)) == []
    other = SpaceFill(b"t" * 32, 64 * 1024, block_bytes=4096)
    assert check_space(b"s" * 32, 4096, picks, other.answer(picks)) == picks


def test_bandwidth_probe_reports_a_ratio_of_the_datasheet() -> None:
    """The copy probe returns a positive rate and its fraction of the SKU's bandwidth."""
    res = measure_bandwidth(NumpyBackend(), get_sku("rtx-3080"), 1 << 20, 2)
    assert res.bytes_per_second > 0
    assert res.ratio_of_peak == pytest.approx(res.bytes_per_second / 760e9)


def test_python_m_benchmarks_attest_prints_figures_beside_peak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`python -m benchmarks attest` runs the protocol and prints throughput next to the peak."""
    assert bench_main(["attest", "--backend", "numpy", "--sku", "rtx-3080", "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "vs peak 59.5 TFLOPS" in out
    assert "bit-exact" in out and "protocol   ok" in out


def test_gpu_agent_attest_runs_on_the_cpu_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpu-agent attest --sku` shows progress, figures and the simulated-backend note."""
    assert agent_main(["attest", "--sku", "h100-sxm", "--backend", "numpy", "--size", "96"]) == 0
    captured = capsys.readouterr()
    assert "[3/3]" in captured.err
    assert "989.4 TFLOPS" in captured.out and "simulated CPU backend" in captured.out


def test_gpu_agent_attest_unknown_sku_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --sku exits 2 and lists the known SKUs."""
    assert agent_main(["attest", "--sku", "h100", "--backend", "numpy"]) == 2
    assert "known: a10, a100-sxm-40gb" in capsys.readouterr().err
