"""Attestation end to end: the real scheduler on loopback, a real agent link answering
with the real Prover on the CPU backend, verdicts stored, shown and used by placement."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from agent.attestation import AttestationResponder, identity_from_inventory
from agent.identity import NodeIdentity
from agent.link import CoordinatorLink
from benchmarks.attest.backends import MatmulOutput, NumpyBackend
from benchmarks.node_fixtures import StaticReporter
from gpuagent.attest.prover import Prover
from gpuagent.v1 import nodes_pb2, nodes_pb2_grpc
from scheduler.cli import main
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    FakeClock,
    admin_token,
    agent_config,
    authed_channel,
    make_link,
    scheduler_config,
    start_server,
    until,
)

# Small challenges so the CPU answers in milliseconds; the simulated band is the judge.
DEMO: dict[str, object] = {
    "accept_simulated": True,
    "simulated_size": {"n": 64, "inner": 256},
    "simulated_time_limit": 30.0,
    "open_rows": 4,
    "sample_columns": 8,
}


class WrongBackend(NumpyBackend):
    """A cheat that returns C off by one everywhere: right shape, wrong numbers."""

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        c, seconds = super().matmul(nonce, n, inner, dtype)
        return c + 1, seconds


@dataclass
class Agent:
    link: CoordinatorLink
    identity: NodeIdentity
    responder: AttestationResponder | None
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def node_id(self) -> str:
        return self.identity.node_id


@contextlib.asynccontextmanager
async def agent(
    server: SchedulerServer,
    state_dir: Path,
    *,
    backend: NumpyBackend | None = None,
    respond: bool = True,
    silent: bool = False,
    gpus: int = 2,
) -> AsyncIterator[Agent]:
    link, identity = make_link(agent_config(server.port, None), state_dir, gpus=gpus)
    if silent:
        link.on("attestation_challenge", _ignore)  # received, never answered
    responder = None
    if respond:
        assert isinstance(link.reporter, StaticReporter)
        prover = Prover(
            identity.sign,
            backend or NumpyBackend(),
            identity_from_inventory(link.reporter.inventory.gpus),
        )
        responder = AttestationResponder(link, prover)
        responder.register()
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.wait_connected(), 5)
        yield Agent(link, identity, responder, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        if responder is not None:
            await responder.aclose()


@contextlib.asynccontextmanager
async def scheduler(
    tmp_path: Path, clock: Callable[[], float] | None = None, **attestation: object
) -> AsyncIterator[SchedulerServer]:
    config = scheduler_config(tmp_path, None, attestation={**DEMO, **attestation})
    server = await start_server(config, clock) if clock else await start_server(config)
    try:
        yield server
    finally:
        await server.stop(0)


def stored(server: SchedulerServer, node_id: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(server.config.database.path)) as conn:
        return conn.execute(
            "SELECT gpu_uuid, passed, reason, sku, measured_tflops, elapsed_ns, expires_ns"
            " FROM attestations WHERE node_id = ? ORDER BY id",
            (node_id,),
        ).fetchall()


def judged(server: SchedulerServer, node_id: str, count: int) -> Callable[[], bool]:
    return lambda: len(server.attestation.latest(node_id)) >= count


@pytest.mark.asyncio
async def test_honest_node_is_attested_on_connect_and_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Hello the scheduler challenges every GPU; the honest CPU prover passes; each
    verdict is stored with its figures, the agent hears it, placement may use the GPUs,
    and `gpu-scheduler nodes show` prints the verdicts."""
    async with scheduler(tmp_path) as server, agent(server, tmp_path / "a") as a:
        await until(judged(server, a.node_id, 2), what="two verdicts")
        assert server.attestation.attested(a.node_id)
        assert server.attestation.attested(a.node_id)
        assert server.attestation.attested_nodes() == {a.node_id}
        rows = stored(server, a.node_id)
        assert [(r[1], r[2], r[3]) for r in rows] == [(1, "ok", "rtx-4090@simulated")] * 2
        assert all(r[4] > 0 and r[5] > 0 for r in rows)  # TFLOPS and elapsed measured
        assert rows[0][6] == pytest.approx(
            (server.clock() + server.config.attestation.validity) * 1e9, rel=1e-6
        )
        assert a.responder is not None
        await until(lambda: len(a.responder.results()) == 2, what="agent hearing the verdicts")  # type: ignore[union-attr]
        assert all(
            r.passed and r.sku == "rtx-4090@simulated" for r in a.responder.results().values()
        )
        views = server.dispatcher.node_views(())
        assert len(views[0].free_gpus) == 2

        config_file = tmp_path / "sched.yaml"
        config_file.write_text(
            yaml.safe_dump(
                {
                    "server": {"listen": f"127.0.0.1:{server.port}", "insecure": True},
                    "database": {"path": str(server.config.database.path)},
                }
            )
        )
        monkeypatch.setenv("GPU_SCHEDULER_TOKEN", await admin_token(server))
        code = await asyncio.to_thread(
            main, ["-c", str(config_file), "nodes", "show", a.node_id[:12]]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert "attested:    yes" in out
        assert out.count("rtx-4090@simulated  passed  expires in 26.0h") == 2


@pytest.mark.asyncio
async def test_cheating_prover_fails_and_gets_no_gpus(tmp_path: Path) -> None:
    """A prover whose C is wrong commits fine but its opened rows do not match the
    secret columns: result_wrong for every GPU, the node is not eligible, placement
    sees no free GPU, and the agent is told why."""
    async with (
        scheduler(tmp_path) as server,
        agent(server, tmp_path / "a", backend=WrongBackend()) as a,
    ):
        await until(judged(server, a.node_id, 2), what="two verdicts")
        rows = stored(server, a.node_id)
        assert [(r[1], r[2]) for r in rows] == [(0, "result_wrong")] * 2
        assert not server.attestation.attested(a.node_id)
        assert not server.attestation.gpu_eligible(a.node_id, str(rows[0][0]))
        assert server.dispatcher.node_views(())[0].free_gpus == ()
        assert a.responder is not None
        await until(lambda: len(a.responder.results()) == 2, what="agent hearing the verdicts")  # type: ignore[union-attr]
        assert {r.reason for r in a.responder.results().values()} == {"result_wrong"}


@pytest.mark.asyncio
async def test_expired_attestation_is_not_eligible_until_reattested(tmp_path: Path) -> None:
    """A passed verdict counts for `validity`; past it the node is not eligible, and the
    next periodic round challenges it again and makes it eligible."""
    clock = FakeClock()
    async with (
        scheduler(tmp_path, clock, interval="1h", validity="2h", random_mean=0) as server,
        agent(server, tmp_path / "a") as a,
    ):
        await until(judged(server, a.node_id, 2), what="two verdicts")
        await until(lambda: not server.attestation.in_flight(a.node_id), what="the round done")
        assert server.attestation.attested(a.node_id)
        assert await server.attestation.tick() == []  # not due yet

        clock.advance(2 * 3600 + 1)
        assert not server.attestation.attested(a.node_id)
        assert not server.attestation.gpu_eligible(a.node_id, str(stored(server, a.node_id)[0][0]))

        started = await server.attestation.tick()
        assert len(started) == 1
        await until(lambda: len(stored(server, a.node_id)) == 4, what="re-attestation")
        assert server.attestation.attested(a.node_id)


@pytest.mark.asyncio
async def test_simulated_gpus_fail_unless_the_scheduler_accepts_them(tmp_path: Path) -> None:
    """By default a GPU the agent marks simulated fails at once with reason `simulated`
    (no challenge is sent), so a demo node can never pass as real hardware."""
    async with (
        scheduler(tmp_path, accept_simulated=False) as server,
        agent(server, tmp_path / "a") as a,
    ):
        await until(judged(server, a.node_id, 2), what="two verdicts")
        rows = stored(server, a.node_id)
        assert [(r[1], r[2], r[3]) for r in rows] == [(0, "simulated", "rtx-4090")] * 2
        assert a.responder is not None and a.responder.challenges_answered == 0
        assert not server.attestation.attested(a.node_id)


@pytest.mark.asyncio
async def test_time_band_is_enforced_for_simulated_gpus_too(tmp_path: Path) -> None:
    """Correct work that arrives after the band's limit is rejected as too_slow."""
    async with (
        scheduler(tmp_path, simulated_time_limit=1e-6, network_allowance=0) as server,
        agent(server, tmp_path / "a", gpus=1) as a,
    ):
        await until(judged(server, a.node_id, 1), what="a verdict")
        assert [r[2] for r in stored(server, a.node_id)] == ["too_slow"]


@pytest.mark.asyncio
async def test_agent_without_a_responder_fails_fast_as_agent_error(tmp_path: Path) -> None:
    """An agent that refuses the challenge (no attestation support) is failed at once from
    its ProtocolError, not after the challenge's deadline."""
    async with scheduler(tmp_path) as server, agent(server, tmp_path / "a", respond=False) as a:
        await until(judged(server, a.node_id, 2), within=3, what="two verdicts")
        assert {r[2] for r in stored(server, a.node_id)} == {"agent_error"}


@pytest.mark.asyncio
async def test_nodes_attest_on_demand(tmp_path: Path) -> None:
    """Nodes.Attest with wait returns the verdicts of a fresh challenge; a GPU the node
    lacks is INVALID_ARGUMENT and a disconnected node FAILED_PRECONDITION."""
    async with scheduler(tmp_path) as server:
        async with agent(server, tmp_path / "a") as a:
            await until(judged(server, a.node_id, 2), what="verdicts on connect")
            first = {r.challenge_id for r in server.attestation.latest(a.node_id)}
            channel = authed_channel(server, await admin_token(server))
            stub = nodes_pb2_grpc.NodesStub(channel)
            gpu = server.registry.nodes[a.node_id].inventory.gpus[1].uuid
            response = await stub.Attest(
                nodes_pb2.AttestNodeRequest(node_id=a.node_id, gpu_uuids=[gpu], wait=True),
                timeout=20,
            )
            assert response.challenge_id and response.challenge_id not in first
            assert [(r.gpu_uuid, r.passed) for r in response.results] == [(gpu, True)]
            node = await stub.Get(nodes_pb2.GetNodeRequest(node_id=a.node_id), timeout=5)
            assert node.attested and len(node.attestations) == 2
            with pytest.raises(grpc.aio.AioRpcError) as bad_gpu:
                await stub.Attest(
                    nodes_pb2.AttestNodeRequest(node_id=a.node_id, gpu_uuids=["GPU-nope"]),
                    timeout=5,
                )
            assert bad_gpu.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await until(lambda: a.node_id not in server.registry.sessions, what="disconnect")
        with pytest.raises(grpc.aio.AioRpcError) as offline:
            await stub.Attest(nodes_pb2.AttestNodeRequest(node_id=a.node_id), timeout=5)
        assert offline.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not connected" in (offline.value.details() or "")
        await channel.close()


@pytest.mark.asyncio
async def test_verdicts_survive_a_scheduler_restart(tmp_path: Path) -> None:
    """The latest verdict per GPU is read back at startup: an attested node stays
    eligible across a scheduler restart without being challenged again."""
    async with scheduler(tmp_path) as server, agent(server, tmp_path / "a") as a:
        await until(judged(server, a.node_id, 2), what="two verdicts")
        node_id = a.node_id
    async with scheduler(tmp_path) as again:
        assert again.attestation.attested(node_id)
        assert len(again.attestation.latest(node_id)) == 2


@pytest.mark.asyncio
async def test_a_silent_agent_times_out_on_the_schedulers_clock(tmp_path: Path) -> None:
    """The challenge's watchdog counts on the scheduler's clock (issue #19: it mixed in
    time.time(), so with the clock a day ahead a silent agent was never timed out)."""
    clock = FakeClock(time.time() + 86_400)
    async with (
        scheduler(tmp_path, clock, simulated_time_limit=0.2, open_timeout=0.2) as server,
        agent(server, tmp_path / "a", respond=False, silent=True, gpus=1) as a,
    ):
        await until(judged(server, a.node_id, 1), within=5, what="a verdict")
        assert [r[2] for r in stored(server, a.node_id)] == ["timeout"]


async def _ignore(_message: object) -> None:
    return None
