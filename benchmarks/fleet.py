"""Fleet simulator: thousands of simulated agents against one scheduler process.

Each simulated agent speaks the real protocol over real gRPC with TLS (the
scheduler's self-generated CA): its own Ed25519 key, the signed Hello over the
coordinator's nonce, heartbeats at the coordinator's interval (random phase),
LeaseAssign answered with LeaseUpdates (running, then succeeded) and signed
usage records. Many agents share a few grpc.aio channels (one HTTP/2 stream
each), which is cheap on the simulator's side and identical on the scheduler's.

The scheduler runs as its own process (``benchmarks.fleet_server``: the same
``SchedulerServer`` as ``gpu-scheduler serve`` plus a heartbeat latency probe),
with attestation off (simulated agents hold no GPUs to prove) and escrow off
(no buyer deposits needed); everything else is the default configuration.

Per fleet size it reports: connect time, scheduler RSS per agent, heartbeats
ingested per second and heartbeat latency p50/p99 (agent stamp -> stored),
placement latency p50/p99 (Submit sent -> LeaseAssign received at the agent),
usage records ingested per second, and the time for the whole fleet to
reconnect after a scheduler restart (real agent backoff: 1 s, x1.6, +-20 %).

Run alone: ``python -m benchmarks.fleet --agents 1000 [--profile out.txt]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.link.backoff import Backoff
from agent.link.reporter import host_info, simulated_gpus
from gpuagent import PROTOCOL_VERSION, __version__
from gpuagent.signing import hello_signing_bytes, node_id_from_public_key
from gpuagent.usage import SignedUsageRecord, UsageRecord, sign_record
from gpuagent.usage_wire import record_to_pb
from gpuagent.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    inventory_pb2,
    leases_pb2,
    leases_pb2_grpc,
    usage_pb2,
)

from .registry import Figure, register

HEARTBEAT_TARGET_MS = 50.0
PLACEMENT_TARGET_MS = 50.0
AGENTS_PER_CHANNEL = 500
GPUS_PER_AGENT = 2
USAGE_RECORDS_PER_REPORT = 50

State = common_pb2.LeaseState


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the scheduler process ---------------------------------------------------------


class SchedulerProcess:
    """``benchmarks.fleet_server`` on a fixed port and database, restartable."""

    def __init__(self, workdir: Path, heartbeat_interval: float) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.stats = workdir / "stats.json"
        self.config = workdir / "scheduler.yaml"
        self.log = workdir / "scheduler.log"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "log": {"level": "warning", "format": "text"},
                    "server": {"listen": f"127.0.0.1:{self.port}"},
                    "database": {"path": str(workdir / "db" / "scheduler.db")},
                    "liveness": {"heartbeat_interval": heartbeat_interval},
                    "metrics": {"listen": None},
                    "attestation": {"enabled": False, "required": False},
                    "ledger": {"escrow": False},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.workdir / "db" / "tls" / "ca.pem"

    def start(self) -> float:
        """Start and wait until the port accepts; returns the monotonic time it did."""
        with self.log.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.fleet_server",
                    str(self.config),
                    str(self.stats),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited ({self.proc.returncode}); see {self.log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError("scheduler did not open its port within 60 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    async def heartbeat_latencies(self) -> list[float]:
        """Ask the probe for its samples since the last call (and reset them)."""
        assert self.proc is not None
        with contextlib.suppress(FileNotFoundError):
            self.stats.unlink()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not self.stats.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the scheduler's probe did not answer SIGUSR1 within 30 s")
            await asyncio.sleep(0.05)
        data: dict[str, list[float]] = json.loads(self.stats.read_text())
        return data["heartbeat_latency_ms"]


# --- simulated agents --------------------------------------------------------------


@dataclass
class FleetStats:
    welcomed: int = 0
    target: int = 0
    all_welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    assigned_at: dict[str, float] = field(default_factory=dict)
    assign_waiters: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    usage_acked: int = 0
    usage_expected: int = 0
    usage_done: asyncio.Event = field(default_factory=asyncio.Event)
    errors: int = 0

    def welcome(self) -> None:
        self.welcomed += 1
        if self.target and self.welcomed >= self.target:
            self.all_welcomed.set()


class SimAgent:
    def __init__(self, index: int, stats: FleetStats, host: inventory_pb2.HostInfo) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = node_id_from_public_key(self.public_key)
        self.name = f"sim-{index:05d}"
        self.stats = stats
        gpus = simulated_gpus("rtx-4090", GPUS_PER_AGENT, self.node_id)
        self.inventory = inventory_pb2.Inventory(host=host, gpus=gpus)
        self.health = [
            inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
            for g in gpus
        ]
        self.gpu_uuids = [g.uuid for g in gpus]
        self.leases: dict[str, list[str]] = {}  # lease id -> GPUs it holds
        self.usage_seq = 0
        self.acked_usage_seq = 0
        self.call: Any = None
        self.lock = asyncio.Lock()
        self.interval = 10.0
        self.hb_seq = 0
        self.welcomed = False

    async def send(self, **body: Any) -> None:
        async with self.lock:
            await self.call.write(coordinator_pb2.AgentMessage(**body))

    def _heartbeat(self) -> coordinator_pb2.Heartbeat:
        held = {u for gpus in self.leases.values() for u in gpus}
        self.hb_seq += 1
        return coordinator_pb2.Heartbeat(
            seq=self.hb_seq,
            sent_at_unix_nanos=time.time_ns(),
            gpu_health=self.health,
            free_gpu_uuids=[u for u in self.gpu_uuids if u not in held],
            allocated_gpu_uuids=sorted(held),
            leases=[
                common_pb2.LeaseStatus(lease_id=lid, state=State.LEASE_STATE_RUNNING)
                for lid in self.leases
            ],
        )

    async def run(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, 120.0)
        while not stop.is_set():
            self.welcomed = False
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError):
                await self._session(channel, stop)
            if self.welcomed:  # a welcomed session was a healthy one: start at 1 s again
                backoff.reset()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next_delay())

    async def _session(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        self.call = stub.Connect()
        self.hb_seq = 0
        heartbeats: asyncio.Task[None] | None = None
        try:
            first = await self.call.read()
            if first is grpc.aio.EOF or first.WhichOneof("body") != "hello_challenge":
                return
            nonce = first.hello_challenge.nonce
            signed = hello_signing_bytes(nonce, self.node_id, self.public_key, PROTOCOL_VERSION)
            await self.send(
                hello=coordinator_pb2.Hello(
                    node_id=self.node_id,
                    public_key=self.public_key,
                    signature=self.key.sign(signed),
                    protocol_version=PROTOCOL_VERSION,
                    agent_version=__version__,
                    node_name=self.name,
                    inventory=self.inventory,
                    gpu_health=self.health,
                    last_acked_usage_seq=self.acked_usage_seq,
                )
            )
            while not stop.is_set():
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    interval_ms = message.welcome.params.heartbeat_interval_ms
                    self.interval = interval_ms / 1000 if interval_ms else 10.0
                    heartbeats = asyncio.create_task(self._heartbeats())
                    self.welcomed = True
                    self.stats.welcome()
                elif kind == "lease_assign":
                    await self._on_assign(message.lease_assign)
                elif kind == "usage_ack":
                    self._on_usage_ack(message.usage_ack.acked_through_seq)
                elif kind == "error":
                    self.stats.errors += 1
                    if message.error.fatal:
                        return
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            self.call.cancel()

    async def _heartbeats(self) -> None:
        # Random phase: a real fleet's heartbeats are spread over the interval.
        await asyncio.sleep(random.uniform(0, self.interval))  # noqa: S311 - not crypto
        while True:
            await self.send(heartbeat=self._heartbeat())
            await asyncio.sleep(self.interval)

    async def _on_assign(self, assign: leases_pb2.LeaseAssign) -> None:
        now = time.monotonic()
        self.stats.assigned_at[assign.lease_id] = now
        waiter = self.stats.assign_waiters.pop(assign.lease_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.node_id)
        self.leases[assign.lease_id] = list(assign.gpu_uuids)
        await self.send(
            lease_update=leases_pb2.LeaseUpdate(
                lease_id=assign.lease_id,
                update_seq=1,
                state=State.LEASE_STATE_RUNNING,
                gpu_uuids=assign.gpu_uuids,
                at_unix_nanos=time.time_ns(),
            )
        )

    def _on_usage_ack(self, acked: int) -> None:
        gained = max(0, acked - self.acked_usage_seq)
        self.acked_usage_seq = max(self.acked_usage_seq, acked)
        self.stats.usage_acked += gained
        if self.stats.usage_expected and self.stats.usage_acked >= self.stats.usage_expected:
            self.stats.usage_done.set()

    def usage_report(self, lease_id: str, count: int, final: bool) -> usage_pb2.UsageReport:
        """``count`` consecutive 1 s intervals ending now, signed; the last may be final."""
        gpus = len(self.leases.get(lease_id, [])) or 1
        end = time.time_ns()
        start = end - count * 1_000_000_000
        records = []
        for i in range(count):
            self.usage_seq += 1
            record = UsageRecord(
                node_id=self.node_id,
                seq=self.usage_seq,
                lease_id=lease_id,
                start_unix_ns=start + i * 1_000_000_000,
                end_unix_ns=start + (i + 1) * 1_000_000_000,
                duration_ns=1_000_000_000,
                gpu_count=gpus,
                gpu_ns=gpus * 1_000_000_000,
                final=final and i == count - 1,
            )
            signature = sign_record(record, self.key.sign)
            records.append(record_to_pb(SignedUsageRecord(record, signature)))
        return usage_pb2.UsageReport(records=records)

    async def finish(self, lease_id: str) -> None:
        gpus = self.leases.pop(lease_id, [])
        await self.send(
            lease_update=leases_pb2.LeaseUpdate(
                lease_id=lease_id,
                update_seq=2,
                state=State.LEASE_STATE_SUCCEEDED,
                exit_code=0,
                gpu_uuids=gpus,
                at_unix_nanos=time.time_ns(),
            )
        )


# --- one fleet run -----------------------------------------------------------------


@dataclass
class FleetResult:
    agents: int
    connected: int
    connect_s: float
    rss_mb: float
    rss_per_agent_kb: float
    cpu_percent: float
    heartbeats_per_s: float
    heartbeat_p50_ms: float
    heartbeat_p99_ms: float
    placement_p50_ms: float
    placement_p99_ms: float
    placements: int
    usage_records_per_s: float
    reconnect_s: float
    errors: int


async def _gather_connected(stats: FleetStats, target: int, within: float) -> bool:
    stats.target = target
    stats.all_welcomed.clear()
    if stats.welcomed >= target:
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stats.all_welcomed.wait(), within)
    return stats.welcomed >= target


async def run_fleet(
    agents: int,
    *,
    heartbeat_interval: float,
    steady_window: float,
    leases: int,
    workdir: Path,
    profile: Path | None = None,
) -> FleetResult:
    sched = SchedulerProcess(workdir, heartbeat_interval)
    sched.start()
    stop = asyncio.Event()
    stats = FleetStats()
    tasks: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    try:
        ps = sched.ps
        rss_before = ps.memory_info().rss
        creds = grpc.ssl_channel_credentials(root_certificates=sched.ca_file.read_bytes())
        n_channels = max(1, min(32, -(-agents // AGENTS_PER_CHANNEL)))
        options = [("grpc.keepalive_time_ms", 60_000), ("grpc.max_receive_message_length", 4 << 20)]
        channels = [
            # Distinct options keep grpc from folding the channels into one subchannel.
            grpc.aio.secure_channel(
                f"localhost:{sched.port}", creds, options=[*options, ("fleet.channel", i)]
            )
            for i in range(n_channels)
        ]
        host = await asyncio.to_thread(host_info)
        sims = [SimAgent(i, stats, host) for i in range(agents)]
        by_node = {s.node_id: s for s in sims}
        started = time.monotonic()
        stats.target = agents
        # Connect in waves so the storm is the scheduler's, not our event loop's.
        wave = 200
        for i in range(0, agents, wave):
            for j, sim in enumerate(sims[i : i + wave], start=i):
                tasks.append(asyncio.create_task(sim.run(channels[j % n_channels], stop)))
            await asyncio.sleep(0)
            while stats.welcomed < min(agents, i + wave) - wave // 2:
                await asyncio.sleep(0.01)
                if time.monotonic() - started > 600:
                    break
        await _gather_connected(stats, agents, 300)
        connect_s = time.monotonic() - started
        connected = stats.welcomed

        # Steady state: heartbeats only.
        await asyncio.sleep(min(heartbeat_interval, 5.0))  # every agent's phase has begun
        await sched.heartbeat_latencies()  # reset the probe
        cpu0 = ps.cpu_times()
        t0 = time.monotonic()
        profiler = None
        if profile is not None:
            profiler = subprocess.Popen(  # noqa: ASYNC220 - starts at once, never waited on here
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(ps.pid),
                    "--duration",
                    str(int(steady_window)),
                    "--rate",
                    "50",
                    "--format",
                    "raw",
                    "--output",
                    str(profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        await asyncio.sleep(steady_window)
        latencies = await sched.heartbeat_latencies()
        elapsed = time.monotonic() - t0
        cpu1 = ps.cpu_times()
        cpu_percent = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed
        rss = ps.memory_info().rss
        if profiler is not None:
            await asyncio.to_thread(profiler.wait, 60)

        # Placement: leases submitted one after another under the heartbeat load.
        lease_creds = grpc.ssl_channel_credentials(root_certificates=sched.ca_file.read_bytes())
        placement_ms: list[float] = []
        placed: list[tuple[str, str]] = []
        async with grpc.aio.secure_channel(f"localhost:{sched.port}", lease_creds) as buyer:
            stub = leases_pb2_grpc.LeasesStub(buyer)
            loop = asyncio.get_running_loop()
            for n in range(leases):
                lease_id = f"fleet-{n:05d}"
                waiter: asyncio.Future[str] = loop.create_future()
                stats.assign_waiters[lease_id] = waiter
                sent = time.monotonic()
                await stub.Submit(
                    leases_pb2.SubmitLeaseRequest(
                        spec=leases_pb2.LeaseSpec(
                            image="gpu-agent-test/busybox:latest",
                            command=["sleep", "60"],
                            gpu_count=1,
                            max_duration_seconds=3600,
                        ),
                        idempotency_key=lease_id,
                        buyer="fleet-bench",
                    ),
                    timeout=30,
                )
                with contextlib.suppress(TimeoutError):
                    node_id = await asyncio.wait_for(waiter, 30)
                    placement_ms.append((stats.assigned_at[lease_id] - sent) * 1000)
                    placed.append((lease_id, node_id))

        # Usage: every agent holding a lease reports a batch of signed records at once.
        stats.usage_expected = stats.usage_acked + len(placed) * USAGE_RECORDS_PER_REPORT
        stats.usage_done.clear()
        reports = [
            (by_node[node], by_node[node].usage_report(lid, USAGE_RECORDS_PER_REPORT, True))
            for lid, node in placed
        ]
        u0 = time.monotonic()
        await asyncio.gather(*(sim.send(usage_report=r) for sim, r in reports))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stats.usage_done.wait(), 120)
        usage_elapsed = time.monotonic() - u0
        usage_rate = (len(placed) * USAGE_RECORDS_PER_REPORT) / usage_elapsed if placed else 0.0
        for lid, node in placed:
            await by_node[node].finish(lid)

        # Restart: the fleet notices, backs off, and comes back.
        sched.stop()
        stats.welcomed = 0
        stats.all_welcomed.clear()
        ready = await asyncio.to_thread(sched.start)
        await _gather_connected(stats, agents, 300)
        reconnect_s = time.monotonic() - ready
        return FleetResult(
            agents=agents,
            connected=connected,
            connect_s=connect_s,
            rss_mb=rss / 1e6,
            rss_per_agent_kb=(rss - rss_before) / max(connected, 1) / 1024,
            cpu_percent=cpu_percent,
            heartbeats_per_s=len(latencies) / elapsed,
            heartbeat_p50_ms=statistics.median(latencies) if latencies else float("nan"),
            heartbeat_p99_ms=percentile(latencies, 0.99),
            placement_p50_ms=statistics.median(placement_ms) if placement_ms else float("nan"),
            placement_p99_ms=percentile(placement_ms, 0.99),
            placements=len(placement_ms),
            usage_records_per_s=usage_rate,
            reconnect_s=reconnect_s,
            errors=stats.errors,
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        sched.stop()


def profile_summary(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples per function anywhere on the stack (py-spy raw/collapsed format)."""
    totals: dict[str, int] = {}
    samples = 0
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")"
            if name not in seen:
                seen.add(name)
                totals[name] = totals.get(name, 0) + count
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(name, 100 * n / max(samples, 1)) for name, n in ranked[:top]]


