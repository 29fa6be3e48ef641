"""A process of simulated agents, driven by the fleet orchestrator over a pipe.

One Python process cannot drive 10,000 TLS streams at a 10 s heartbeat and keep
its stamps honest: its event loop saturates a core and heartbeats leave late,
which reads as scheduler latency. The orchestrator (``benchmarks.fleet``) splits
the fleet over several of these processes (``spawn``ed: grpc does not survive a
fork) and talks to each over a ``multiprocessing`` pipe.

Worker -> orchestrator, unsolicited: ``("welcomed", count)`` after each Welcome
(count since the last reset), ``("assigned", lease_id, node_id, monotonic_s)`` on
each LeaseAssign (CLOCK_MONOTONIC is one clock for every process on the host).
Orchestrator -> worker, each answered with ``(kind, request_id, ...)``:
``("usage", id, lease_ids)`` (agents holding those leases send a batch of signed
records each; answered once all are acked), ``("finish", id, lease_ids)``,
``("reset", id)`` (welcome count back to 0, before a scheduler restart) and
``("stop", id)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

from benchmarks.node_fixtures import host_info

from .fleet_agent import FleetStats, SimAgent

USAGE_RECORDS_PER_REPORT = 50
CONNECT_WAVE = 200  # agents started at once; the next wave waits for half of them


@dataclass(frozen=True)
class WorkerSpec:
    first: int  # index of this worker's first agent (names sim-NNNNN)
    count: int
    port: int
    ca_pem: bytes
    agents_per_channel: int


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """The process entry point (must be importable for ``spawn``)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_Worker(conn, spec).run())


class _Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.stop = asyncio.Event()
        self.stats = FleetStats(
            on_welcome=lambda n: self.emit("welcomed", n),
            on_assign=lambda lid, node, at: self.emit("assigned", lid, node, at),
        )
        self.commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def emit(self, *message: Any) -> None:
        with contextlib.suppress(OSError):  # the orchestrator is gone: nothing to tell
            self.conn.send(message)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.commands.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.commands.put_nowait(("stop", None))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._readable)
        spec = self.spec
        creds = grpc.ssl_channel_credentials(root_certificates=spec.ca_pem)
        n_channels = max(1, -(-spec.count // spec.agents_per_channel))
        options = [("grpc.keepalive_time_ms", 60_000), ("grpc.max_receive_message_length", 4 << 20)]
        channels = [
            # Distinct options keep grpc from folding the channels into one subchannel.
            grpc.aio.secure_channel(
                f"localhost:{spec.port}", creds, options=[*options, ("fleet.channel", i)]
            )
            for i in range(n_channels)
        ]
        host = await asyncio.to_thread(host_info)
        sims = [SimAgent(spec.first + i, self.stats, host) for i in range(spec.count)]
        tasks = [asyncio.create_task(self._connect(sims, channels))]
        try:
            await self._serve(sims, tasks)
        finally:
            self.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for channel in channels:
                await channel.close()
            loop.remove_reader(self.conn.fileno())

    async def _connect(self, sims: list[SimAgent], channels: list[grpc.aio.Channel]) -> None:
        """Start the agents in waves, so the connect storm is the scheduler's, not ours."""
        runs: list[asyncio.Task[None]] = []
        try:
            stats = self.stats
            for i in range(0, len(sims), CONNECT_WAVE):
                wave = sims[i : i + CONNECT_WAVE]
                for j, sim in enumerate(wave, start=i):
                    channel = channels[j % len(channels)]
                    runs.append(asyncio.create_task(sim.run(channel, self.stop)))
                stats.target = i + len(wave) - CONNECT_WAVE // 2
                stats.all_welcomed.clear()
                if stats.welcomed < stats.target:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stats.all_welcomed.wait(), 120)
            stats.target = 0
            await self.stop.wait()
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    async def _serve(self, sims: list[SimAgent], tasks: list[asyncio.Task[None]]) -> None:
        while True:
            kind, request_id, *args = await self.commands.get()
            if kind == "stop":
                self.emit("stopped", request_id)
                return
            if kind == "reset":
                self.stats.welcomed = 0
                self.emit("reset", request_id)
            elif kind == "usage":
                records = await self._usage(sims, set(args[0]))
                self.emit("usage", request_id, records)
            elif kind == "finish":
                wanted = set(args[0])
                for sim in sims:
                    for lease_id in [lid for lid in sim.leases if lid in wanted]:
                        await sim.finish(lease_id)
                self.emit("finish", request_id)

    async def _usage(self, sims: list[SimAgent], lease_ids: set[str]) -> int:
        """Every agent holding one of ``lease_ids`` reports a batch; waits for the acks."""
        reports = [
            (sim, sim.usage_report(lid, USAGE_RECORDS_PER_REPORT, True))
            for sim in sims
            for lid in list(sim.leases)
            if lid in lease_ids
        ]
        sent = len(reports) * USAGE_RECORDS_PER_REPORT
        stats = self.stats
        stats.usage_expected = stats.usage_acked + sent
        stats.usage_done.clear()
        if not reports:
            return 0
        await asyncio.gather(*(sim.send(usage_report=report) for sim, report in reports))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stats.usage_done.wait(), 120)
        return sent - max(0, stats.usage_expected - stats.usage_acked)
