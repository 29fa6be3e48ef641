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


def _nvml_or_reason() -> tuple[Any, str | None, int]:
    """pynvml initialised on a host with at least one GPU, or why not and the exit status:
    2 when there is no GPU, 1 when there is one but the check cannot run (setup)."""
    if shutil.which("nvidia-smi") is None:
        return None, "gpu-check: no NVIDIA GPU on this machine (nvidia-smi not found)", NO_GPU
    try:
        import pynvml
    except ImportError:
        return None, ("gpu-check: cannot run: the pynvml module is missing "
                      "(carry the wheels, docs/gpu-check.md)"), 1  # fmt: skip
    try:
        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as exc:
        return None, f"gpu-check: no usable NVIDIA GPU on this machine (NVML: {exc})", NO_GPU
    if count == 0:
        pynvml.nvmlShutdown()
        return None, "gpu-check: no NVIDIA GPU on this machine (NVML sees none)", NO_GPU
    return pynvml, None, 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-report"))
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    nvml, reason, status = _nvml_or_reason()
    if nvml is None:
        print(f"{reason}; nothing to check" if status == NO_GPU else reason)
        return status
    if sys.version_info < (3, 11):  # noqa: UP036 - the GPU machine's system Python may be older
        print(f"gpu-check: the agent needs Python >= 3.11, this is {sys.version.split()[0]}; "
              "run with GPU_CHECK_PYTHON=python3.11 or newer (docs/gpu-check.md)")  # fmt: skip
        return 1
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
