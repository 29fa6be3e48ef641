"""Placement's node views kept current by change (scheduler/node_views.py): after every
kind of change a pass sees exactly what a rebuild from nothing gives, and a pass after
nothing but heartbeats evaluates no view again."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from gpuagent.v1 import coordinator_pb2, inventory_pb2, market_pb2
from scheduler import placement
from scheduler.db import Database
from scheduler.lease_dispatch import LeaseDispatcher
from scheduler.leases_store import LeaseRow, LeaseStore
from scheduler.liveness import LivenessPolicy
from scheduler.node_views import IDLE_SLICE, UPTIME_SLICE, NodeViews
from scheduler.registry import Registry, Session
from scheduler.server import SchedulerServer
from tests.coordinator_harness import FakeClock, drop_messages
from tests.test_fleet_scale import _hello
from tests.test_ledger import lease
from tests.test_scheduler_wiring import _config, _passed

NODES = 12
STEPS = 400
# Heartbeats and time most often: they are what a real fleet does most.
STEP_KINDS = (
    ("hello", "end", "drain", "offer", "hold", "release", "verdict", "nothing")
    + ("heartbeat",) * 3
    + ("time",) * 2
)


def _holding(node_id: str, gpus: list[str]) -> LeaseRow:
    """A running lease holding ``gpus`` on ``node_id`` (what placement_view returns)."""
    return replace(lease(f"held-{node_id}-{'-'.join(gpus)}", node=node_id), gpu_uuids=gpus)


def _comparable(views: list[placement.NodeView]) -> dict[str, placement.NodeView]:
    # Uptime moves by its own slow sweep (tests/test_fleet_scale.py covers it); a
    # rebuild reads the newest ratio where the sweep keeps one within 1e-4 of it.
    return {v.node_id: replace(v, market=replace(v.market, uptime_30d=0.0)) for v in views}


class World:
    def __init__(self, server: SchedulerServer, clock: FakeClock, rng: random.Random) -> None:
        self.server = server
        self.clock = clock
        self.rng = rng
        self.views: NodeViews = server.dispatcher.views
        self.sessions: dict[str, Session] = {}
        self.hellos = {f"node-{i:04d}": _hello(i, gpus=3) for i in range(NODES)}
        self.holding: list[LeaseRow] = []
        self.verdicts = 0

    def gpus(self, node_id: str) -> list[str]:
        return [g.uuid for g in self.hellos[node_id].inventory.gpus]

    async def step(self) -> str:
        rng, registry = self.rng, self.server.registry
        node_id = rng.choice(sorted(self.hellos))
        hello = self.hellos[node_id]
        session = self.sessions.get(node_id)
        kind = rng.choice(STEP_KINDS)
        if kind == "hello" or (session is None and kind in ("heartbeat", "offer")):
            if rng.random() < 0.3:
                hello.labels["price_micros_per_gpu_hour"] = str(rng.choice([100, 200, 300]))
            _record, self.sessions[node_id] = await registry.register(hello, "t", drop_messages)
            return "hello"
        if kind == "heartbeat" and session is not None:
            gpus = self.gpus(node_id)
            health = [
                inventory_pb2.GpuHealth(
                    uuid=u,
                    state=rng.choice(
                        [inventory_pb2.GpuHealth.HEALTHY] * 4 + [inventory_pb2.GpuHealth.UNHEALTHY]
                    ),
                    cordoned=rng.random() < 0.1,
                )
                for u in gpus
            ]
            beat = coordinator_pb2.Heartbeat(
                seq=session.last_heartbeat_seq + 1,
                gpu_health=health,
                free_gpu_uuids=[u for u in gpus if rng.random() < 0.8],
                draining=rng.random() < 0.1,
            )
            await registry.heartbeat(session, beat)
            await self.server.dispatcher.on_heartbeat(session, beat)
            return kind
        if kind == "end" and session is not None:
            await registry.end_session(session, "gone")
            del self.sessions[node_id]
            return kind
        if kind == "drain":
            record = registry.nodes.get(node_id)
            if record is not None:
                await registry.set_draining(record, not record.draining)
            return kind
        if kind == "offer" and session is not None:
            model = hello.inventory.gpus[0].name
            price = market_pb2.GpuPrice(gpu_model=model, micros_per_gpu_hour=rng.choice([50, 150]))
            offer = market_pb2.NodeOffer(pricing=[price])
            await registry.update_offer(session, offer)
            self.server.dispatcher.offer_changed(node_id)
            return kind
        if kind == "time":
            # Across online -> suspect (30 s) -> offline (45 s) and verdict expiry (5 s).
            self.clock.advance(rng.choice([0.5, 3.0, 5.0, 12.0, 31.0, 46.0]))
            return kind
        if kind == "hold":
            self.holding.append(_holding(node_id, rng.sample(self.gpus(node_id), 1)))
            return kind
        if kind == "release" and self.holding:
            self.holding.pop(rng.randrange(len(self.holding)))
            return kind
        if kind == "verdict" and node_id in registry.nodes:
            now_ns = round(self.clock() * 1e9)
            for uuid in rng.sample(self.gpus(node_id), 2):
                self.verdicts += 1
                record = replace(_passed(node_id, uuid, now_ns), challenge_id=f"c{self.verdicts}")
                await self.server.attestation._store(record)
            return kind
        return "nothing"


@pytest.mark.parametrize("attestation", [False, True], ids=["open", "attestation-required"])
@pytest.mark.asyncio
async def test_views_kept_by_change_equal_a_rebuild_after_every_step(
    tmp_path: Path, attestation: bool
) -> None:
    """400 random steps (Hellos with new prices, heartbeats freeing, failing, cordoning
    and draining GPUs, sessions ending, operator drains, offers, leases holding and
    releasing GPUs, verdicts, time passing across every liveness and expiry threshold):
    after each, the views a pass reads are those built from nothing."""
    clock = FakeClock()
    sections: dict[str, object] = {"liveness": {"heartbeat_interval": 10.0}}
    if attestation:
        sections["attestation"] = {"enabled": True, "required": True}
    server = SchedulerServer(_config(tmp_path, **sections), clock=clock)
    await server.db.open()
    try:
        world = World(server, clock, random.Random(18))  # noqa: S311 - a reproducible walk, not a secret
        kinds: set[str] = set()
        for n in range(STEPS):
            kinds.add(await world.step())
            if n % 3 == 0:
                continue  # changes pile up between passes, too
            got = _comparable(world.views.current(world.holding))
            want = _comparable(world.views.rebuilt(world.holding))
            assert got == want, f"step {n}: views differ after {sorted(kinds)}"
            here, away = world.views.split(world.holding)
            assert {v.node_id for v in here} == set(server.registry.sessions)
            assert all(v.offline_reason == "not connected" for v in away)
        assert {"hello", "heartbeat", "end", "drain", "offer", "time", "hold", "verdict"} <= kinds
        online = [v for v in world.views.current(world.holding) if v.online]
        assert online and len(online) < NODES  # the walk saw both, not one state only
    finally:
        await server.db.close()


@pytest.mark.asyncio
async def test_a_pass_after_heartbeats_alone_evaluates_no_view(tmp_path: Path) -> None:
    """Each heartbeat brings its node's view up to date as it arrives, so the next pass
    evaluates none (a pass over 10,000 nodes evaluated them all, 16 ms p50)."""
    clock = FakeClock()
    liveness = {"heartbeat_interval": 10.0}  # online for 30 s after each heartbeat
    server = SchedulerServer(_config(tmp_path, liveness=liveness), clock=clock)
    await server.db.open()
    try:
        registry, views = server.registry, server.dispatcher.views
        sessions = [(await registry.register(_hello(i), "t", drop_messages))[1] for i in range(50)]
        views.current([])
        evaluated: list[str] = []
        real = views._update

        def counting(node_id: str, now: float) -> None:
            evaluated.append(node_id)
            real(node_id, now)

        views._update = counting  # type: ignore[method-assign]
        clock.advance(5)
        for session in sessions:
            hello = _hello(int(session.node_id.removeprefix("node-")))
            beat = coordinator_pb2.Heartbeat(
                seq=1, gpu_health=hello.gpu_health, free_gpu_uuids=[hello.inventory.gpus[0].uuid]
            )
            await registry.heartbeat(session, beat)
            await server.dispatcher.on_heartbeat(session, beat)
        assert len(evaluated) == 50  # one each, as it arrived
        # Each heartbeat moved its node's due time later: nothing pushed (about one heap
        # entry per node, not one per heartbeat).
        assert len(views._due) == 50
        evaluated.clear()
        after = views.current([])
        assert evaluated == []
        assert all(len(v.free_gpus) == 1 for v in after)  # and they say what the beats said
        # A lease holding a GPU on one node: that node alone, at the next pass.
        node = sessions[7].node_id
        held = [_holding(node, [_hello(7).inventory.gpus[0].uuid])]
        after = views.current(held)
        assert evaluated == [node]
        assert {v.node_id for v in after if not v.free_gpus} == {node}
        # Silence past suspect_after: each node's due time brings it back, once, and
        # between passes (the dispatcher's idle wait) rather than in the next pass.
        evaluated.clear()
        clock.advance(31)
        views.catch_up()
        assert sorted(evaluated) == sorted(s.node_id for s in sessions)
        evaluated.clear()
        assert not any(v.online for v in views.current(held))
        assert evaluated == []
    finally:
        await server.db.close()


@pytest.mark.asyncio
async def test_work_between_passes_goes_in_slices_and_stops_for_a_kick(db: Database) -> None:
    """Between passes the dispatcher reads uptimes and catches up changed views in
    slices, and stops as soon as a pass is asked for: a Submit's pass used to wait
    behind a whole slice of 1,000 uptime reads (fleet_replicas at 10k)."""
    clock = FakeClock()
    registry = Registry(db, LivenessPolicy(), clock)
    dispatcher = LeaseDispatcher(store=LeaseStore(db), registry=registry)
    views = dispatcher.views
    sessions = [(await registry.register(_hello(i), "t", drop_messages))[1] for i in range(300)]
    # No pass ever reads the whole fleet's uptimes: a node's first one comes with its
    # view (the first pass of 10,000 nodes held a Submit for 250 ms, fleet_replicas).
    views.current([])
    assert set(views.uptimes) == {s.node_id for s in sessions} and not views._uptime_queue
    clock.advance(views.uptime_every())  # a sweep is due
    swept_at = views._uptimes_at
    dispatcher.kick()
    await dispatcher._between_passes()
    assert views._uptimes_at == swept_at  # a pass is wanted: nothing read
    dispatcher._wake.clear()
    await dispatcher._between_passes()
    assert views._uptimes_at > swept_at and len(views._uptime_queue) == 300 - UPTIME_SLICE
    # Changed views are caught up IDLE_SLICE at a time; the rest wait for the next call.
    for session in sessions[:100]:
        await registry.heartbeat(session, coordinator_pb2.Heartbeat(seq=2))
    assert not views.catch_up(IDLE_SLICE)
    assert len(views._changed) == 100 - IDLE_SLICE
    assert views.catch_up(IDLE_SLICE) and not views._changed
