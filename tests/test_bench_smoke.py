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
    assert main(["--smoke", "--output", str(out)]) == 0
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
