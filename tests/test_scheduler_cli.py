"""``gpu-scheduler nodes`` against a real server with its auto-generated TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from pathlib import Path

import pytest
import yaml

from scheduler.cli import main
from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer, tls_dir
from tests.coordinator_harness import admin_token, agent_config, enrollment_token, make_link


def _config(tmp_path: Path, port: int) -> dict[str, object]:
    return {
        "server": {"listen": f"127.0.0.1:{port}"},
        "database": {"path": str(tmp_path / "db" / "scheduler.db")},
        "liveness": {"heartbeat_interval": 0.2},
        "metrics": {"listen": None},
        "relay": {"listen": "127.0.0.1:0", "insecure_http": True},
    }


@pytest.mark.asyncio
async def test_nodes_lists_and_shows_a_connected_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no cert configured the server generates a CA (key 0600); an agent trusting it
    and holding an enrolment token connects, bound to its provider; `nodes` and
    `nodes show PREFIX` print it online with its GPUs, uptime and owner."""
    server = SchedulerServer(SchedulerConfig.model_validate(_config(tmp_path, 0)))
    await server.start()
    stop = asyncio.Event()
    monkeypatch.setenv("GPU_SCHEDULER_TOKEN", await admin_token(server))
    enroll = await enrollment_token(server, "acme")
    try:
        ca = tls_dir(server.config) / "ca.pem"
        assert stat.S_IMODE((tls_dir(server.config) / "server.key").stat().st_mode) == 0o600
        config_file = tmp_path / "sched.yaml"
        config_file.write_text(yaml.safe_dump(_config(tmp_path, server.port)))
        coordinator = agent_config(
            server.port, None, insecure=False, ca_file=str(ca), enrollment_token=enroll
        )
        link, identity = make_link(coordinator, tmp_path / "agent", gpus=3)
        task = asyncio.create_task(link.run(stop))
        await asyncio.wait_for(link.wait_connected(), 5)

        code = await asyncio.to_thread(main, ["-c", str(config_file), "nodes"])
        out = capsys.readouterr().out
        assert code == 0
        row = next(line for line in out.splitlines() if line.startswith(identity.node_id))
        assert "online" in row and "3x NVIDIA GeForce RTX 4090" in row and "100.0%" in row

        prefix = identity.node_id[:10]
        code = await asyncio.to_thread(main, ["-c", str(config_file), "nodes", "show", prefix])
        out = capsys.readouterr().out
        assert code == 0
        assert f"node:        {identity.node_id}" in out
        assert out.count("(simulated)") == 3 and "uptime:      1h 100.0%" in out
        assert "owner:       acme (registration: enrolled)" in out

        code = await asyncio.to_thread(main, ["-c", str(config_file), "nodes", "--json"])
        listed = json.loads(capsys.readouterr().out)
        assert [n["nodeId"] for n in listed] == [identity.node_id]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await server.stop(0)


@pytest.mark.asyncio
async def test_nodes_show_unknown_id_and_unreachable_server_fail_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown node id is NOT_FOUND (exit 1); a server that is down fails within the
    deadline with UNAVAILABLE, not a hang or a traceback."""
    server = SchedulerServer(SchedulerConfig.model_validate(_config(tmp_path, 0)))
    await server.start()
    monkeypatch.setenv("GPU_SCHEDULER_TOKEN", await admin_token(server))
    config_file = tmp_path / "sched.yaml"
    config_file.write_text(yaml.safe_dump(_config(tmp_path, server.port)))
    try:
        code = await asyncio.to_thread(main, ["-c", str(config_file), "nodes", "show", "node-zz"])
        assert code == 1
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        await server.stop(0)
    code = await asyncio.to_thread(main, ["-c", str(config_file), "nodes", "--timeout", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
