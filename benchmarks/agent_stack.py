"""A real ``gpu-scheduler serve`` and a real ``gpu-agent run`` (8 simulated GPUs), as processes.

Shared by the lease start and footprint benchmarks. Configured as ``make run``
does (agent.demo), with attestation and escrow off so leases go straight to the
node: neither is what these benchmarks measure. Leases are submitted over the
real Leases API (TLS, the scheduler's own CA) and run ``sleep`` in the local
busybox image (built by ``python -m tests.images build`` when missing).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import grpc
import httpx
import psutil
import yaml

from agent.config import IsolationConfig
from agent.leases.leftovers import remove_node_leftovers
from benchmarks import schedauth
from gpuagent.v1 import common_pb2, leases_pb2, leases_pb2_grpc, nodes_pb2, nodes_pb2_grpc

IMAGE = "gpu-agent-test/busybox:latest"
GPUS = 8
BIN = Path(sys.executable).parent
START_METRIC = "gpu_agent_lease_start_duration_seconds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    """Poll with a deadline: these are other processes' states, with no event to await."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s {what}")


def ensure_image() -> None:
    if shutil.which("docker") is None:
        raise RuntimeError("the agent benchmarks need the Docker Engine (docker not on PATH)")
    from tests.images import build_busybox

    build_busybox()


class Stack:
    def __init__(
        self,
        workdir: Path,
        *,
        standalone_relay: bool = False,
        agent_services: dict[str, object] | None = None,
    ) -> None:
        self.workdir = workdir
        self.standalone_relay = standalone_relay
        self.tunnel_port = free_port()
        self.grpc_port, self.status_port = free_port(), free_port()
        self.relay_port, self.relay_tcp_port = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        sched_dir = workdir / "scheduler"
        self.ca_file = sched_dir / "tls" / "ca.pem"
        self.sched_cfg = workdir / "scheduler.yaml"
        self.sched_cfg.write_text(
            yaml.safe_dump(
                {
                    "log": {"level": "warning", "format": "text"},
                    "server": {"listen": f"127.0.0.1:{self.grpc_port}"},
                    "database": {"path": str(sched_dir / "scheduler.db")},
                    "metrics": {"listen": None},
                    # The relay for service leases; plain HTTP is allowed on loopback only.
                    "relay": {
                        "listen": f"127.0.0.1:{self.relay_port}",
                        "tcp_listen": f"127.0.0.1:{self.relay_tcp_port}",
                        "insecure_http": True,
                        **(self._standalone(workdir) if standalone_relay else {}),
                    },
                    "attestation": {"enabled": False, "required": False},
                    "ledger": {"escrow": False},
                    "auth": schedauth.OPEN_REGISTRATION,
                }
            )
        )
        self.token = schedauth.bootstrap_admin(self.sched_cfg, workdir / "admin.token")
        agent_dir = workdir / "agent"
        agent_dir.mkdir(mode=0o700)
        tag = uuid.uuid4().hex[:5]
        self.isolation = IsolationConfig(
            firewall_chain=f"GAB{tag.upper()}", bridge_prefix=f"b{tag}-"
        )
        self.agent_cfg = workdir / "agent.yaml"
        self.agent_cfg.write_text(
            yaml.safe_dump(
                {
                    "log": {"level": "warning", "format": "text"},
                    "node": {"name": "bench-node", "state_dir": str(agent_dir)},
                    "coordinator": {
                        "address": f"127.0.0.1:{self.grpc_port}",
                        "ca_file": str(self.ca_file),
                    },
                    "gpu": {
                        "backend": "simulated",
                        "simulated": {"profile": "h100-sxm-80gb", "count": GPUS},
                    },
                    "status": {"listen": f"127.0.0.1:{self.status_port}"},
                    # Rules of its own, matched to its own bridges, removed at the end.
                    "isolation": self.isolation.model_dump(mode="json"),
                    # e.g. direct mode (tests/test_direct_e2e.py); default: relay.
                    **({"services": agent_services} if agent_services else {}),
                }
            )
        )
        self._channel: grpc.Channel | None = None  # set by start()
        self.node_id = ""

    def _standalone(self, workdir: Path) -> dict[str, object]:
        """`gpu-scheduler relay` on its own: the coordinator sends agents to its tunnel
        port; it reads routes from the coordinator with the admin token."""
        return {
            "mode": "external",
            "tunnel_address": f"127.0.0.1:{self.tunnel_port}",
            "tunnel_listen": f"127.0.0.1:{self.tunnel_port}",
            "coordinator": {
                "address": f"localhost:{self.grpc_port}",
                "ca_file": str(self.ca_file),
                "token_file": str(workdir / "admin.token"),
            },
        }

    def _start(self, name: str, argv: list[str]) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self) -> None:
        self._start("scheduler", [str(BIN / "gpu-scheduler"), "-c", str(self.sched_cfg), "serve"])
        wait_until("for the scheduler's CA", self.ca_file.exists, 30)
        if self.standalone_relay:
            self._start("relay", [str(BIN / "gpu-scheduler"), "-c", str(self.sched_cfg), "relay"])
        self._channel = grpc.secure_channel(
            f"localhost:{self.grpc_port}", schedauth.credentials(self.ca_file, self.token)
        )
        self._start("agent", [str(BIN / "gpu-agent"), "-c", str(self.agent_cfg), "run"])

        def online() -> bool:
            nodes = nodes_pb2_grpc.NodesStub(self.channel).List(
                nodes_pb2.ListNodesRequest(), timeout=5
            )
            for node in nodes.nodes:
                if node.connected and node.liveness == nodes_pb2.LIVENESS_ONLINE:
                    self.node_id = node.node_id
                    return True
            return False

        wait_until("for the agent to come online", online, 90)

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for name in ("agent", "relay", "scheduler"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def channel(self) -> grpc.Channel:
        assert self._channel is not None, "start() first"
        return self._channel

    @property
    def agent(self) -> psutil.Process:
        return psutil.Process(self.procs["agent"].pid)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.status_port}/metrics", timeout=5).text

    def lease_starts(self) -> tuple[int, float]:
        """(count, sum seconds) of the agent's LeaseAssign -> running histogram."""
        text = self.metrics()
        count = re.search(rf"^{START_METRIC}_count (\S+)$", text, re.M)
        total = re.search(rf"^{START_METRIC}_sum (\S+)$", text, re.M)
        return (int(float(count.group(1))) if count else 0, float(total.group(1)) if total else 0.0)

    def submit(self, lease_id: str, seconds: int = 600) -> None:
        stub = leases_pb2_grpc.LeasesStub(self.channel)
        stub.Submit(
            leases_pb2.SubmitLeaseRequest(
                spec=leases_pb2.LeaseSpec(
                    image=IMAGE,
                    command=["sleep", str(seconds)],
                    gpu_count=1,
                    cpus=0.1,
                    memory_bytes=32 * 1024**2,
                    max_duration_seconds=3600,
                ),
                idempotency_key=lease_id,
                buyer="bench",
            ),
            timeout=10,
        )

    def lease_state(self, lease_id: str) -> str:
        stub = leases_pb2_grpc.LeasesStub(self.channel)
        lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)
        return common_pb2.LeaseState.Name(lease.state)


