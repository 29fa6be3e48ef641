"""Lease start overhead: LeaseAssign received -> container running, against ``docker run -d``.

The agent side is the real ``gpu-agent run`` process (8 simulated GPUs) taking
leases from a real ``gpu-scheduler serve``; its own histogram
``gpu_agent_lease_start_duration_seconds`` is read before and after each lease,
so each sample is exactly that lease's time from LeaseAssign receipt to the
container reported running (validation, GPU allocation, image check, create,
start, state DB write). The anchor is ``docker run -d`` of the same local image
from the CLI, interleaved one for one with the leases in the same run so both
see the same host load; medians and their ratio are reported. Target: agent
<= 1.2 x docker CLI. A third series runs ``docker run -d`` with the sandbox and
limits the agent gives a lease (capabilities dropped, no-new-privileges, pids,
memory and CPU limits, bounded logs, a bind-mounted scratch dir): the ratio to
it is the agent's own overhead, the rest is what Docker charges for the sandbox.

Run alone: ``python -m benchmarks.run --only lease-start``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

from .agent_stack import GPUS, Stack, docker_rm, docker_run_once, running_stack, wait_until
from .registry import Figure, register

TARGET_RATIO = 1.2


def _lease_start(stack: Stack, lease_id: str) -> float:
    count, total = stack.lease_starts()
    stack.submit(lease_id)
    wait_until(f"for lease {lease_id} to start", lambda: stack.lease_starts()[0] > count, 60)
    return stack.lease_starts()[1] - total


def measure(stack: Stack, rounds: int) -> tuple[list[float], list[float], list[float]]:
    agent: list[float] = []
    docker: list[float] = []
    hardened: list[float] = []
    names: list[str] = []
    tag = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix="bench-scratch-"))
    try:
        docker_run_once(f"bench-warm-{tag}")  # first run pays for cold caches: not a sample
        names.append(f"bench-warm-{tag}")
        for i in range(rounds):
            agent.append(_lease_start(stack, f"start-{tag}-{i}"))
            name = f"bench-docker-{tag}-{i}"
            names.append(name)
            docker.append(docker_run_once(name))
            name = f"bench-hardened-{tag}-{i}"
            names.append(name)
            hardened.append(docker_run_once(name, scratch / name))
    finally:
        docker_rm(names)
        shutil.rmtree(scratch, ignore_errors=True)
    return agent, docker, hardened


@register("lease-start")
def bench(smoke: bool) -> list[Figure]:
    rounds = 3 if smoke else GPUS  # one lease per GPU: the footprint bench's 8 leases
    with running_stack() as stack:
        agent, docker, hardened = measure(stack, rounds)
    a, d, h = (statistics.median(x) for x in (agent, docker, hardened))
    ratio = a / d
    return [
        Figure("agent: LeaseAssign -> running (median)", a * 1000, "ms"),
        Figure("docker run -d, same image (median)", d * 1000, "ms"),
        Figure("docker run -d, agent's sandbox (median)", h * 1000, "ms"),
        Figure(
            f"agent / docker CLI ({rounds} interleaved)",
            ratio,
            "x",
            f"<= {TARGET_RATIO} x",
            ratio <= TARGET_RATIO,
        ),
        Figure("agent / docker CLI with the agent's sandbox", a / h, "x"),
    ]