# --- the benchmark -----------------------------------------------------------------


def _figures(r: FleetResult) -> list[Figure]:
    n = f"{r.agents} agents"
    hb_ok = r.heartbeat_p99_ms < HEARTBEAT_TARGET_MS and r.connected == r.agents
    pl_ok = r.placement_p99_ms < PLACEMENT_TARGET_MS
    return [
        Figure(f"{n}: connected", r.connected, "agents", f"= {r.agents}", r.connected == r.agents),
        Figure(f"{n}: time to connect all", r.connect_s, "s"),
        Figure(f"{n}: scheduler RSS", r.rss_mb, "MB"),
        Figure(f"{n}: scheduler RSS per agent", r.rss_per_agent_kb, "KiB"),
        Figure(
            f"{n}: scheduler CPU (steady)",
            r.cpu_percent,
            "% core",
            "< 100 (1 core)",
            r.cpu_percent < 100,
        ),
        Figure(f"{n}: heartbeats ingested", r.heartbeats_per_s, "/s"),
        Figure(f"{n}: heartbeat latency p50", r.heartbeat_p50_ms, "ms"),
        Figure(f"{n}: heartbeat latency p99", r.heartbeat_p99_ms, "ms", "< 50 ms", hb_ok),
        Figure(f"{n}: placement latency p50", r.placement_p50_ms, "ms"),
        Figure(f"{n}: placement latency p99", r.placement_p99_ms, "ms", "< 50 ms", pl_ok),
        Figure(f"{n}: usage records ingested", r.usage_records_per_s, "/s"),
        Figure(f"{n}: fleet reconnect after restart", r.reconnect_s, "s"),
    ]


