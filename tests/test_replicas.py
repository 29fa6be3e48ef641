"""Two scheduler replicas on one PostgreSQL (scheduler/replicas.py), in one process.

Real servers over real gRPC on loopback, one real database on the throwaway cluster,
a real agent link with both addresses. What moves between replicas: an agent (when
its replica stops), a lease submitted on the replica that does not hold the node
(placed by the one that does, at once, through NOTIFY), a cancel (sent by the
holder), and leadership of the once-per-network work (when its holder goes).
The kill -9 versions with separate processes are in tests/faults/test_replica_faults.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from gpuagent.v1 import leases_pb2
from scheduler.config import ReplicaConfig, SchedulerConfig
from scheduler.leases_store import NewLease
from scheduler.server import SchedulerServer
from tests.coordinator_harness import agent_config, make_link, scheduler_config
from tests.pgcluster import Cluster

pytestmark = pytest.mark.asyncio


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 5.0, what: str = ""
) -> float:
    """Poll an async condition (remote database state has no event to await); returns
    how long it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def replica_config(tmp: Path, url: str, name: str, home_first: float = 1.0) -> SchedulerConfig:
    base = scheduler_config(tmp / name, None)
    return base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": url}),
            "replica": ReplicaConfig(
                id=name,
                heartbeat_interval=0.2,
                dead_after=1.0,
                relay_url=f"https://relay-{name}.example.net",
                home_first=home_first,
            ),
            # Placement passes only when kicked: a prompt placement proves the NOTIFY.
            "placement": base.placement.model_copy(update={"retry_interval": 60.0}),
        }
    )


@pytest_asyncio.fixture
async def pair(
    tmp_path: Path, pg_cluster: Cluster, request: pytest.FixtureRequest
) -> AsyncIterator[list[SchedulerServer]]:
    url = pg_cluster.new_database()
    servers = []
    home_first = getattr(request, "param", 1.0)
    for name in ("a", "b"):
        server = SchedulerServer(replica_config(tmp_path, url, name, home_first))
        await server.start()
        servers.append(server)
    yield servers
    for server in servers:
        await server.stop(grace=0)
    pg_cluster.drop_database(url)


async def hold_offer(_assign: leases_pb2.LeaseAssign) -> None:
    """An agent that neither accepts nor rejects: the offer stays in flight."""


def _lease(lease_id: str) -> NewLease:
    spec = leases_pb2.LeaseSpec(image="busybox", gpu_count=1, max_duration_seconds=60)
    return NewLease(lease_id=lease_id, buyer="alice", spec=spec)


async def test_one_leader_and_it_moves_when_its_replica_stops(
    pair: list[SchedulerServer],
) -> None:
    a, b = pair

    async def exactly_one() -> bool:
        return [a.replicas.leader, b.replicas.leader].count(True) == 1

    await eventually(exactly_one, what="one leader")
    leader, other = (a, b) if a.replicas.leader else (b, a)
    assert set(await other.replicas.live()) == {"a", "b"}
    await leader.stop(grace=0)

    async def took_over() -> bool:
        return other.replicas.leader

    took = await eventually(took_over, what="the other replica to lead")
    assert took < 3.0
    assert set(await other.replicas.live()) == {other.replicas.replica_id}


async def test_agent_fails_over_and_leases_follow_the_stream(
    pair: list[SchedulerServer], tmp_path: Path
) -> None:
    a, b = pair
    config = agent_config(a.port, None).model_copy(
        update={"address": (f"localhost:{a.port}", f"localhost:{b.port}")}
    )
    link, identity = make_link(config, tmp_path / "agent")
    link.on("lease_assign", hold_offer)  # type: ignore[arg-type]
    node = identity.node_id
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        assert node in a.registry.sessions and node not in b.registry.sessions

        # b's relay learns where the node's tunnel is: a's relay (for its 307).
        async def held_by_a() -> bool:
            return await b.replicas.relay_holding(node) == "https://relay-a.example.net"

        await eventually(held_by_a, what="the claim of a to be visible to b")
        assert b.relay is not None and b.relay.http.elsewhere == b.replicas.relay_holding
        assert await a.replicas.relay_holding(node) == ""  # a holds it itself
        assert await b.replicas.relay_holding("no-such-node") == ""

        # Submitted on b, which does not hold the node: a places it, promptly.
        await b.leases_store.submit(_lease("l-1"))

        async def offered() -> bool:
            row = await b.leases_store.get("l-1")
            return row is not None and row.node_id == node

        assert await eventually(offered, what="a to offer b's lease") < 2.0

        # a goes away: the agent moves to b within its backoff (0.1 s .. 0.5 s here).
        await a.stop(grace=0)

        async def on_b() -> bool:
            return node in b.registry.sessions

        assert await eventually(on_b, what="the agent on b") < 5.0
        row = await b.leases_store.get("l-1")
        assert row is not None and row.node_id == node  # untouched by the switch
    finally:
        stop.set()
        await task


