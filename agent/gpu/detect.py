"""What ``gpu-agent detect`` reports: a stable JSON document and a readable table.

The JSON follows ``detect.schema.json`` (``SCHEMA_PATH``); tests validate real
output against it. Health here is a read-only verdict from one sample and the
cordon file: detect never cordons anything and sees no Xid history, which only
the running daemon has.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

from agent.hostinfo import HostInfo

from .backend import GpuBackend
from .cordons import CordonFileError, CordonStore
from .health import evaluate
from .model import GpuInfo

SCHEMA_PATH = Path(__file__).with_name("detect.schema.json")
SCHEMA_VERSION = 1


def build_report(
    backend: GpuBackend, host: HostInfo, cordons: CordonStore | None = None
) -> dict[str, Any]:
    """Inventory, host and per-GPU health as plain JSON-ready data. Blocking."""
    if cordons is not None:
        try:
            cordons.load()
        except CordonFileError:
            cordons = None  # detect still reports the hardware; the daemon logs the file
    inventory = backend.inventory()
    gpus = []
    for info in inventory:
        sample = backend.sample(info.index)
        state, reasons = evaluate(
            sample,
            Counter(),
            acknowledged_ecc=cordons.acknowledged_ecc(info.uuid) if cordons and info.uuid else 0,
        )
        cordon = cordons.get(info.uuid) if cordons and info.uuid else None
        entry = dataclasses.asdict(info)
        entry["health"] = {
            "state": state.value,
            "reasons": list(reasons),
            "cordoned": cordon is not None,
            "cordon_reason": cordon.reason if cordon else None,
        }
        gpus.append(_jsonable(entry))
    return {
        "schema_version": SCHEMA_VERSION,
        "collected_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "backend": backend.name,
        "host": _jsonable(dataclasses.asdict(host)),
        "gpus": gpus,
    }


def _jsonable(value: Any) -> Any:
    # asdict leaves tuples, which json writes as lists anyway; normalise for equality in tests.
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _gib(n: int | None) -> str:
    return f"{n / 1024**3:.0f} GiB" if n is not None else "-"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def render_table(report: dict[str, Any]) -> str:
    host = report["host"]
    lines = [
        f"Host       {host['hostname']} ({host['os'] or 'unknown OS'}, kernel {host['kernel']}, "
        f"{host['arch']})",
        f"CPU        {host['cpu_model'] or 'unknown'}: {_or_dash(host['cpu_cores'])} cores, "
        f"{_or_dash(host['cpu_threads'])} threads",
        f"Memory     {_gib(host['memory_bytes'])}",
        f"Data dir   {host['data_dir']}: {_gib(host['data_dir_free_bytes'])} free",
        f"Docker     {host['docker_version'] or 'unreachable'}",
        f"Toolkit    {host['nvidia_container_toolkit_version'] or 'not installed'}",
        f"Backend    {report['backend']}"
        + ("  (SIMULATED GPUs, not real hardware)" if report["backend"] == "simulated" else ""),
    ]
    lines += [f"Problem    {p}" for p in host["problems"]]
    gpus = report["gpus"]
    if gpus:
        first = gpus[0]
        # AMD GPUs run ROCm, not CUDA: name the runtime the driver serves.
        rocm = first.get("rocm_version")
        runtime = f"ROCm {rocm}" if rocm else f"CUDA {_or_dash(first['cuda_driver_version'])}"
        lines.append(f"Driver     {_or_dash(first['driver_version'])}, {runtime}")
    lines.append("")
    header = (
        "IDX",
        "NAME",
        "MEMORY",
        "CC",
        "ARCH",
        "POWER",
        "PCIE",
        "MIG",
        "ECC",
        "HEALTH",
        "UUID",
    )
    rows = [header]
    for g in gpus:
        health = g["health"]["state"] + (" (cordoned)" if g["health"]["cordoned"] else "")
        mig = (
            # AMD's counterpart of MIG is its compute/memory partition mode (SPX/NPS1...).
            "/".join(p for p in (g.get("compute_partition"), g.get("memory_partition")) if p) or "-"
            if g["mig_enabled"] is None
            else (f"on ({len(g['mig_devices'])})" if g["mig_enabled"] else "off")
        )
        pcie = (
            f"gen{g['pcie_max_generation']} x{g['pcie_max_width']}"
            if g["pcie_max_generation"] is not None
            else "-"
        )
        power = f"{g['power_limit_watts']:.0f} W" if g["power_limit_watts"] is not None else "-"
        ecc = "-" if g["ecc_enabled"] is None else ("on" if g["ecc_enabled"] else "off")
        rows.append(
            (
                str(g["index"]),
                "LOST" if g["lost"] else _or_dash(g["name"]),
                _gib(g["memory_total_bytes"]),
                _or_dash(g["compute_capability"]),
                _or_dash(g["architecture"]),
                power,
                pcie,
                mig,
                ecc,
                health,
                _or_dash(g["uuid"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if not gpus:
        lines.append("(no GPUs found)")
    for g in gpus:
        for reason in g["health"]["reasons"]:
            lines.append(f"GPU {g['index']}: {reason}")
        if g["health"]["cordoned"]:
            lines.append(f"GPU {g['index']}: cordoned: {g['health']['cordon_reason']}")
    return "\n".join(lines)


def find_gpu(inventory: list[GpuInfo], ident: str) -> GpuInfo | None:
    """A GPU by index ("0") or UUID (full, or an unambiguous prefix)."""
    if ident.isdigit():
        return next((g for g in inventory if g.index == int(ident)), None)
    matches = [g for g in inventory if g.uuid and g.uuid.lower().startswith(ident.lower())]
    return matches[0] if len(matches) == 1 else None
