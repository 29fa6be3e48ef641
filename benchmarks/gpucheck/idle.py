"""The agent's NVML-live loops, idle, as their own process: what ``footprint`` measures.

The health monitor (samples every ``gpu.health_interval``, waits on the Xid event set)
and one collector scrape every 15 s (Prometheus' default interval), over the real NVML,
exactly as the daemon runs them; no coordinator, Docker or leases, so it runs on any GPU
machine. ``python -m benchmarks.gpucheck.idle SECONDS STATE_DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

SCRAPE_INTERVAL_S = 15.0


async def idle(seconds: float, state_dir: Path, nvml: Any) -> int:
    """Run the loops for ``seconds`` over ``nvml``; returns how many scrapes ran."""
    from prometheus_client import generate_latest

    from agent.gpu.cordons import CordonStore
    from agent.gpu.health import HealthMonitor
    from agent.gpu.nvml import NvmlBackend
    from agent.metrics.nvml_source import NvmlGpuSource
    from agent.metrics.registry import build_telemetry

    backend = NvmlBackend(nvml)
    backend.open()
    monitor = HealthMonitor(backend, CordonStore(state_dir))
    telemetry = build_telemetry(gpu_source=NvmlGpuSource(nvml), scrape_timeout=10.0)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    scrapes = 0
    while loop.time() < deadline:
        await asyncio.to_thread(generate_latest, telemetry.registry)
        scrapes += 1
        with contextlib.suppress(TimeoutError):
            remaining = max(0.0, deadline - loop.time())
            await asyncio.wait_for(stop.wait(), min(SCRAPE_INTERVAL_S, remaining))
    stop.set()
    await task
    backend.close()
    return scrapes


def main() -> int:
    import pynvml

    asyncio.run(idle(float(sys.argv[1]), Path(sys.argv[2]), pynvml))
    return 0


if __name__ == "__main__":
    sys.exit(main())