@contextlib.contextmanager
def running_stack(
    *, standalone_relay: bool = False, agent_services: dict[str, object] | None = None
) -> Iterator[Stack]:
    ensure_image()
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        stack = Stack(Path(tmp), standalone_relay=standalone_relay, agent_services=agent_services)
        try:
            stack.start()
            yield stack
        except BaseException:
            for name in ("scheduler", "relay", "agent"):
                log = Path(tmp) / f"{name}.log"
                if log.exists():
                    tail = log.read_text(errors="replace")[-2000:]
                    print(f"--- {name}.log (tail) ---\n{tail}", file=sys.stderr)
            raise
        finally:
            stack.stop()
            _remove_bench_containers(stack)


def _remove_bench_containers(stack: Stack) -> None:
    """Leases the agent was stopped with stay (re-adoption); the benchmark removes them,
    with their networks, mounted scratch (else the temp dir cannot be deleted) and the
    agent's firewall rules."""
    client = docker.from_env()
    try:
        scratch = stack.workdir / "agent" / "scratch"
        remove_node_leftovers(client, stack.node_id, scratch, stack.isolation)
    finally:
        client.close()


# What the agent asks Docker for on the benchmark's lease (agent/leases/docker_runtime.py
# with the default runtime config and the spec in Stack.submit): same sandbox, same limits.
HARDENED_FLAGS = (
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges:true",
    "--pids-limit=4096",
    "--memory=32m",
    "--memory-swap=32m",
    "--cpus=0.1",
    "--restart=no",
    "--log-opt=max-size=10m",
    "--log-opt=max-file=3",
)


def docker_run_once(name: str, scratch: Path | None = None) -> float:
    """Seconds for ``docker run -d`` of the same image (returns once the container started).

    With ``scratch``, the container gets the agent's sandbox and limits and that
    directory bind-mounted at /scratch, as a lease does.
    """
    flags: list[str] = []
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        flags = [*HARDENED_FLAGS, f"--mount=type=bind,src={scratch},dst=/scratch"]
    started = time.perf_counter()
    subprocess.run(
        ["docker", "run", "-d", "--name", name, *flags, IMAGE, "sleep", "600"],
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - started


def docker_rm(names: list[str]) -> None:
    if names:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True, check=False)
