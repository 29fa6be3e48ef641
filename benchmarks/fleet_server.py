"""The fleet benchmark's scheduler process: ``gpu-scheduler serve`` plus a latency probe.

``python -m benchmarks.fleet_server CONFIG STATS_FILE`` runs the very same
``SchedulerServer`` that ``gpu-scheduler serve`` runs, with one addition: an
``on_heartbeat`` hook that records, per heartbeat, two latencies:

- from the agent stamping it (``sent_at_unix_nanos``; same host, same clock) to
  the scheduler having stored it: latency as the fleet feels it, including the
  simulator's own lag in sending, transport, and queueing in gRPC and the event loop;
- from the servicer reading it off the stream (``Session.last_read_mono_ns``) to
  stored: the scheduler's processing (dispatch, the batched SQLite write, hooks).

Three more series say *why* when those are slow: how late the event loop wakes
from a 50 ms sleep (loop lag), how long each garbage collection of the oldest
generation stops the process, and how long each job on the SQLite thread runs.

On SIGUSR1 the samples so far are written to STATS_FILE (atomically) and reset.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from gpuagent.aio import stop_on_signals
from gpuagent.logsetup import setup_logging
from gpuagent.v1 import coordinator_pb2
from scheduler import placement
from scheduler.config import load_scheduler_config
from scheduler.db import Database, PostgresDatabase
from scheduler.leases_store import LeaseStore
from scheduler.node_views import NodeViews
from scheduler.registry import Session
from scheduler.server import SchedulerServer

LAG_TICK = 0.05
STALL_AFTER = 0.05  # the loop silent this long: sample what it is doing


class StallSampler:
    """A thread that looks at the event loop's stack whenever the loop has not ticked
    for ``STALL_AFTER`` seconds: what the loop is busy with when heartbeats wait."""

    def __init__(self) -> None:
        self.beat = time.monotonic()
        self.stacks: collections.Counter[str] = collections.Counter()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="stall-sampler", daemon=True).start()

    async def tick(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(0.01)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            if time.monotonic() - self.beat < STALL_AFTER:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            stack = traceback.extract_stack(frame)[-6:]
            self.stacks[" < ".join(f"{f.name}:{f.lineno}" for f in reversed(stack))] += 1

    def top(self, n: int = 8) -> list[tuple[str, int]]:
        top, self.stacks = self.stacks.most_common(n), collections.Counter()
        return top


class PhaseTimer:
    """Times the steps a placement goes through (patched in: this process only)."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = collections.defaultdict(list)
        for cls, name in (
            (LeaseStore, "submit"),
            (LeaseStore, "placement_view"),
            (LeaseStore, "offer"),
        ):
            self._time_async(cls, name)
        self._time_sync(NodeViews, "split")  # what a pass reads (scheduler/node_views.py)
        self._time_sync(placement, "choose")
        self.counts: collections.Counter[str] = collections.Counter()
        self._count_view_rebuilds()

    def _count_view_rebuilds(self) -> None:
        """How many nodes a pass re-reads a capacity for (its cache missed), split by
        whether this replica holds the node's stream, and how many views it evaluates
        again: what makes a pass slow."""
        split, capacity, update = NodeViews.split, NodeViews.capacity, NodeViews._update
        counts = self.counts
        inside = [False]

        def in_pass(views: Any, *args: Any, **kwargs: Any) -> Any:
            inside[0] = True
            try:
                return split(views, *args, **kwargs)
            finally:
                inside[0] = False

        def counted(views: Any, record: Any) -> Any:
            if inside[0]:
                here = record.node_id in views.registry.sessions
                counts["capacity re-read in a pass, " + ("held here" if here else "elsewhere")] += 1
            return capacity(views, record)

        def evaluated(views: Any, node_id: str, now: float) -> Any:
            if inside[0]:
                counts["views evaluated again in a pass"] += 1
            return update(views, node_id, now)

        NodeViews.split = in_pass  # type: ignore[method-assign,assignment]
        NodeViews.capacity = counted  # type: ignore[method-assign,assignment]
        NodeViews._update = evaluated  # type: ignore[method-assign,assignment]

    def _time_async(self, owner: Any, name: str) -> None:
        real, series = getattr(owner, name), self.ms

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await real(*args, **kwargs)
            finally:
                series[name].append((time.perf_counter() - started) * 1000)

        setattr(owner, name, timed)

    def _time_sync(self, owner: Any, name: str) -> None:
        real, series = getattr(owner, name), self.ms

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                series[name].append((time.perf_counter() - started) * 1000)

        setattr(owner, name, timed)

    def take(self) -> dict[str, list[float]]:
        out = {name: list(values) for name, values in self.ms.items()}
        self.ms.clear()
        for name, n in self.counts.items():
            out[name] = [float(n)]  # one "sample": the count since the last take
        self.counts.clear()
        return out


