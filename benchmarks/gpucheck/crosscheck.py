"""``gpu-agent detect --json`` against nvidia-smi, field by field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .smi import SmiRow

MIB = 1024**2
# nvidia-smi rounds the power limit to two decimals; NVML gives milliwatts.
POWER_TOLERANCE_W = 0.5


@dataclass(frozen=True)
class FieldCheck:
    uuid: str
    field: str
    agent: object
    smi: object
    ok: bool


def _pairs(gpu: Mapping[str, Any], row: SmiRow) -> list[tuple[str, object, object, bool]]:
    mem = gpu.get("memory_total_bytes")
    mem_mib = mem // MIB if isinstance(mem, int) else None
    power = gpu.get("power_limit_watts")
    power_ok = (
        (power is None and row.power_limit_watts is None)
        or (power is not None and row.power_limit_watts is not None
            and abs(float(power) - row.power_limit_watts) <= POWER_TOLERANCE_W)
    )  # fmt: skip
    exact = [
        ("name", gpu.get("name"), row.name),
        ("memory_total_mib", mem_mib, row.memory_total_mib),
        ("driver_version", gpu.get("driver_version"), row.driver_version),
        ("max_sm_clock_mhz", gpu.get("max_sm_clock_mhz"), row.max_sm_clock_mhz),
        ("pcie_max_generation", gpu.get("pcie_max_generation"), row.pcie_max_generation),
        ("pcie_max_width", gpu.get("pcie_max_width"), row.pcie_max_width),
        ("mig_enabled", gpu.get("mig_enabled"), row.mig_enabled),
    ]
    return [(f, a, s, a == s) for f, a, s in exact] + [
        ("power_limit_watts", power, row.power_limit_watts, power_ok)
    ]


def cross_check(
    detect_gpus: Sequence[Mapping[str, Any]], rows: Sequence[SmiRow]
) -> list[FieldCheck]:
    """Every field of every GPU; a GPU only one side sees is a failed ``uuid`` check."""
    by_uuid = {row.uuid: row for row in rows}
    seen = set()
    checks = []
    for gpu in detect_gpus:
        uuid = str(gpu.get("uuid"))
        row = by_uuid.get(uuid)
        if row is None:
            checks.append(FieldCheck(uuid, "uuid", uuid, None, False))
            continue
        seen.add(uuid)
        checks.append(FieldCheck(uuid, "uuid", uuid, row.uuid, True))
        checks.extend(FieldCheck(uuid, f, a, s, ok) for f, a, s, ok in _pairs(gpu, row))
    checks.extend(
        FieldCheck(row.uuid, "uuid", None, row.uuid, False) for row in rows if row.uuid not in seen
    )
    return checks
