"""Restart safety: a new manager on the same state dir re-adopts, stops, reports, removes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from agent.leases import LeaseState
from agent.leases.docker_runtime import LABEL_GPUS, LABEL_LEASE, LABEL_MANAGED, LABEL_NODE
from tests.test_lease_docker import LeaseEnv, OffsetClock, lease_env, lease_env_factory

__all__ = ["lease_env", "lease_env_factory"]  # fixtures shared with the lifecycle tests

pytestmark = pytest.mark.docker


@pytest.mark.asyncio
async def test_restart_readopts_running_stops_expired_reports_lost_removes_orphans(
    lease_env: LeaseEnv,
) -> None:
    """After the agent dies with leases running, the next one keeps the same containers
    running (same ids, zero restarts), stops the one that expired meanwhile, reports the
    one removed behind its back as lost, removes an orphan with our labels, and leaves a
    stranger's container alone."""
    first = lease_env.manager()
    first_task = await lease_env.start(first)
    now = OffsetClock().time()
    await first.assign("r-1", lease_env.spec("sleep 300", gpu_count=1))
    await first.assign("r-2", lease_env.spec("sleep 300", gpu_count=1))
    await first.assign("r-3", lease_env.spec("sleep 300"), expires_at=now + 600)
    await first.assign("r-4", lease_env.spec("sleep 300"))
    before = {}
    for lease_id in ("r-1", "r-2", "r-3", "r-4"):
        update = await lease_env.wait_state(lease_id, LeaseState.RUNNING)
        before[lease_id] = lease_env.client.containers.get(update.container_id).attrs

    # The agent dies: no shutdown of containers, nothing cleaned up.
    first_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    lease_env.runs.clear()
    lease_env.client.containers.get(before["r-4"]["Id"]).remove(force=True)
    orphan = lease_env.client.containers.create(
        lease_env.image,
        ["sleep", "300"],
        labels={LABEL_MANAGED: "true", LABEL_NODE: lease_env.node_id, LABEL_LEASE: "ghost"},
    )
    stranger = lease_env.client.containers.create(
        lease_env.image, ["sleep", "300"], name=f"stranger-{uuid.uuid4().hex[:8]}"
    )
    try:
        # The new agent starts 20 minutes later: r-3's expiry has passed.
        second = lease_env.manager(clock=OffsetClock(offset=1200))
        await lease_env.start(second)

        for lease_id in ("r-1", "r-2"):
            attrs = lease_env.client.containers.get(before[lease_id]["Id"]).attrs
            assert attrs["State"]["Running"] is True
            assert attrs["RestartCount"] == 0
            assert attrs["State"]["StartedAt"] == before[lease_id]["State"]["StartedAt"]
        held = {
            c["Config"]["Labels"][LABEL_GPUS]: c["Config"]["Labels"][LABEL_LEASE]
            for c in (before["r-1"], before["r-2"])
        }
        assert second.snapshot().allocations == {gpu: lease for gpu, lease in held.items()}

        expired = await lease_env.wait_state("r-3", LeaseState.EXPIRED)
        assert "expired at" in expired.reason
        assert {r.lease_id for r in second.running_leases()} == {"r-1", "r-2"}
        lost = await lease_env.wait_state("r-4", LeaseState.LOST)
        assert "vanished" in lost.reason
        remaining = {c.id for c in lease_env.containers()}
        assert remaining == {before["r-1"]["Id"], before["r-2"]["Id"]}
        assert orphan.id not in remaining
        stranger.reload()
        assert stranger.status == "created"

        # The re-adopted leases are fully managed again: events still reach them.
        await second.cancel("r-1", "after restart")
        await lease_env.wait_state("r-1", LeaseState.CANCELLED)
        # A re-sent assignment of a re-adopted lease does not start a second copy.
        await second.assign("r-2", lease_env.spec("sleep 300", gpu_count=1))
        assert {c.id for c in lease_env.containers()} == {before["r-2"]["Id"]}
    finally:
        stranger.remove(force=True)
