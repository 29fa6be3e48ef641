"""``python -m benchmarks.gpucheck [--out DIR] [--idle-seconds 60]`` (``make gpu-check``).

Exit status: 0 every check passed, 1 one failed, 2 no NVIDIA GPU here (one line says why).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NO_GPU = 2


def _nvml_or_reason() -> tuple[Any, str | None]:
    """pynvml initialised on a host with at least one GPU, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found"
    try:
        import pynvml
    except ImportError:
        return None, "the pynvml module is missing (carry the wheels, docs/gpu-check.md)"
    try:
        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as exc:
        return None, f"NVML: {exc}"
    if count == 0:
        pynvml.nvmlShutdown()
        return None, "NVML sees no GPU"
    return pynvml, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-report"))
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    nvml, reason = _nvml_or_reason()
    if nvml is None:
        print(f"gpu-check: no NVIDIA GPU on this machine ({reason}); nothing to check")
        return NO_GPU
    # Imported only now: a machine without a GPU needs none of the agent's dependencies.
    from . import report
    from .checks import run_all
    from .machine import RealMachine

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        machine = RealMachine(nvml, Path(work))
        names = [nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(nvml.nvmlDeviceGetCount())]  # fmt: skip
        checks = run_all(machine, idle_seconds=args.idle_seconds)
    doc = report.build(checks, [n.decode() if isinstance(n, bytes) else str(n) for n in names],
                       time.monotonic() - started)  # fmt: skip
    json_path, text_path = report.write(doc, args.out)
    print(report.table(doc))
    print(f"\nreport: {json_path} and {text_path}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
