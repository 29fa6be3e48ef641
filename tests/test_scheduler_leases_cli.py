"""``gpu-scheduler submit|leases|lease show|cancel|logs`` against the real server.

The CLI is synchronous gRPC, so it runs in a worker thread while the server and
the scripted agent run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from scheduler import cli
from tests.test_scheduler_leases import Env, accept, make_env, run_to_success

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lease.yaml"


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


async def run_cli(env: Env, *argv: str) -> int:
    conn = ["--address", f"127.0.0.1:{env.server.port}", "--insecure", "--token", env.token]
    return await asyncio.to_thread(cli.main, [argv[0], *argv[1:], *conn])


@pytest.mark.asyncio
async def test_submit_example_file_and_wait(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """`submit examples/lease.yaml --wait` prints each state until the lease succeeds and
    exits 0; `leases`, `lease show` and `logs` then show it."""
    agent = await env.agent("a", run_to_success, price=100)
    assert await run_cli(env, "submit", str(EXAMPLE), "--wait", "--idempotency-key", "ex-1") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "ex-1  pending"
    states = [line.split()[2].rstrip(":") for line in lines[1:] if line[:2] == "20"]
    assert states == ["pending", "assigned", "running", "succeeded"]
    assert "exit code 0" in out
    assert agent.assigns[0].spec.image == "gpu-agent-test/busybox:latest"
    assert agent.assigns[0].spec.memory_bytes == 256 * 1024**2

    assert await run_cli(env, "leases", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["leaseId"], x["state"]) for x in listed] == [("ex-1", "LEASE_STATE_SUCCEEDED")]
    assert await run_cli(env, "leases", "--state", "running") == 0
    assert "(no leases)" in capsys.readouterr().out

    assert await run_cli(env, "lease", "show", "ex-1") == 0
    shown = capsys.readouterr().out
    assert f"node:        {agent.node_id}" in shown
    assert "accepted 100 micro-units" in shown
    assert "buyer:       demo" in shown

    assert await run_cli(env, "logs", "ex-1", "--tail", "1") == 0
    assert capsys.readouterr().out == "done\n"


@pytest.mark.asyncio
async def test_submit_flags_and_cancel(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Flags build the spec (command shell-split, env, price); `cancel` ends a running lease
    through the agent and says the stop was sent."""
    agent = await env.agent("a", accept)
    code = await run_cli(
        env,
        "submit",
        "--image",
        "busybox",
        "--gpus",
        "1",
        "--cmd",
        "sh -c 'sleep 60'",
        "--env",
        "A=1",
        "--price-max",
        "900",
        "--idempotency-key",
        "flags-1",
        "--network",
        "none",
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == "flags-1  pending"
    await until_assigned(agent)
    spec = agent.assigns[0].spec
    assert list(spec.command) == ["sh", "-c", "sleep 60"]
    assert dict(spec.env) == {"A": "1"}
    assert spec.price_micro_per_gpu_hour == 900
    assert spec.network_mode == "none"
    assert await run_cli(env, "lease", "show", "flags-1") == 0
    assert "network:     none (loopback only)" in capsys.readouterr().out
    assert await run_cli(env, "cancel", "flags-1", "--reason", "enough") == 0
    assert "cancel sent to the node" in capsys.readouterr().out
    await until_cancel(agent)
    assert agent.cancels[0].reason == "enough"


async def until_assigned(agent: object) -> None:
    from tests.coordinator_harness import until

    await until(lambda: bool(agent.assigns), what="assignment")  # type: ignore[attr-defined]


async def until_cancel(agent: object) -> None:
    from tests.coordinator_harness import until

    await until(lambda: bool(agent.cancels), what="LeaseCancel")  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_cli_errors_are_clear(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the lease file exits 2 naming the key (with a suggestion); an unknown
    lease exits 1 with NOT_FOUND; a bad spec exits 1 with the server's field error."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: busybox\ngpu: 2\n")
    assert await run_cli(env, "submit", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}: gpu: unknown key; did you mean 'gpus'?" in err
    assert await run_cli(env, "lease", "show", "nope") == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert await run_cli(env, "submit", "--image", "busybox", "--gpus", "0") == 2
    assert "gpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse's choices refuse it
        await run_cli(env, "submit", "--image", "busybox", "--network", "host")
    assert exited.value.code == 2
    assert "--network: invalid choice: 'host'" in capsys.readouterr().err
    bad.write_text("image: busybox\nnetwork: host\n")
    assert await run_cli(env, "submit", str(bad)) == 2
    assert f"{bad}: network:" in capsys.readouterr().err
    assert await run_cli(env, "leases", "--state", "sleeping") == 2
    assert "not a lease state" in capsys.readouterr().err
