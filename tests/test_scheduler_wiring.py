"""The scheduler as its composition root builds it (issue #19): eligibility passed to the
dispatcher's constructor, so its node-view fast path runs where no rule can refuse a
GPU, and both rules still refuse where they apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.attestation_store import AttestationRecord
from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer
from tests.coordinator_harness import FakeClock, drop_messages, scheduler_config
from tests.test_fleet_scale import _hello


def _config(tmp_path: Path, **sections: object) -> SchedulerConfig:
    data = scheduler_config(tmp_path, None).model_dump()
    data.update(sections)
    return SchedulerConfig.model_validate(data)


class CountingChecks:
    """Counts the per-GPU attestation checks placement makes."""

    def __init__(self, server: SchedulerServer) -> None:
        self.checks = 0
        valid_until = server.attestation.valid_until

        def counting(node_id: str, gpu_uuid: str, now_ns: int) -> int | None:
            self.checks += 1
            return valid_until(node_id, gpu_uuid, now_ns)

        server.attestation.valid_until = counting  # type: ignore[method-assign]


def _free(server: SchedulerServer) -> int:
    """Free GPUs placement would offer (of online nodes)."""
    return sum(len(v.free_gpus) for v in server.dispatcher.node_views([]) if v.online)


async def _views_and_checks(server: SchedulerServer, nodes: int) -> tuple[int, int]:
    """(free GPUs placement sees, per-GPU eligibility checks made) over two passes."""
    counter = CountingChecks(server)
    for i in range(nodes):
        await server.registry.register(_hello(i, gpus=2), "test", drop_messages)
    server.dispatcher.node_views([])
    return _free(server), counter.checks


@pytest.mark.asyncio
async def test_without_attestation_or_collateral_no_gpu_is_checked(tmp_path: Path) -> None:
    """Before: the server wrapped the dispatcher's filter in a lambda, so every pass
    checked every GPU of every node (and the fast path never ran)."""
    server = SchedulerServer(_config(tmp_path))  # attestation off, no minimum collateral
    await server.db.open()
    try:
        assert not server.dispatcher.eligibility.restricts  # type: ignore[union-attr]
        assert await _views_and_checks(server, 20) == (40, 0)
    finally:
        await server.db.close()


@pytest.mark.asyncio
async def test_required_attestation_withholds_unattested_gpus(tmp_path: Path) -> None:
    attestation = {"enabled": True, "required": True}
    server = SchedulerServer(_config(tmp_path, attestation=attestation))
    await server.db.open()
    try:
        assert server.dispatcher.eligibility.restricts  # type: ignore[union-attr]
        free, checks = await _views_and_checks(server, 3)
        # Asked once per GPU: with no verdict stored since, the second pass asks nothing.
        assert free == 0 and checks == 6
    finally:
        await server.db.close()


@pytest.mark.asyncio
async def test_minimum_collateral_withholds_nodes_without_stake(tmp_path: Path) -> None:
    server = SchedulerServer(_config(tmp_path, ledger={"min_collateral_micros": 1_000_000}))
    await server.db.open()
    try:
        assert server.dispatcher.eligibility.restricts  # type: ignore[union-attr]
        free, _checks = await _views_and_checks(server, 3)
        assert free == 0
    finally:
        await server.db.close()


@pytest.mark.asyncio
async def test_attested_nodes_take_the_fast_path_until_a_verdict_changes_or_expires(
    tmp_path: Path,
) -> None:
    """With attestation required (the production default), a pass reuses each node's
    last answer while no verdict arrived and none expired: no per-GPU checks. A verdict
    asks again about its own node only."""
    clock = FakeClock()
    attestation = {"enabled": True, "required": True}
    liveness = {"heartbeat_interval": 10.0}  # online for 30 s without heartbeats
    config = _config(tmp_path, attestation=attestation, liveness=liveness)
    server = SchedulerServer(config, clock=clock)
    await server.db.open()
    try:
        counter = CountingChecks(server)
        hellos = [_hello(i, gpus=2) for i in range(3)]
        for hello in hellos:
            await server.registry.register(hello, "test", drop_messages)
        now_ns = round(clock() * 1e9)
        for hello in hellos:
            for gpu in hello.inventory.gpus:
                await server.attestation._store(_passed(hello.node_id, gpu.uuid, now_ns))
        assert _free(server) == 6 and counter.checks == 6
        assert _free(server) == 6 and counter.checks == 6  # fast path: nothing asked
        await server.attestation._store(_passed(hellos[0].node_id, "GPU-other", now_ns))
        assert _free(server) == 6 and counter.checks == 8  # a new verdict: its node again
        assert _free(server) == 6 and counter.checks == 8
        clock.advance(6)  # past every verdict's expiry; the nodes are still online
        assert _free(server) == 0 and counter.checks == 14
    finally:
        await server.db.close()


def _passed(node_id: str, gpu_uuid: str, now_ns: int) -> AttestationRecord:
    return AttestationRecord(
        node_id=node_id,
        gpu_uuid=gpu_uuid,
        challenge_id=f"c-{gpu_uuid}",
        sku="rtx-4090",
        passed=True,
        reason="ok",
        message="",
        measured_tflops=1.0,
        elapsed_ns=1,
        created_ns=now_ns,
        expires_ns=now_ns + 5 * 10**9,
    )
