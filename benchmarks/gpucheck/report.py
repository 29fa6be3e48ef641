"""The hardware check's report: one JSON document and the table a person reads."""

from __future__ import annotations

import datetime as dt
import json
import platform
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checks import Check

SCHEMA = "gpu-check/1"


def build(checks: Sequence[Check], gpus: Sequence[str], seconds: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "finished_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "gpus": list(gpus),
        "seconds": round(seconds, 1),
        "passed": all(c.passed for c in checks),
        "checks": [
            {"name": c.name, "passed": c.passed, "summary": c.summary, "details": c.details}
            for c in checks
        ],
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"gpu-check on {report['host']} ({', '.join(report['gpus']) or 'no GPU'}), "
        f"{report['seconds']} s",
        "",
        f"{'CHECK':<12} {'RESULT':<6} SUMMARY",
    ]
    for c in report["checks"]:
        lines.append(f"{c['name']:<12} {'pass' if c['passed'] else 'FAIL':<6} {c['summary']}")
    fields: list[dict[str, Any]] = next(
        (c["details"].get("fields", []) for c in report["checks"] if c["name"] == "detect"), []
    )
    differing = [f for f in fields if not f["ok"]]
    if differing:
        lines += ["", f"{'GPU':<14} {'FIELD':<20} {'AGENT':<28} NVIDIA-SMI"]
        lines += [f"{str(f['uuid'])[:12]:<14} {f['field']:<20} {f['agent']!s:<28} {f['smi']}"
                  for f in differing]  # fmt: skip
    lines += ["", "PASSED" if report["passed"] else "FAILED"]
    return "\n".join(lines)


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, text_path = out_dir / "gpu-check.json", out_dir / "gpu-check.txt"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    text_path.write_text(table(report) + "\n", encoding="utf-8")
    return json_path, text_path