def sizes(smoke: bool) -> list[tuple[int, float, float, int]]:
    """(agents, heartbeat interval s, steady window s, leases) per run."""
    if smoke:
        return [(100, 2.0, 4.0, 10)]
    env = os.environ.get("FLEET_SIZES")
    agents = [int(a) for a in env.split(",")] if env else [100, 1000, 10_000]
    return [(a, 10.0, 30.0, 50) for a in agents]


async def _run_all(smoke: bool, profile_dir: Path | None) -> list[Figure]:
    figures: list[Figure] = []
    for agents, interval, window, leases in sizes(smoke):
        with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
            profile = profile_dir / f"fleet-{agents}.txt" if profile_dir else None
            result = await run_fleet(
                agents,
                heartbeat_interval=interval,
                steady_window=window,
                leases=leases,
                workdir=Path(tmp),
                profile=profile,
            )
        figures.extend(_figures(result))
    return figures


@register("fleet")
def bench(smoke: bool) -> list[Figure]:
    profile_dir = None if smoke else Path(os.environ.get("FLEET_PROFILE_DIR", "."))
    if profile_dir is not None and not (Path(sys.executable).parent / "py-spy").exists():
        profile_dir = None
    return asyncio.run(_run_all(smoke, profile_dir))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--leases", type=int, default=50)
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the steady window")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        result = asyncio.run(
            run_fleet(
                args.agents,
                heartbeat_interval=args.interval,
                steady_window=args.window,
                leases=args.leases,
                workdir=Path(tmp),
                profile=args.profile,
            )
        )
    for f in _figures(result):
        print(f"{f.name:<48} {f.value:>10.4g} {f.unit:<6} {f.target}")
    if args.profile:
        for name, share in profile_summary(args.profile):
            print(f"{share:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
