"""Fleet-scale fixes (docs/performance.md): group commit, cheap placement passes, and
an agent that does not hold numpy while idle."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.node_fixtures import simulated_gpus
from gpuagent.v1 import coordinator_pb2, inventory_pb2, leases_pb2
from scheduler.db import Database
from scheduler.group_commit import GroupCommit
from scheduler.lease_dispatch import LeaseDispatcher
from scheduler.leases_store import LeaseStore, NewLease
from scheduler.liveness import LivenessPolicy
from scheduler.node_views import UPTIME_SLICE
from scheduler.registry import Registry
from tests.coordinator_harness import FakeClock, drop_messages

REPO = Path(__file__).resolve().parents[1]


def _hello(i: int, gpus: int = 2) -> coordinator_pb2.Hello:
    node_id = f"node-{i:04d}"
    inventory = simulated_gpus("rtx-4090", gpus, node_id)
    return coordinator_pb2.Hello(
        node_id=node_id,
        public_key=i.to_bytes(32, "big"),
        protocol_version="1.0",
        inventory=inventory_pb2.Inventory(gpus=inventory),
        gpu_health=[
            inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
            for g in inventory
        ],
    )


@pytest.mark.asyncio
async def test_concurrent_hellos_share_commits_and_are_all_stored(db: Database) -> None:
    """200 Hellos at once are durable when register() returns, in far fewer commits."""
    registry = Registry(db, LivenessPolicy())
    await asyncio.gather(*(registry.register(_hello(i), "test", drop_messages) for i in range(200)))
    nodes, sessions = await db.call(
        lambda conn: (
            conn.execute("SELECT count(*) FROM nodes").fetchone()[0],
            conn.execute("SELECT count(*) FROM sessions").fetchone()[0],
        )
    )
    assert (nodes, sessions) == (200, 200)
    assert registry.writes.writes == 200
    assert registry.writes.batches < 20


@pytest.mark.asyncio
async def test_a_failing_write_fails_alone(db: Database) -> None:
    """A write that raises is rolled back and raises to its caller; its batch still commits."""
    commit = GroupCommit(db)

    def good(n: int) -> object:
        return lambda conn: conn.execute("INSERT INTO meta (key, value) VALUES (?, 'v')", (n,))

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('bad', 'v')")
        raise RuntimeError("refused")

    results = await asyncio.gather(
        commit.write(good(1)),  # type: ignore[arg-type]
        commit.write(bad),
        commit.write(good(2)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert isinstance(results[1], RuntimeError)
    keys = await db.call(lambda conn: [r[0] for r in conn.execute("SELECT key FROM meta")])
    assert sorted(keys) == ["1", "2"]  # "bad" was rolled back with its savepoint


@pytest.mark.asyncio
async def test_unchanged_heartbeats_do_not_kick_placement(db: Database) -> None:
    """With a lease waiting, a heartbeat that changes nothing placement reads starts no
    pass; one that frees a GPU does."""
    registry = Registry(db, LivenessPolicy())
    store = LeaseStore(db)
    await store.load()
    dispatcher = LeaseDispatcher(store, registry)
    hello = _hello(1)
    _record, session = await registry.register(hello, "test", drop_messages)
    await store.submit(
        NewLease("l1", "b", leases_pb2.LeaseSpec(image="x", command=["a"], gpu_count=4))
    )
    health = list(hello.gpu_health)
    busy = coordinator_pb2.Heartbeat(seq=1, gpu_health=health, free_gpu_uuids=[])
    await registry.heartbeat(session, busy)
    await dispatcher.on_heartbeat(session, busy)
    dispatcher._wake.clear()
    again = coordinator_pb2.Heartbeat(seq=2, gpu_health=health, free_gpu_uuids=[])
    await registry.heartbeat(session, again)
    await dispatcher.on_heartbeat(session, again)
    assert not dispatcher._wake.is_set()
    freed = coordinator_pb2.Heartbeat(
        seq=3, gpu_health=health, free_gpu_uuids=[g.uuid for g in hello.inventory.gpus]
    )
    await registry.heartbeat(session, freed)
    await dispatcher.on_heartbeat(session, freed)
    assert dispatcher._wake.is_set()


@pytest.mark.asyncio
async def test_a_new_hello_rebuilds_capacity_even_when_heartbeats_look_the_same(
    db: Database,
) -> None:
    """Heartbeats that repeat what placement reads reuse the cached capacity, but a
    Hello that changes the price label (same GPUs, same health) is seen at once."""
    registry = Registry(db, LivenessPolicy())
    dispatcher = LeaseDispatcher(store=LeaseStore(db), registry=registry)
    hello = _hello(1)
    _record, session = await registry.register(hello, "test", drop_messages)
    health = list(hello.gpu_health)
    free = [g.uuid for g in hello.inventory.gpus]
    first = coordinator_pb2.Heartbeat(seq=1, gpu_health=health, free_gpu_uuids=free)
    await registry.heartbeat(session, first)
    await dispatcher.on_heartbeat(session, first)
    cached = dispatcher.views.capacities[session.node_id]
    assert cached.ask_micros == 0
    same = coordinator_pb2.Heartbeat(seq=2, gpu_health=health, free_gpu_uuids=free)
    await registry.heartbeat(session, same)
    await dispatcher.on_heartbeat(session, same)
    assert dispatcher.views.capacities[session.node_id] is cached
    hello.labels["price_micros_per_gpu_hour"] = "7000"
    _record, session = await registry.register(hello, "test", drop_messages)
    again = coordinator_pb2.Heartbeat(seq=1, gpu_health=health, free_gpu_uuids=free)
    await registry.heartbeat(session, again)
    await dispatcher.on_heartbeat(session, again)
    assert dispatcher.views.capacities[session.node_id].ask_micros == 7000


@pytest.mark.asyncio
async def test_pass_places_on_the_best_fit_among_many_nodes(db: Database) -> None:
    """The cached views still give the documented choice: the tightest fit wins."""
    registry = Registry(db, LivenessPolicy())
    store = LeaseStore(db)
    await store.load()
    dispatcher = LeaseDispatcher(store, registry)
    for i in range(50):
        await registry.register(_hello(i, gpus=4), "test", drop_messages)
    await registry.register(_hello(99, gpus=1), "test", drop_messages)
    await store.submit(
        NewLease("l1", "b", leases_pb2.LeaseSpec(image="x", command=["a"], gpu_count=1))
    )
    assert await dispatcher.place_pending() == 1
    row = await store.get("l1")
    assert row is not None and row.node_id == "node-0099"
    await dispatcher.shutdown()


def test_agent_startup_imports_no_numpy() -> None:
    """The daemon's modules load without numpy; the prover brings it on first challenge."""
    # The CLI imports every command module at startup (agent/cli.py), so check them too.
    code = (
        "import sys, importlib, agent.cli, agent.node\n"
        "for name in agent.cli.COMMAND_MODULES: importlib.import_module(name)\n"
        "print('numpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.asyncio
async def test_one_flush_writes_every_nodes_latest_heartbeat(db: Database) -> None:
    """1,200 nodes' heartbeats (more than one multi-row statement holds) reach the
    database in one flush: every node's last-seen time and coverage end."""
    registry = Registry(db, LivenessPolicy())
    sessions = []
    for start in range(0, 1200, 400):
        hellos = [_hello(i) for i in range(start, start + 400)]
        sessions += [
            s
            for _r, s in await asyncio.gather(
                *(registry.register(h, "test", drop_messages) for h in hellos)
            )
        ]
    for session in sessions:
        await registry.heartbeat(session, coordinator_pb2.Heartbeat(seq=1))
    assert await registry.flush() == 1200

    def read(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
        seen = dict(conn.execute("SELECT node_id, last_seen_ns FROM nodes").fetchall())
        ends = dict(conn.execute("SELECT node_id, MAX(end_ns) FROM coverage GROUP BY node_id"))
        return seen, ends

    seen, ends = await db.call(read)
    for record in registry.nodes.values():
        assert record.last_seen is not None
        assert seen[record.node_id] == round(record.last_seen * 1e9)
        assert ends[record.node_id] == round(record.spans[-1][1] * 1e9)


@pytest.mark.asyncio
async def test_the_uptime_sweep_reads_a_slice_per_pass_and_the_rest_between_passes(
    db: Database,
) -> None:
    """The first pass reads every node's uptime; later sweeps read UPTIME_SLICE nodes per
    pass (a 10,000-node sweep in one pass stopped the loop for half a second), and the
    dispatcher's idle waits read the rest, so every node's view moves within a sweep."""
    clock = FakeClock()
    policy = LivenessPolicy()
    registry = Registry(db, policy, clock)
    dispatcher = LeaseDispatcher(store=LeaseStore(db), registry=registry)
    count = 2 * UPTIME_SLICE + 10
    for i in range(count):
        _record, session = await registry.register(_hello(i), "test", drop_messages)
        beat = coordinator_pb2.Heartbeat(seq=1, gpu_health=_hello(i).gpu_health)
        await registry.heartbeat(session, beat)
    clock.advance(policy.heartbeat_interval)  # up for one interval since its first Hello
    first = {v.node_id: v.market.uptime_30d for v in dispatcher.node_views([])}
    assert len(first) == count and all(u > 0.0 for u in first.values())
    # Silence: each node's covered time stays, the window grows, every uptime falls.
    clock.advance(dispatcher.views.uptime_every())
    moved = {v.node_id for v in dispatcher.node_views([]) if v.market.uptime_30d < first[v.node_id]}
    assert len(moved) == UPTIME_SLICE
    dispatcher.views.refresh_uptimes(count)  # what run() does between passes
    after = {v.node_id: v.market.uptime_30d for v in dispatcher.node_views([])}
    assert all(after[n] < first[n] for n in first)


@pytest.mark.asyncio
async def test_a_node_without_a_stream_here_is_never_a_candidate_and_costs_no_capacity_read(
    db: Database,
) -> None:
    """A node whose stream another replica holds (or nobody) is "not connected" to a
    pass without its capacity being read (a leader taking in 5,000 such nodes built
    5,000 capacities in one pass); once its stream comes here it is a candidate."""
    registry = Registry(db, LivenessPolicy())
    dispatcher = LeaseDispatcher(store=LeaseStore(db), registry=registry)
    hello = _hello(1)
    _record, session = await registry.register(hello, "test", drop_messages)
    await registry.end_session(session, "moved to another replica")
    dispatcher.views.capacities.clear()
    (view,) = dispatcher.node_views([])
    assert (view.online, view.offline_reason, view.free_gpus) == (False, "not connected", ())
    assert dispatcher.views.capacities == {}
    assert dispatcher.node_views([])[0] is view
    _record, session = await registry.register(hello, "test", drop_messages)
    beat = coordinator_pb2.Heartbeat(
        seq=1, gpu_health=hello.gpu_health, free_gpu_uuids=[g.uuid for g in hello.inventory.gpus]
    )
    await registry.heartbeat(session, beat)
    (back,) = dispatcher.node_views([])
    assert back.online and len(back.free_gpus) == 2
