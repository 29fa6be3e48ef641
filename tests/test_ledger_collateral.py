"""Collateral in the running scheduler: slashing for failed attestation and uptime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gpuagent.v1 import ledger_pb2
from tests.coordinator_harness import FakeClock
from tests.test_usage_ingest import Env, make_env

UNIT = 1_000_000


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path, min_collateral_micros=100 * UNIT, uptime_window=3600):
        yield e


async def provider(env: Env, node_id: str) -> ledger_pb2.Provider:
    response = await env.ledger.Usage(ledger_pb2.UsageRequest(node_id=node_id), timeout=5)
    [found] = response.providers
    return found


@pytest.mark.asyncio
async def test_failed_attestation_slashes_once_per_challenge(env: Env) -> None:
    """A failed attestation takes ledger.slash_attestation_micros (10 units by default);
    told twice about the same challenge it slashes once; dropping below the minimum
    makes the node ineligible for placement."""
    agent = await env.agent("a")
    stake = ledger_pb2.StakeRequest(node_id=agent.node_id, amount_micros=105 * UNIT)
    assert (await env.ledger.Stake(stake, timeout=5)).eligible
    assert env.server.ledger.node_eligible(agent.node_id)
    ledger = env.server.ledger
    assert await ledger.attestation_failed(agent.node_id, "wrong rows", "ch-1") == 10 * UNIT
    assert await ledger.attestation_failed(agent.node_id, "wrong rows", "ch-1") == 0
    found = await provider(env, agent.node_id)
    assert (found.slashed_micros, found.eligible) == (10 * UNIT, False)
    assert not env.server.ledger.node_eligible(agent.node_id)
    reasons = env.rows("SELECT reason, ref FROM ledger_entries WHERE kind = 'slash'")
    assert reasons == [("failed attestation: wrong rows", "ch-1")]


@pytest.mark.asyncio
async def test_uptime_below_the_commitment_is_slashed(env: Env) -> None:
    """A node that committed to 99 % uptime and then fell silent is slashed once its
    commitment has run a whole window (1 h here), and not again within the next
    window; a node that committed to nothing is not."""
    clock = env.server.clock
    assert isinstance(clock, FakeClock)
    silent = await env.agent("silent")
    carefree = await env.agent("carefree")
    committed = ledger_pb2.StakeRequest(
        node_id=silent.node_id, amount_micros=200 * UNIT, uptime_commitment_ratio=0.99
    )
    await env.ledger.Stake(committed, timeout=5)
    plain = ledger_pb2.StakeRequest(node_id=carefree.node_id, amount_micros=200 * UNIT)
    await env.ledger.Stake(plain, timeout=5)
    await silent.close()
    await carefree.close()
    clock.advance(3599)
    assert await env.server.ledger.check_uptime() == {}, "not a whole window yet"
    clock.advance(1)
    assert await env.server.ledger.check_uptime() == {silent.node_id: 10 * UNIT}
    clock.advance(3599)
    assert await env.server.ledger.check_uptime() == {}, "once per window"
    clock.advance(1)
    assert await env.server.ledger.check_uptime() == {silent.node_id: 10 * UNIT}
    assert (await provider(env, carefree.node_id)).slashed_micros == 0
    assert (await provider(env, silent.node_id)).slashed_micros == 20 * UNIT
