"""``gpu-scheduler deposit|balance|stake|usage`` against a real scheduler on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from scheduler.cli import UsageError, main
from scheduler.cmd_ledger import parse_amount
from scheduler.server import SchedulerServer
from tests.test_usage_ingest import Env, make_env

# The admin token of each test's server, for the CLI calls.
CLI_TOKENS: dict[SchedulerServer, str] = {}


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        CLI_TOKENS[e.server] = e.token
        yield e
        CLI_TOKENS.pop(e.server, None)


async def cli(
    server: SchedulerServer, capsys: pytest.CaptureFixture[str], *argv: str, token: str = ""
) -> tuple[int, str, str]:
    """Run gpu-scheduler in a thread (it uses blocking gRPC) against ``server``."""
    address = ["--address", f"127.0.0.1:{server.port}", "--insecure"]
    address += ["--token", token or CLI_TOKENS[server]]
    code = await asyncio.to_thread(main, [argv[0], *address, *argv[1:]])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_amounts_parse_exactly_to_micros() -> None:
    """Decimal text becomes integer micros with no float in between; more than six
    decimals, negatives and non-numbers are usage errors."""
    assert parse_amount("12.5") == 12_500_000
    assert parse_amount("0.000001") == 1
    assert parse_amount("1_000") == 1_000_000_000
    assert parse_amount("0.1") + parse_amount("0.2") == parse_amount("0.3")
    for bad in ("1.0000001", "-1", "abc", "nan", "inf", "1e30"):
        with pytest.raises(UsageError):
            parse_amount(bad)


@pytest.mark.asyncio
async def test_deposit_and_balance_print_units_and_micros(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """deposit credits the buyer (shown as 12.5 and 12500000 micros); balance shows it;
    --json gives the integer fields."""
    code, out, _ = await cli(env.server, capsys, "deposit", "alice", "12.5")
    assert code == 0
    assert "deposited 12.5 (12500000 micros)" in out
    code, out, _ = await cli(env.server, capsys, "balance", "alice")
    assert code == 0 and "balance    12.5 (12500000 micros)" in out
    code, out, _ = await cli(env.server, capsys, "balance", "--json")
    assert json.loads(out)["accounts"][0]["deposited_micros"] == "12500000"


@pytest.mark.asyncio
async def test_bad_input_exits_2_and_unknown_node_exits_1(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed amount is a usage error (2) naming the problem; staking a node the
    scheduler never saw fails with NOT_FOUND (1)."""
    code, _, err = await cli(env.server, capsys, "deposit", "alice", "1.0000001")
    assert code == 2 and "more than 6 decimals" in err
    code, _, err = await cli(env.server, capsys, "stake", "node-nope", "100")
    assert code == 1 and "NOT_FOUND" in err


@pytest.mark.asyncio
async def test_stake_and_usage_show_the_providers_side(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """stake records collateral and the uptime commitment; usage --node shows it with
    the node's earnings and its billed lease."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    await agent.report(agent.record("lease-1", 1, 0, 1800))
    code, out, _ = await cli(env.server, capsys, "stake", agent.node_id, "100", "--uptime", "0.99")
    assert code == 0
    assert "stake      100 (100000000 micros)" in out and "uptime commitment 99.00%" in out
    code, out, _ = await cli(env.server, capsys, "usage", "--node", agent.node_id)
    assert code == 0
    assert "lease lease-1" in out and "cost 0.5 (500000 micros)" in out
    assert "earnings   0.5 (500000 micros)" in out
    assert "1 accepted, 0 rejected, acked through seq 1" in out
    code, _, err = await cli(env.server, capsys, "usage", "--lease", "nope")
    assert code == 1 and "no usage" in err
