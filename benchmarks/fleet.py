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
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml

from gpuagent.v1 import leases_pb2, leases_pb2_grpc

from . import schedauth
from .fleet_worker import WorkerSpec, worker_main
from .registry import Figure, register

HEARTBEAT_TARGET_MS = 50.0
PLACEMENT_TARGET_MS = 50.0
AGENTS_PER_CHANNEL = 500


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

    def __init__(
        self,
        workdir: Path,
        heartbeat_interval: float,
        *,
        database: dict[str, Any] | None = None,
        replica: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> None:
        """``database``/``replica``: config sections for a replica on PostgreSQL
        (benchmarks/fleet_replicas.py); ``token``: an admin token bootstrapped already
        (one bootstrap per database)."""
        self.workdir = workdir
        self.port = _free_port()
        self.stats = workdir / "stats.json"
        self.config = workdir / "scheduler.yaml"
        self.log = workdir / "scheduler.log"
        config: dict[str, Any] = {
            "log": {"level": "warning", "format": "text"},
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "database": {"path": str(workdir / "db" / "scheduler.db"), **(database or {})},
            "liveness": {"heartbeat_interval": heartbeat_interval},
            "metrics": {"listen": None},
            "relay": {"mode": "off"},
            "attestation": {"enabled": False, "required": False},
            "ledger": {"escrow": False},
            "auth": schedauth.OPEN_REGISTRATION,
        }
        if replica:
            config["replica"] = replica
        self.config.write_text(yaml.safe_dump(config))
        self.token = token or schedauth.bootstrap_admin(self.config, workdir / "admin.token")
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

    async def heartbeat_latencies(self) -> dict[str, Any]:
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
        data: dict[str, Any] = json.loads(self.stats.read_text())
        return data


# --- the simulator's worker processes ----------------------------------------------


class Workers:
    """The simulated fleet, split over ``spawn``ed worker processes (``fleet_worker``)."""

    def __init__(
        self, agents: int, processes: int, port: int | Sequence[int], ca_pem: bytes
    ) -> None:
        """``port``: one scheduler, or several replicas (each agent starts on the one
        its index picks and moves to the next after each lost session)."""
        ports = (port,) if isinstance(port, int) else tuple(port)
        self.agents = agents
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.welcomed: list[int] = []
        self.target = 0
        self.all_welcomed = asyncio.Event()
        self.assign_waiters: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self.replies: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self.dead = 0
        self._next_id = 0
        self._child_ends: list[Connection] = []  # closed here once the workers hold them
        per = -(-agents // processes)
        first = 0
        while first < agents:
            count = min(per, agents - first)
            parent, child = ctx.Pipe()
            spec = WorkerSpec(first, count, ports[0], ca_pem, AGENTS_PER_CHANNEL, ports)
            proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            self.procs.append(proc)
            self.conns.append(parent)
            self.welcomed.append(0)
            self._child_ends.append(child)
            first += count

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for i, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True)):
            proc.start()
            loop.add_reader(conn.fileno(), self._readable, i)
        for child in self._child_ends:
            child.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _readable(self, i: int) -> None:
        conn = self.conns[i]
        try:
            while conn.poll():
                self._on_message(i, conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self.dead += 1
            for reply in self.replies.values():  # nobody will answer them now
                if not reply.done():
                    reply.set_exception(RuntimeError(f"fleet worker {i} died"))

    def _on_message(self, i: int, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "welcomed":
            self.welcomed[i] = message[1]
            if self.target and sum(self.welcomed) >= self.target:
                self.all_welcomed.set()
        elif kind == "assigned":
            _, lease_id, node_id, at = message
            waiter = self.assign_waiters.pop(lease_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((node_id, at))
        else:
            reply = self.replies.pop(message[1], None)
            if reply is not None and not reply.done():
                reply.set_result(message)

    async def ask(self, kind: str, *args: Any) -> list[tuple[Any, ...]]:
        """Send one command to every worker; their answers, in worker order."""
        loop = asyncio.get_running_loop()
        waits = []
        for conn in self.conns:
            self._next_id += 1
            future: asyncio.Future[tuple[Any, ...]] = loop.create_future()
            self.replies[self._next_id] = future
            conn.send((kind, self._next_id, *args))
            waits.append(future)
        return list(await asyncio.gather(*waits))

    async def wait_welcomed(self, within: float) -> int:
        self.target = self.agents
        if sum(self.welcomed) < self.target:
            self.all_welcomed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_welcomed.wait(), within)
        return sum(self.welcomed)

    async def reset(self) -> None:
        await self.ask("reset")
        self.welcomed = [0] * len(self.welcomed)
        self.all_welcomed.clear()

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ask("stop"), 30)
        loop = asyncio.get_running_loop()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                loop.remove_reader(conn.fileno())
            conn.close()
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 10)


