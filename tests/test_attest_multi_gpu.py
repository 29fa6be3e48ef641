"""Multi-GPU attestation: each GPU proved by a Prover bound to that GPU, judged alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.attestation import (
    AttestationResponder,
    device_index_from_inventory,
    identity_from_inventory,
    per_gpu_prover,
)
from benchmarks.attest.backends import MatmulOutput, NumpyBackend
from benchmarks.node_fixtures import StaticReporter
from gpuagent.attest.errors import ProverError
from gpuagent.attest.prover import Prover
from tests.coordinator_harness import agent_config, make_link, until
from tests.test_attest_e2e import judged, scheduler, stored

SLOW_S = 2.5  # the slow GPU's extra seconds; the band allows LIMIT_S
LIMIT_S = 1.5


class SlowGpu(NumpyBackend):
    """An honest GPU slower than its declared SKU allows: right answer, late."""

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        time.sleep(SLOW_S)  # the slowness being simulated, not synchronisation
        return super().matmul(nonce, n, inner, dtype)


def test_per_gpu_prover_builds_one_prover_per_device_once() -> None:
    """Each GPU gets the Prover of its own device index, built on first use, then reused."""
    built: list[int] = []

    def build(index: int) -> Prover:
        built.append(index)
        return Prover(lambda b: b, NumpyBackend(), lambda u: None)  # type: ignore[arg-type,return-value]

    source = per_gpu_prover(build, {"GPU-a": 0, "GPU-b": 1}.__getitem__)
    a, b = source("GPU-a"), source("GPU-b")
    assert a is not b and source("GPU-a") is a and built == [0, 1]


@pytest.mark.asyncio
async def test_two_gpus_of_different_speeds_the_slow_one_fails_alone(tmp_path: Path) -> None:
    """GPU 0 answers in time and passes; GPU 1 is correct but slow and fails too_slow, and
    its slowness does not leak onto GPU 0 (nor GPU 0's speed onto it)."""
    async with scheduler(tmp_path, simulated_time_limit=LIMIT_S, network_allowance=0) as server:
        link, identity = make_link(agent_config(server.port, None), tmp_path / "a", gpus=2)
        assert isinstance(link.reporter, StaticReporter)
        gpus = link.reporter.inventory.gpus
        ident = identity_from_inventory(gpus)
        backends = {0: NumpyBackend(), 1: SlowGpu()}
        source = per_gpu_prover(
            lambda i: Prover(identity.sign, backends[i], ident), device_index_from_inventory(gpus)
        )
        responder = AttestationResponder(link, source)
        responder.register()
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            await until(judged(server, identity.node_id, 2), within=30, what="two verdicts")
            verdicts = {str(r[0]): (r[1], r[2]) for r in stored(server, identity.node_id)}
            assert verdicts == {gpus[0].uuid: (1, "ok"), gpus[1].uuid: (0, "too_slow")}
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await responder.aclose()


def test_unknown_gpu_is_refused_by_the_device_map() -> None:
    """A challenge naming a GPU the node does not have is a ProverError, not device 0."""
    with pytest.raises(ProverError, match="not on this node"):
        device_index_from_inventory([])("GPU-nope")