async def test_a_cancel_on_one_replica_reaches_the_node_held_by_the_other(
    pair: list[SchedulerServer], tmp_path: Path
) -> None:
    a, b = pair
    link, identity = make_link(agent_config(a.port, None), tmp_path / "agent")
    cancels: list[str] = []

    async def on_cancel(message: leases_pb2.LeaseCancel) -> None:
        cancels.append(message.lease_id)

    link.on("lease_assign", hold_offer)  # type: ignore[arg-type]
    link.on("lease_cancel", on_cancel)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        await b.leases_store.submit(_lease("l-2"))

        async def offered() -> bool:
            row = await b.leases_store.get("l-2")
            return row is not None and row.node_id == identity.node_id

        await eventually(offered, what="the offer")
        result = await b.dispatcher.cancel("l-2", "buyer changed their mind")
        assert result is not None and not result.row.terminal  # the node is told, not skipped

        async def told() -> bool:
            return cancels == ["l-2"]

        await eventually(told, what="a LeaseCancel from a")
    finally:
        stop.set()
        await task


async def test_a_token_rotated_on_one_replica_reaches_the_node_held_by_the_other(
    pair: list[SchedulerServer], tmp_path: Path
) -> None:
    """The node (on a) gets the lease's token hash in LeaseAssign; a rotation on b, which
    does not hold the node, reaches it through a as a repeated LeaseAssign with the new
    hash (what an agent in direct mode checks buyers against)."""
    a, b = pair
    link, _identity = make_link(agent_config(a.port, None), tmp_path / "agent")
    hashes: list[bytes] = []

    async def on_assign(message: leases_pb2.LeaseAssign) -> None:
        hashes.append(message.endpoint_token_sha256)

    link.on("lease_assign", on_assign)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=1,
            max_duration_seconds=60,
            ports=[leases_pb2.PortSpec(container_port=8080, protocol="http")],
        )
        await b.leases_store.submit(NewLease(lease_id="l-3", buyer="alice", spec=spec))

        async def assigned() -> bool:
            return len(hashes) == 1

        await eventually(assigned, what="the LeaseAssign")
        assert hashes[0] == await b.endpoint_tokens.hash_of("l-3") and len(hashes[0]) == 32
        token = await b.endpoint_tokens.rotate("l-3")

        async def pushed() -> bool:
            return len(hashes) == 2

        await eventually(pushed, what="the new hash through a")
        assert hashes[1] == hashlib.sha256(token.encode()).digest() != hashes[0]
    finally:
        stop.set()
        await task


async def _agents_on(
    servers: list[SchedulerServer], tmp_path: Path, stop: asyncio.Event
) -> tuple[list[str], list[asyncio.Task[None]]]:
    """One agent on each replica, holding its offers; their node ids."""
    nodes, tasks = [], []
    for n, server in enumerate(servers):
        link, identity = make_link(agent_config(server.port, None), tmp_path / f"agent-{n}")
        link.on("lease_assign", hold_offer)  # type: ignore[arg-type]
        tasks.append(asyncio.create_task(link.run(stop)))
        await asyncio.wait_for(link.wait_connected(), 10)
        nodes.append(identity.node_id)
    return nodes, tasks


async def _offered_to(server: SchedulerServer, lease_id: str) -> list[str]:
    rows = await server.db.call(
        lambda c: c.execute(
            "SELECT node_id FROM placement_attempts WHERE lease_id = ? ORDER BY rowid", (lease_id,)
        ).fetchall()
    )
    return [r[0] for r in rows]


@pytest.mark.parametrize("pair", [30.0], indirect=True)
async def test_the_replica_that_took_a_submit_offers_it_first_to_its_own_nodes(
    pair: list[SchedulerServer], tmp_path: Path
) -> None:
    """Both replicas hold a node that fits. The one that took the Submit offers the
    lease; the other leaves it alone for replica.home_first (30 s here), so the two
    never write the same lease at once. When none of its nodes fits (the lease is
    pinned to the other's node), the home replica says so and the other offers it at
    once, long before home_first."""
    a, b = pair
    stop = asyncio.Event()
    (node_a, node_b), tasks = await _agents_on(pair, tmp_path, stop)
    try:
        await b.leases_store.submit(_lease("home-1"))

        async def offered() -> bool:
            row = await a.leases_store.get("home-1")
            return row is not None and row.node_id is not None

        await eventually(offered, what="an offer of home-1")
        assert await _offered_to(a, "home-1") == [node_b]
        passes = a.dispatcher._not_before.get("home-1")
        assert passes is not None and passes - time.monotonic() > 20  # a still waits

        pinned = NewLease(
            lease_id="home-2", buyer="alice", spec=_lease("x").spec, pinned_node_id=node_a
        )
        await b.leases_store.submit(pinned)

        async def offered_by_a() -> bool:
            row = await a.leases_store.get("home-2")
            return row is not None and row.node_id == node_a

        assert await eventually(offered_by_a, what="a to offer home-2") < 5.0
        assert await _offered_to(a, "home-2") == [node_a]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
