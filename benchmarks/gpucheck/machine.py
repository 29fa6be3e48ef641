"""``Machine`` bound to the real host: pynvml, nvidia-smi, ``gpu-agent detect``, torch/CuPy."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.attest.backends import Backend, BackendError, CupyBackend, TorchBackend

from . import smi

REPO = Path(__file__).resolve().parents[2]
DETECT_TIMEOUT_S = 120.0
SETTLE_S = 10.0  # start-up work (inventory, first samples) before the footprint window


class RealMachine:
    def __init__(self, nvml: Any, workdir: Path) -> None:
        self.nvml = nvml
        self._workdir = workdir
        self._held: list[Any] = []

    def smi_csv(self) -> str:
        return smi.run()

    def detect(self) -> Mapping[str, Any]:
        config = self._workdir / "agent.yaml"
        config.write_text(f"node:\n  state_dir: {self._workdir / 'state'}\ngpu:\n  backend: nvml\n")
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(config), "detect", "--json"],
            capture_output=True, text=True, timeout=DETECT_TIMEOUT_S, check=False, cwd=REPO,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"gpu-agent detect exited {done.returncode}: {done.stderr[-2000:]}")
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    def _torch(self) -> Any | None:
        if importlib.util.find_spec("torch") is None:
            return None
        torch = importlib.import_module("torch")
        return torch if torch.cuda.is_available() else None

    def allocate(self, nbytes: int) -> None:
        torch = self._torch()
        if torch is not None:
            self._held.append(torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").fill_(1))
            torch.cuda.synchronize()
            return
        cupy = importlib.import_module("cupy")
        self._held.append(cupy.ones(nbytes, dtype=cupy.uint8))
        cupy.cuda.runtime.deviceSynchronize()

    def release(self) -> None:
        self._held.clear()

    def work(self, seconds: float) -> None:
        torch = self._torch()
        xp: Any = torch if torch is not None else importlib.import_module("cupy")
        if torch is not None:
            a = torch.ones((8192, 8192), dtype=torch.float16, device="cuda:0")
        else:
            a = xp.ones((8192, 8192), dtype=xp.float16)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(20):
                a = (a @ a) * 0  # keep values finite; the work is the GEMM
            if torch is not None:
                torch.cuda.synchronize()
            else:
                xp.cuda.runtime.deviceSynchronize()

    def backends(self) -> Sequence[Backend]:
        found: list[Backend] = []
        for factory in (TorchBackend, CupyBackend):
            try:
                found.append(factory())
            except BackendError:
                continue
        return found

    def footprint(self, seconds: float) -> tuple[float, float]:
        state = Path(tempfile.mkdtemp(prefix="footprint-", dir=self._workdir))
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpucheck.idle", str(seconds + SETTLE_S), str(state)],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the idle agent loops did not start (exit {proc.wait()})")
            time.sleep(SETTLE_S)  # let start-up work finish before the window opens
            ps = psutil.Process(proc.pid)
            before, started = ps.cpu_times(), time.monotonic()
            time.sleep(seconds)  # the measurement window itself
            after, elapsed = ps.cpu_times(), time.monotonic() - started
            rss = ps.memory_info().rss / 1e6
        finally:
            proc.terminate()
            proc.wait(30)
        used = (after.user + after.system) - (before.user + before.system)
        return 100 * used / elapsed, rss
