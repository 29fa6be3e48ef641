"""`make run` (agent/demo.py) stopped with SIGTERM stops its scheduler and agent too.

The demo starts them in sessions of their own (so Ctrl-C reaches only the demo,
which then stops them); before issue #19 a SIGTERM ended the demo without
unwinding and left both running as orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import psutil
import pytest

from agent.identity import load_or_create
from agent.leases.docker_runtime import LABEL_NODE

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _children_of_this_demo(workdir: Path) -> list[psutil.Process]:
    """The demo's scheduler and agent: processes started in ``workdir`` (this test's
    own, so another worker's demo is never matched) whose command line names a demo
    config."""
    daemons = (["-c", ".run/scheduler.yaml", "serve"], ["-c", ".run/agent.yaml", "run"])
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["cwd"] == str(workdir) and any(cmdline[-3:] == d for d in daemons):
            found.append(proc)
    return found


def _remove_demo_leftovers(state_dir: Path) -> None:
    """The agent leaves containers to Docker and keeps spare lease networks across
    restarts; those of this test's node are ours to remove (the egress chain is the
    demo's default one, shared with any other demo on this host: left alone)."""
    if not (state_dir / "node.key").exists():
        return
    label = f"{LABEL_NODE}={load_or_create(state_dir).node_id}"
    client = docker.from_env()
    try:
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        for network in client.networks.list(filters={"label": label}):
            network.remove()
    finally:
        client.close()


def test_sigterm_stops_the_demos_scheduler_and_agent(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent.demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # ends when the demo exits
            output.append(line)
            if "starting gpu-agent" in line:
                break
        deadline = time.monotonic() + 30
        while len(_children_of_this_demo(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the agent's exec: no event to await from here
        children = _children_of_this_demo(tmp_path)
        assert len(children) == 2, "".join(output)
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=60)
        output.append(rest)
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], "".join(output)
        assert demo.returncode == 143, "".join(output)
        assert "SIGTERM: stopped agent and scheduler" in "".join(output)
    finally:
        for proc in _children_of_this_demo(tmp_path):
            proc.kill()
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        _remove_demo_leftovers(tmp_path / ".run" / "agent")
