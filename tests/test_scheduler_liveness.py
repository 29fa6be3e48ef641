"""Liveness and uptime in the registry, driven by an injectable clock (no sleeping)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gpuagent.signing import node_id_from_public_key
from gpuagent.v1 import coordinator_pb2
from scheduler import uptime
from scheduler.db import MIGRATIONS, Database, DatabaseError, migrate
from scheduler.liveness import Liveness, LivenessPolicy, evaluate
from scheduler.registry import Registry
from tests.coordinator_harness import FakeClock, drop_messages

POLICY = LivenessPolicy(
    heartbeat_interval=10, suspect_after_missed=3, offline_grace=45, restart_grace=120
)
KEY = bytes(range(32))
NODE = node_id_from_public_key(KEY)


async def _connect(registry: Registry) -> None:
    hello = coordinator_pb2.Hello(node_id=NODE, public_key=KEY, protocol_version="1.0")
    await registry.register(hello, "test", drop_messages)


@pytest.mark.asyncio
async def test_online_suspect_offline_and_back(db: Database) -> None:
    """Silence > 3 intervals -> suspect, > offline_grace -> offline, a heartbeat -> online;
    each transition reported once by sweep()."""
    clock = FakeClock()
    registry = Registry(db, POLICY, clock)
    clock.advance(200)  # past the restart grace: this node is new, not pre-restart
    await _connect(registry)
    session = registry.sessions[NODE]
    record = registry.nodes[NODE]
    assert registry.sweep() == []
    clock.advance(30)
    assert registry.liveness(record) is Liveness.ONLINE  # 3 intervals exactly: still online
    clock.advance(0.1)
    assert registry.sweep() == [(NODE, Liveness.ONLINE, Liveness.SUSPECT)]
    clock.advance(15)
    assert registry.sweep() == [(NODE, Liveness.SUSPECT, Liveness.OFFLINE)]
    assert registry.sweep() == []
    await registry.heartbeat(session, coordinator_pb2.Heartbeat(seq=1))
    assert record.liveness is Liveness.ONLINE


@pytest.mark.asyncio
async def test_restart_grace_delays_offline_for_nodes_known_before_restart(
    db: Database,
) -> None:
    """After a restart, a node last seen before it stays suspect until restart_grace has
    passed since the start, even when its silence already exceeds offline_grace."""
    clock = FakeClock()
    before = Registry(db, POLICY, clock)
    await _connect(before)
    clock.advance(40)  # scheduler down for 40 s, then starts again
    after = Registry(db, POLICY, clock)
    await after.load()
    record = after.nodes[NODE]
    assert record.liveness is Liveness.SUSPECT
    clock.advance(60)  # 100 s of silence, 60 s since start: grace holds
    assert after.sweep() == []
    clock.advance(61)  # 121 s since start
    assert after.sweep() == [(NODE, Liveness.SUSPECT, Liveness.OFFLINE)]


def test_offline_grace_exceeds_keepalive_detection_by_default() -> None:
    """Default offline grace (45 s) is longer than keepalive's dead-peer detection
    (20 s + 10 s) and than the suspect threshold, so the order is online->suspect->offline."""
    policy = LivenessPolicy()
    assert policy.offline_grace > 20 + 10
    assert policy.offline_grace > policy.suspect_after
    assert evaluate(policy, None, 0, 0) is Liveness.OFFLINE


@pytest.mark.asyncio
async def test_uptime_from_heartbeat_coverage_survives_restart(db: Database) -> None:
    """Heartbeats for 30 min then 30 min of silence give ~50 % over 1 h; the coverage is
    persisted, so a restarted registry reports the same."""
    clock = FakeClock()
    registry = Registry(db, POLICY, clock)
    await _connect(registry)
    session = registry.sessions[NODE]
    for seq in range(1, 181):  # 180 heartbeats, 10 s apart = 30 min
        clock.advance(10)
        await registry.heartbeat(session, coordinator_pb2.Heartbeat(seq=seq))
    clock.advance(1800)
    ratios = registry.uptime(registry.nodes[NODE])
    assert ratios["1h"] == pytest.approx(0.5, abs=0.01)
    # The node is 1 h old: 24h and 30d windows are measured over its life so far.
    assert ratios["24h"] == pytest.approx(ratios["1h"])
    await registry.flush()  # what the server does every second and on shutdown
    reloaded = Registry(db, POLICY, clock)
    await reloaded.load()
    assert reloaded.uptime(reloaded.nodes[NODE]) == pytest.approx(ratios)
    # One merged coverage row for the whole run, not one per heartbeat.
    rows = await db.call(lambda c: c.execute("SELECT COUNT(*) FROM coverage").fetchone()[0])
    assert rows == 1


@pytest.mark.asyncio
async def test_heartbeats_count_at_once_and_are_written_behind_in_one_flush(db: Database) -> None:
    """A heartbeat updates liveness in memory at once but waits for the next flush to
    reach the database; one flush writes every node's latest heartbeat, and a second
    flush with nothing new writes nothing."""
    clock = FakeClock()
    registry = Registry(db, POLICY, clock)
    await _connect(registry)
    session = registry.sessions[NODE]

    def stored(conn: sqlite3.Connection) -> tuple[int, int]:
        last_seen = conn.execute("SELECT last_seen_ns FROM nodes").fetchone()[0]
        end = conn.execute("SELECT MAX(end_ns) FROM coverage").fetchone()[0]
        return last_seen, end

    before = await db.call(stored)
    for seq in (1, 2, 3):
        clock.advance(10)
        await registry.heartbeat(session, coordinator_pb2.Heartbeat(seq=seq))
    assert registry.nodes[NODE].last_seen == clock()
    assert await db.call(stored) == before, "a heartbeat waited for the database"
    assert await registry.flush() == 1
    last_seen, end = await db.call(stored)
    assert last_seen == round(clock() * 1e9)
    assert end == round((clock() + POLICY.heartbeat_interval) * 1e9)  # covers one interval on
    assert await registry.flush() == 0


def test_uptime_ratio_counts_overlap_with_window_only() -> None:
    """Coverage outside the window does not count; gaps count as down."""
    spans: list[tuple[float, float]] = []
    for t in (0, 10, 20):
        uptime.extend(spans, t, 10)
    uptime.extend(spans, 100, 10)
    assert spans == [(0, 30), (100, 110)]
    assert uptime.ratio(spans, now=110, window=50, first_seen=0) == pytest.approx(10 / 50)
    assert uptime.ratio(spans, now=110, window=1000, first_seen=0) == pytest.approx(40 / 110)


def test_migrations_run_once_and_refuse_a_newer_schema(tmp_path: Path) -> None:
    """Migrations bring a fresh DB to the latest version, are a no-op the second time,
    and a DB from a newer scheduler is refused with what to do."""
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    latest = len(MIGRATIONS)
    assert migrate(conn) == latest
    assert migrate(conn) == latest
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
    conn.execute("PRAGMA user_version = 99")
    with pytest.raises(DatabaseError, match="upgrade gpu-scheduler"):
        migrate(conn)
    conn.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only
async def test_database_is_wal(db: Database) -> None:
    """The registry DB runs in WAL mode (readers never block the writer)."""
    mode = await db.call(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    assert mode == "wal"


@pytest.mark.asyncio
@pytest.mark.sqlite_only
async def test_wal_checkpoints_run_off_the_commit_path(db: Database) -> None:
    """Commits never checkpoint (autocheckpoint off: no commit pays for copying the WAL
    back); the database's Checkpointer thread does, and catches up completely."""
    assert await db.call(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    checkpointer = db.checkpointer
    assert checkpointer is not None
    await asyncio.to_thread(checkpointer.ran.wait, 10)  # the background thread runs
    rows = [(f"k{i}", "x" * 3000) for i in range(1500)]
    await db.call(lambda c: c.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows))
    busy, frames, done = await asyncio.to_thread(checkpointer.checkpoint_now)
    assert busy == 0
    assert frames > 1000, "the commit itself checkpointed the WAL"
    assert done == frames
    count = await db.call(lambda c: c.execute("SELECT count(*) FROM meta").fetchone()[0])
    assert count >= 1500