class HeartbeatProbe:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.latencies_ms: list[float] = []
        self.processing_ms: list[float] = []
        self.loop_lag_ms: list[float] = []
        self.gc_pause_ms: list[float] = []
        self.db_job_ms: list[float] = []
        self.db_wait_ms: list[float] = []
        self._gc_started = 0.0
        self.young_gc_max_ms = 0.0
        self.stalls = StallSampler()
        self.phases = PhaseTimer()
        self.count_retries()
        gc.callbacks.append(self._on_gc)
        self._time_database_jobs()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        if info.get("generation") == 2:
            self.gc_pause_ms.append(ms)
        else:
            self.young_gc_max_ms = max(self.young_gc_max_ms, ms)

    def _time_database_jobs(self) -> None:
        run = Database.run
        probe = self  # dump() swaps the lists: append to whichever is current

        async def timed_run(db: Database, fn: Any) -> Any:
            queued = time.perf_counter()

            def timed() -> Any:
                started = time.perf_counter()
                # How long the job waited for a database thread (the pool's queue).
                probe.db_wait_ms.append((started - queued) * 1000)
                try:
                    return fn()
                finally:
                    probe.db_job_ms.append((time.perf_counter() - started) * 1000)

            return await run(db, timed)

        Database.run = timed_run  # type: ignore[method-assign,assignment]

    async def watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK)
            self.loop_lag_ms.append((loop.time() - before - LAG_TICK) * 1000)

    async def on_heartbeat(self, session: Session, heartbeat: coordinator_pb2.Heartbeat) -> None:
        if heartbeat.sent_at_unix_nanos:
            self.latencies_ms.append((time.time_ns() - heartbeat.sent_at_unix_nanos) / 1e6)
        if session.last_read_mono_ns:
            self.processing_ms.append((time.monotonic_ns() - session.last_read_mono_ns) / 1e6)

    def count_retries(self) -> None:
        """Which transactions PostgreSQL made this replica run again (SERIALIZABLE
        conflicts), by the store function that ran them."""
        call_sync, counts = PostgresDatabase.call_sync, self.phases.counts

        def counted(db: PostgresDatabase, fn: Any, **kwargs: Any) -> Any:
            # Runs of this call's own function: db.retries counts every thread's, and
            # read it around a call it blamed the reads for the writers' retries.
            runs = [0]

            def once(conn: Any) -> Any:
                runs[0] += 1
                return fn(conn)

            try:
                return call_sync(db, once, **kwargs)
            finally:
                if runs[0] > 1:
                    name = getattr(fn, "__qualname__", "?").removesuffix(".<locals>.txn")
                    counts[f"retried: {name}"] += runs[0] - 1

        PostgresDatabase.call_sync = counted  # type: ignore[method-assign,assignment]

    def dump(self) -> None:
        samples = {
            "heartbeat_latency_ms": self.latencies_ms,
            "heartbeat_processing_ms": self.processing_ms,
            "loop_lag_ms": self.loop_lag_ms,
            "gc_pause_ms": self.gc_pause_ms,
            "db_job_ms": self.db_job_ms,
            "db_wait_ms": self.db_wait_ms,
            "stalls": self.stalls.top(),
            "young_gc_max_ms": self.young_gc_max_ms,
            "placement_phases_ms": self.phases.take(),
        }
        self.young_gc_max_ms = 0.0
        self.latencies_ms, self.processing_ms, self.loop_lag_ms = [], [], []
        self.gc_pause_ms, self.db_job_ms, self.db_wait_ms = [], [], []
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(samples))
        tmp.replace(self.path)


async def _main(config_path: Path, stats: Path) -> int:
    config = load_scheduler_config(config_path)
    setup_logging(config.log.level, config.log.format)
    server = SchedulerServer(config)
    probe = HeartbeatProbe(stats)
    server.coordinator.on_heartbeat(probe.on_heartbeat)
    stop = stop_on_signals()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, probe.dump)
    lag = asyncio.create_task(probe.watch_loop())
    ticks = asyncio.create_task(probe.stalls.tick())
    try:
        await server.run(stop)
    finally:
        lag.cancel()
        ticks.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args: Any = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m benchmarks.fleet_server CONFIG STATS_FILE", file=sys.stderr)
        return 2
    return asyncio.run(_main(Path(args[0]), Path(args[1])))


if __name__ == "__main__":
    sys.exit(main())
