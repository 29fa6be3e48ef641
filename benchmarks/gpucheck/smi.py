"""nvidia-smi's view of the GPUs, the reference ``gpu-agent detect`` is checked against."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import dataclass

# The fields cross-checked against detect, in nvidia-smi's --query-gpu names.
QUERY_FIELDS = (
    "uuid",
    "name",
    "memory.total",
    "driver_version",
    "power.limit",
    "clocks.max.sm",
    "pcie.link.gen.max",
    "pcie.link.width.max",
    "mig.mode.current",
)
SMI_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SmiRow:
    """One GPU as nvidia-smi reports it; None where it prints [N/A] or [Not Supported]."""

    uuid: str
    name: str
    memory_total_mib: int | None
    driver_version: str | None
    power_limit_watts: float | None
    max_sm_clock_mhz: int | None
    pcie_max_generation: int | None
    pcie_max_width: int | None
    mig_enabled: bool | None


def _na(text: str) -> str | None:
    text = text.strip()
    return None if not text or text.startswith("[") or text == "N/A" else text


def _int(text: str) -> int | None:
    value = _na(text)
    return int(float(value)) if value is not None else None


def parse(text: str) -> list[SmiRow]:
    """Rows of ``--format=csv,noheader,nounits`` output for ``QUERY_FIELDS``."""
    rows = []
    for fields in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not fields:
            continue
        if len(fields) != len(QUERY_FIELDS):
            raise ValueError(f"nvidia-smi row has {len(fields)} fields, expected "
                             f"{len(QUERY_FIELDS)}: {fields!r}")  # fmt: skip
        uuid, name, mem, driver, power, sm, gen, width, mig = fields
        power_value = _na(power)
        mig_value = _na(mig)
        rows.append(
            SmiRow(
                uuid=uuid.strip(),
                name=name.strip(),
                memory_total_mib=_int(mem),
                driver_version=_na(driver),
                power_limit_watts=float(power_value) if power_value is not None else None,
                max_sm_clock_mhz=_int(sm),
                pcie_max_generation=_int(gen),
                pcie_max_width=_int(width),
                mig_enabled=None if mig_value is None else mig_value.lower() == "enabled",
            )
        )
    return rows


def command() -> list[str]:
    return [
        "nvidia-smi",
        f"--query-gpu={','.join(QUERY_FIELDS)}",
        "--format=csv,noheader,nounits",
    ]


def run() -> str:
    """nvidia-smi's CSV; FileNotFoundError when it is not installed."""
    if shutil.which("nvidia-smi") is None:
        raise FileNotFoundError("nvidia-smi not found on PATH")
    done = subprocess.run(
        command(), capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=True
    )
    return done.stdout
