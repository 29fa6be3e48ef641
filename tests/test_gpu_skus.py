"""The one SKU table: every fake device has a row, every row knows the names drivers report."""

from __future__ import annotations

import re

import pytest

import gpuagent.attest.skus as skus_module
from agent.gpu.profiles import PROFILES
from gpuagent.attest.skus import SKUS, identity_problem, sku_for_name

REQUIRED = {
    "h200-sxm", "h200-nvl", "b200", "gb200", "l4", "l40", "a10", "a10g", "rtx-6000-ada",
    "rtx-a6000", "rtx-5090", "rtx-5080", "rtx-4080", "mi300x", "mi250x", "mi210",
}  # fmt: skip

# Product names as the drivers print them, from public nvidia-smi / amd-smi / rocminfo output
# (sources in gpuagent/attest/skus.py), and the SKU each one is.
REPORTED = {
    "NVIDIA H100 80GB HBM3": "h100-sxm",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H200": "h200-sxm",
    "NVIDIA H200 NVL": "h200-nvl",
    "NVIDIA B200": "b200",
    "NVIDIA GB200": "gb200",
    "NVIDIA A100-SXM4-80GB": "a100-sxm-80gb",
    "NVIDIA L40S": "l40s",
    "NVIDIA L40": "l40",
    "NVIDIA L4": "l4",
    "NVIDIA A10": "a10",
    "NVIDIA A10G": "a10g",
    "NVIDIA RTX 6000 Ada Generation": "rtx-6000-ada",
    "NVIDIA RTX A6000": "rtx-a6000",
    "NVIDIA GeForce RTX 5090": "rtx-5090",
    "NVIDIA GeForce RTX 5080": "rtx-5080",
    "NVIDIA GeForce RTX 4090": "rtx-4090",
    "NVIDIA GeForce RTX 4080": "rtx-4080",
    "NVIDIA GeForce RTX 3080": "rtx-3080",
    "AMD Instinct MI300X": "mi300x",
    "AMD Instinct MI300X OAM": "mi300x",
    "AMD Instinct MI250X": "mi250x",
    "AMD Instinct MI250X/MI250": "mi250x",
    "AMD Instinct MI210": "mi210",
}

# Real boards whose names sit next to a listed one and must not pass as it.
LOOKALIKES = [
    "NVIDIA GeForce RTX 4080 SUPER",
    "NVIDIA GeForce RTX 5070 Ti",
    "NVIDIA H100 NVL",
    "NVIDIA GH200 480GB",
    "NVIDIA L40G",
    "NVIDIA RTX A5000",
    "AMD Instinct MI300A",
    "AMD Instinct MI308X OAM",
    "AMD Instinct MI250",
]


def test_table_has_todays_skus_each_cited_and_complete() -> None:
    """Every SKU the market names is a row with a source cited in the module, TDP and figures."""
    assert set(SKUS) >= REQUIRED
    doc = skus_module.__doc__ or ""
    for sku in SKUS.values():
        for tag in re.findall(r"\[[^\]]+\]", sku.source):
            assert f"* {tag}" in doc, f"{sku.sku_id}: source {tag} is not cited"
        assert sku.tdp_watts > 0 and sku.memory_bandwidth_bytes_per_second > 0
        assert sku.reported_names and sku.reported_memory_mib > 0
        # Reported memory is at most the marketing size (the driver keeps some back) and
        # within 15 % of it: a MiB/MB slip or a per-board instead of per-GPU row shows here.
        assert 0.85 * sku.memory_bytes < sku.reported_memory_mib * 1024**2 < 1.1 * sku.memory_bytes
    assert {s.vendor for s in SKUS.values()} == {"nvidia", "amd"}


@pytest.mark.parametrize(("reported", "sku_id"), sorted(REPORTED.items()))
def test_reported_name_selects_exactly_its_sku(reported: str, sku_id: str) -> None:
    """A name a driver reports matches its own SKU and no other row."""
    assert [s.sku_id for s in SKUS.values() if s.matches_name(reported)] == [sku_id]
    assert sku_for_name(f"  {reported.lower()} ") is SKUS[sku_id]


def test_every_rows_own_names_match_it_alone() -> None:
    """Each row's listed names pass its own pattern and nobody else's."""
    for sku in SKUS.values():
        for name in sku.reported_names:
            assert [s.sku_id for s in SKUS.values() if s.matches_name(name)] == [sku.sku_id]


@pytest.mark.parametrize("name", LOOKALIKES)
def test_lookalike_boards_match_no_sku(name: str) -> None:
    """A neighbouring board (SUPER, NVL, MI300A...) is unknown, never the listed one."""
    assert sku_for_name(name) is None


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_every_fake_profile_is_a_row_of_the_table(key: str) -> None:
    """Fake devices take name, memory and power from their SKU row, and pass its identity check."""
    profile = PROFILES[key]
    assert SKUS[profile.sku.sku_id] is profile.sku
    assert profile.sku.vendor == "nvidia"
    assert identity_problem(profile.sku, profile.name, profile.memory_total_bytes) is None
    assert profile.power_limit_watts == profile.sku.tdp_watts
