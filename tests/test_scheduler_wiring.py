"""The scheduler as its composition root builds it (issue #19): eligibility passed to the
dispatcher's constructor, so its node-view fast path runs where no rule can refuse a
GPU, and both rules still refuse where they apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer
from tests.coordinator_harness import drop_messages, scheduler_config
from tests.test_fleet_scale import _hello


def _config(tmp_path: Path, **sections: object) -> SchedulerConfig:
    data = scheduler_config(tmp_path, None).model_dump()
    data.update(sections)
    return SchedulerConfig.model_validate(data)


async def _views_and_checks(server: SchedulerServer, nodes: int) -> tuple[int, int]:
    """(free GPUs placement sees, per-GPU eligibility checks made) over two passes."""
    checks = 0
    gpu_eligible = server.attestation.gpu_eligible

    def counting(node_id: str, gpu_uuid: str) -> bool:
        nonlocal checks
        checks += 1
        return gpu_eligible(node_id, gpu_uuid)

    server.attestation.gpu_eligible = counting  # type: ignore[method-assign]
    for i in range(nodes):
        await server.registry.register(_hello(i, gpus=2), "test", drop_messages)
    server.dispatcher.node_views([])
    views = server.dispatcher.node_views([])
    return sum(len(v.free_gpus) for v in views), checks


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
        assert free == 0 and checks == 12
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
