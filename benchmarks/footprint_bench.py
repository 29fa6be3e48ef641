"""Agent footprint: CPU and RSS of the real ``gpu-agent run`` process.

The agent (8 simulated GPUs, connected over TLS to a real ``gpu-scheduler
serve``, default sampling and heartbeat intervals) is measured over a fixed
window with psutil: CPU seconds (user + system) over wall seconds, as a
percentage of one core, and RSS at the end. First idle, then with 8 running
leases (one per GPU, ``sleep`` in the local busybox image), which adds the
usage sampler's per-lease cgroup reads and the record outbox. Targets: idle
< 0.5 % of one core and < 90 MB RSS; with 8 leases < 1.5 % of one core.

Run alone: ``python -m benchmarks.run --only footprint``.
"""

from __future__ import annotations

import time

import psutil

from .agent_stack import GPUS, Stack, running_stack, wait_until
from .registry import Figure, register

IDLE_CPU_TARGET = 0.5
IDLE_RSS_TARGET_MB = 90.0
BUSY_CPU_TARGET = 1.5


def window(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """(% of one core, RSS MB) of ``proc`` over ``seconds``."""
    before, started = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not synchronisation
    after, elapsed = proc.cpu_times(), time.monotonic() - started
    used = (after.user + after.system) - (before.user + before.system)
    return 100 * used / elapsed, proc.memory_info().rss / 1e6


def start_leases(stack: Stack, count: int) -> None:
    ids = [f"footprint-{i}-{time.time_ns()}" for i in range(count)]
    for lease_id in ids:
        stack.submit(lease_id)
    wait_until(
        f"for {count} leases to run",
        lambda: all(stack.lease_state(i) == "LEASE_STATE_RUNNING" for i in ids),
        120,
    )


@register("footprint")
def bench(smoke: bool) -> list[Figure]:
    seconds = 5.0 if smoke else 60.0
    settle = 3.0 if smoke else 15.0
    with running_stack() as stack:
        proc = stack.agent
        time.sleep(settle)  # let start-up work (inventory, first samples) finish
        idle_cpu, idle_rss = window(proc, seconds)
        start_leases(stack, GPUS)
        time.sleep(settle)
        busy_cpu, busy_rss = window(proc, seconds)
    return [
        Figure(
            f"idle, {GPUS} GPUs: CPU ({seconds:g} s window)",
            idle_cpu,
            "% core",
            f"< {IDLE_CPU_TARGET} %",
            idle_cpu < IDLE_CPU_TARGET,
        ),
        Figure(
            f"idle, {GPUS} GPUs: RSS",
            idle_rss,
            "MB",
            f"< {IDLE_RSS_TARGET_MB:g} MB",
            idle_rss < IDLE_RSS_TARGET_MB,
        ),
        Figure(
            f"{GPUS} running leases: CPU ({seconds:g} s window)",
            busy_cpu,
            "% core",
            f"< {BUSY_CPU_TARGET} %",
            busy_cpu < BUSY_CPU_TARGET,
        ),
        Figure(f"{GPUS} running leases: RSS", busy_rss, "MB"),
    ]
