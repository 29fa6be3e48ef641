"""`python -m benchmarks.run --smoke`: the bench runner works end to end at CI size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import main


def test_smoke_run_meets_attestation_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The smoke run prints a table with targets, writes JSON, and the verifier targets hold."""
    out = tmp_path / "bench-results.json"
    # The Docker- and fleet-backed benchmarks have their own test below.
    only = ["--only", "attestation", "--only", "usage-outbox", "--only", "scrape"]
    assert main(["--smoke", *only, "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "< 100 ms" in table
    data = json.loads(out.read_text())
    figures = {f["name"]: f for f in data["benchmarks"]["attestation"]["figures"]}
    critical = next(f for name, f in figures.items() if name.startswith("verifier: critical"))
    assert critical["ok"] is True and critical["value"] < 100
    assert figures["honest run verdict passed"]["ok"] is True


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--only with a name nobody registered exits 2 and lists the registered ones."""
    assert main(["--only", "nope", "--output", "/dev/null"]) == 2
    assert "attestation" in capsys.readouterr().err


def test_smoke_run_reports_agent_and_fleet_figures(
    tmp_path: Path, busybox_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lease start, footprint and fleet benchmarks run at CI size and report every figure."""
    out = tmp_path / "bench-results.json"
    only = ["--only", "lease-start", "--only", "footprint", "--only", "fleet"]
    assert main(["--smoke", *only, "--output", str(out)]) == 0
    data = json.loads(out.read_text())["benchmarks"]
    start = {f["name"]: f for f in data["lease-start"]["figures"]}
    ratio = next(f for n, f in start.items() if n.startswith("agent / docker CLI"))
    assert ratio["value"] > 0 and ratio["target"] == "<= 1.2 x"
    footprint = [f["name"] for f in data["footprint"]["figures"]]
    assert any(n.startswith("idle, 8 GPUs: CPU") for n in footprint)
    assert any(n.startswith("8 running leases: CPU") for n in footprint)
    fleet = {f["name"]: f for f in data["fleet"]["figures"]}
    assert fleet["100 agents: connected"]["value"] == 100
    assert fleet["100 agents: heartbeats ingested"]["value"] > 0
    assert fleet["100 agents: placement latency p99"]["value"] > 0
    assert fleet["100 agents: usage records ingested"]["value"] > 0
    assert "placement latency p99" in capsys.readouterr().out


def test_soak_slope_is_per_hour_and_flat_for_constant_samples() -> None:
    """The soak's leak verdict: a least-squares slope in units per hour."""
    from benchmarks.soak import slope_per_hour

    assert slope_per_hour([(0.0, 80.0), (60.0, 80.0), (120.0, 80.0)]) == 0.0
    assert abs(slope_per_hour([(0.0, 80.0), (1800.0, 81.0), (3600.0, 82.0)]) - 2.0) < 1e-9
    assert slope_per_hour([(0.0, 1.0)]) == 0.0