# --- one fleet run -----------------------------------------------------------------


@dataclass
class FleetResult:
    agents: int
    processes: int  # simulator processes
    connected: int
    connect_s: float
    rss_mb: float
    rss_per_agent_kb: float
    cpu_percent: float
    simulator_cpu_percent: float
    heartbeats_per_s: float
    heartbeat_p50_ms: float  # agent's stamp -> stored (includes the simulator's own lag)
    heartbeat_p99_ms: float
    processing_p50_ms: float  # read off the stream by the scheduler -> stored
    processing_p99_ms: float
    loop_lag_p99_ms: float  # why, when the above are slow: the scheduler's event loop,
    gc_pause_max_ms: float  # its oldest-generation garbage collections,
    young_gc_max_ms: float  # and its young ones,
    db_job_max_ms: float  # and its SQLite thread
    stalls: list[tuple[str, int]]  # the event loop's stack when it stalled > 50 ms
    # Where placement time went: step -> (p50 ms, max ms) over the leases placed.
    placement_phases: dict[str, tuple[float, float]]
    placement_p50_ms: float
    placement_p99_ms: float
    placements: int
    usage_records_per_s: float
    reconnect_s: float
    errors: int


async def run_fleet(
    agents: int,
    *,
    heartbeat_interval: float,
    steady_window: float,
    leases: int,
    workdir: Path,
    profile: Path | None = None,
    processes: int | None = None,
) -> FleetResult:
    sched = SchedulerProcess(workdir, heartbeat_interval)
    sched.start()
    processes = processes or default_processes(agents)
    fleet = Workers(agents, processes, sched.port, sched.ca_file.read_bytes())
    try:
        ps = sched.ps
        rss_before = ps.memory_info().rss
        started = time.monotonic()
        fleet.start()
        connected = await fleet.wait_welcomed(600)
        connect_s = time.monotonic() - started

        # Steady state: heartbeats only.
        await asyncio.sleep(min(heartbeat_interval, 5.0))  # every agent's phase has begun
        await sched.heartbeat_latencies()  # reset the probe
        cpu0 = ps.cpu_times()
        sim_cpu0 = fleet.cpu_seconds()
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
        probe = await sched.heartbeat_latencies()
        elapsed = time.monotonic() - t0
        cpu1 = ps.cpu_times()
        cpu_percent = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed
        sim_cpu_percent = 100 * (fleet.cpu_seconds() - sim_cpu0) / elapsed
        rss = ps.memory_info().rss
        if profiler is not None:
            await asyncio.to_thread(profiler.wait, 60)

        # Placement: leases submitted one after another under the heartbeat load.
        lease_creds = schedauth.credentials(sched.ca_file, sched.token)
        placement_ms: list[float] = []
        placed: list[str] = []
        async with grpc.aio.secure_channel(f"localhost:{sched.port}", lease_creds) as buyer:
            stub = leases_pb2_grpc.LeasesStub(buyer)
            loop = asyncio.get_running_loop()
            for n in range(leases):
                lease_id = f"fleet-{n:05d}"
                waiter: asyncio.Future[tuple[str, float]] = loop.create_future()
                fleet.assign_waiters[lease_id] = waiter
                sent = time.monotonic()
                await stub.Submit(
                    leases_pb2.SubmitLeaseRequest(
                        spec=leases_pb2.LeaseSpec(
                            image="gpu-agent-test/busybox:latest",
                            command=["sleep", "60"],
                            gpu_count=1,
                            max_duration_seconds=3600,
                            price_micro_per_gpu_hour=1_800_000,
                            # The market constraints in play (issue #17): placement
                            # checks each against every node of the fleet.
                            constraints=leases_pb2.Constraints(
                                region="eu-west",
                                countries=["DE", "FR"],
                                min_uptime_ratio=0.5,
                                node_selector={"tier": "gold"},
                                min_bandwidth_bits_per_second=2 * 10**9,
                            ),
                        ),
                        idempotency_key=lease_id,
                        buyer="fleet-bench",
                    ),
                    timeout=30,
                )
                with contextlib.suppress(TimeoutError):
                    _node, assigned_at = await asyncio.wait_for(waiter, 30)
                    placement_ms.append((assigned_at - sent) * 1000)
                    placed.append(lease_id)

        phases = (await sched.heartbeat_latencies())["placement_phases_ms"]

        # Usage: every agent holding a lease reports a batch of signed records at once.
        u0 = time.monotonic()
        acked = sum(reply[2] for reply in await fleet.ask("usage", placed))
        usage_elapsed = time.monotonic() - u0
        usage_rate = acked / usage_elapsed if acked else 0.0
        await fleet.ask("finish", placed)

        # Restart: the fleet notices, backs off, and comes back.
        await fleet.reset()
        sched.stop()
        ready = await asyncio.to_thread(sched.start)
        await fleet.wait_welcomed(600)
        reconnect_s = time.monotonic() - ready
        stamped, processing = probe["heartbeat_latency_ms"], probe["heartbeat_processing_ms"]
        return FleetResult(
            agents=agents,
            processes=len(fleet.procs),
            connected=connected,
            connect_s=connect_s,
            rss_mb=rss / 1e6,
            rss_per_agent_kb=(rss - rss_before) / max(connected, 1) / 1024,
            cpu_percent=cpu_percent,
            simulator_cpu_percent=sim_cpu_percent,
            heartbeats_per_s=len(stamped) / elapsed,
            heartbeat_p50_ms=_median(stamped),
            heartbeat_p99_ms=percentile(stamped, 0.99),
            processing_p50_ms=_median(processing),
            processing_p99_ms=percentile(processing, 0.99),
            loop_lag_p99_ms=percentile(probe["loop_lag_ms"], 0.99),
            gc_pause_max_ms=max(probe["gc_pause_ms"], default=0.0),
            young_gc_max_ms=float(probe["young_gc_max_ms"]),
            db_job_max_ms=max(probe["db_job_ms"], default=0.0),
            stalls=[(str(stack), int(n)) for stack, n in probe["stalls"]],
            placement_phases={
                name: (_median(values), max(values, default=float("nan")))
                for name, values in phases.items()
            },
            placement_p50_ms=_median(placement_ms),
            placement_p99_ms=percentile(placement_ms, 0.99),
            placements=len(placement_ms),
            usage_records_per_s=usage_rate,
            reconnect_s=reconnect_s,
            errors=fleet.dead,
        )
    finally:
        await fleet.close()
        sched.stop()


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def default_processes(agents: int) -> int:
    """Simulator processes: one per 2,500 agents, at most one per core."""
    return max(1, min(os.cpu_count() or 1, -(-agents // 2500)))


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
        Figure(f"{n}: simulator processes", r.processes, ""),
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
        Figure(f"{n}: simulator CPU (steady)", r.simulator_cpu_percent, "% core"),
        Figure(f"{n}: heartbeats ingested", r.heartbeats_per_s, "/s"),
        Figure(f"{n}: heartbeat latency p50", r.heartbeat_p50_ms, "ms"),
        Figure(f"{n}: heartbeat latency p99", r.heartbeat_p99_ms, "ms", "< 50 ms", hb_ok),
        Figure(f"{n}: heartbeat processing p50", r.processing_p50_ms, "ms"),
        Figure(f"{n}: heartbeat processing p99", r.processing_p99_ms, "ms"),
        Figure(f"{n}: scheduler event-loop lag p99", r.loop_lag_p99_ms, "ms"),
        Figure(f"{n}: scheduler longest full GC", r.gc_pause_max_ms, "ms"),
        Figure(f"{n}: scheduler longest young GC", r.young_gc_max_ms, "ms"),
        Figure(f"{n}: scheduler slowest SQLite job", r.db_job_max_ms, "ms"),
        Figure(f"{n}: placement latency p50", r.placement_p50_ms, "ms"),
        Figure(f"{n}: placement latency p99", r.placement_p99_ms, "ms", "< 50 ms", pl_ok),
        *(
            figure
            for step, (p50, worst) in sorted(r.placement_phases.items())
            for figure in (
                Figure(f"{n}: placement step {step} p50", p50, "ms"),
                Figure(f"{n}: placement step {step} max", worst, "ms"),
            )
        ),
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
    parser.add_argument("--processes", type=int, help="simulator processes (default: by size)")
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
                processes=args.processes,
            )
        )
    for f in _figures(result):
        print(f"{f.name:<48} {f.value:>10.4g} {f.unit:<6} {f.target}")
    for stack, n in result.stalls:
        print(f"stall x{n}: {stack}")
    if args.profile:
        for name, share in profile_summary(args.profile):
            print(f"{share:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
