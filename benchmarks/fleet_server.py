"""The fleet benchmark's scheduler process: ``gpu-scheduler serve`` plus a latency probe.

``python -m benchmarks.fleet_server CONFIG STATS_FILE`` runs the very same
``SchedulerServer`` that ``gpu-scheduler serve`` runs, with one addition: an
``on_heartbeat`` hook that records, per heartbeat, two latencies:

- from the agent stamping it (``sent_at_unix_nanos``; same host, same clock) to
  the scheduler having stored it: latency as the fleet feels it, including the
  simulator's own lag in sending, transport, and queueing in gRPC and the event loop;
- from the servicer reading it off the stream (``Session.last_read_mono_ns``) to
  stored: the scheduler's processing (dispatch, the batched SQLite write, hooks).

On SIGUSR1 the samples so far are written to STATS_FILE (atomically) and reset.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gpuagent.logsetup import setup_logging
from gpuagent.v1 import coordinator_pb2
from scheduler.config import load_scheduler_config
from scheduler.registry import Session
from scheduler.server import SchedulerServer


class HeartbeatProbe:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.latencies_ms: list[float] = []
        self.processing_ms: list[float] = []

    async def on_heartbeat(self, session: Session, heartbeat: coordinator_pb2.Heartbeat) -> None:
        if heartbeat.sent_at_unix_nanos:
            self.latencies_ms.append((time.time_ns() - heartbeat.sent_at_unix_nanos) / 1e6)
        if session.last_read_mono_ns:
            self.processing_ms.append((time.monotonic_ns() - session.last_read_mono_ns) / 1e6)

    def dump(self) -> None:
        samples = {"heartbeat_latency_ms": self.latencies_ms}
        samples["heartbeat_processing_ms"] = self.processing_ms
        self.latencies_ms, self.processing_ms = [], []
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(samples))
        tmp.replace(self.path)


async def _main(config_path: Path, stats: Path) -> int:
    config = load_scheduler_config(config_path)
    setup_logging(config.log.level, config.log.format)
    server = SchedulerServer(config)
    probe = HeartbeatProbe(stats)
    server.coordinator.on_heartbeat(probe.on_heartbeat)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, probe.dump)
    await server.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args: Any = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m benchmarks.fleet_server CONFIG STATS_FILE", file=sys.stderr)
        return 2
    return asyncio.run(_main(Path(args[0]), Path(args[1])))


if __name__ == "__main__":
    sys.exit(main())
