"""Real processes for the fault suite: a scheduler, an agent, and proxies between them.

The scheduler (``gpu-scheduler serve``, TLS with its self-made CA, SQLite) and the
agent (``gpu-agent run``, simulated GPUs, real Docker) run as subprocesses on free
loopback ports under a tmp dir, with short intervals so each scenario takes
seconds. Tests observe them through the scheduler's SQLite database (opened
read-only; WAL lets us read while it writes), the agent's state files, its JSON
log and Docker itself; every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import yaml

from agent.config import IsolationConfig
from agent.leases.leftovers import remove_node_leftovers

from .pipes import pipe

BIN = Path(sys.executable).parent
IMAGE = "gpu-agent-test/busybox:latest"
NODE_LABEL = "io.gpuagent.node-id"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # a probe racing a starting process may fail; retry
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})"
    )


# -- the loopback TCP proxy --------------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy the test controls: ``pass``, ``reset`` or ``blackhole``.

    ``reset`` closes every connection with RST and refuses new ones at once (a
    partition that the kernel reports); ``blackhole`` keeps connections open and
    accepts new ones but forwards nothing (a silent drop, only keepalive notices).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    def set_mode(self, mode: str) -> None:
        assert mode in {"pass", "reset", "blackhole"}
        with self._lock:
            self.mode = mode
            if mode == "reset":
                for conn in self._conns:
                    _rst(conn)
                self._conns.clear()

    def close(self) -> None:
        self._closed = True
        self.set_mode("reset")
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
            if mode == "reset":
                _rst(client)
                continue
            if mode == "blackhole":
                with self._lock:
                    self._conns.append(client)  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), 2)
            except OSError:
                _rst(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=pipe, args=(src, dst, lambda: self.mode == "blackhole"), daemon=True
                ).start()


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


# -- the cluster --------------------------------------------------------------------------


@dataclass
class Cluster:
    """One scheduler and one agent under ``root``; each can be killed and restarted."""

    root: Path
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    via_proxy: bool = False
    gpus: int = 4
    grpc_port: int = field(default_factory=free_port)
    status_port: int = field(default_factory=free_port)
    scheduler: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    proxy: TcpProxy | None = None
    node_id: str = ""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sched_dir = self.root / "scheduler"
        self.state_dir = self.root / "agent"
        tag = uuid.uuid4().hex[:5]
        self.isolation: dict[str, Any] = {
            "firewall_chain": f"GAF{tag.upper()}",
            "bridge_prefix": f"f{tag}-",
        }
        self.sched_dir.mkdir(exist_ok=True)
        self.state_dir.mkdir(exist_ok=True, mode=0o700)
        self.sched_cfg = self.root / "scheduler.yaml"
        self.agent_cfg = self.root / "agent.yaml"
        self.db_path = self.sched_dir / "scheduler.db"
        self.agent_log = self.root / "agent.log"
        self.sched_log = self.root / "scheduler.log"
        self.write_scheduler_config()

    # -- configs -------------------------------------------------------------------

    def write_scheduler_config(self) -> None:
        cfg: dict[str, Any] = {
            "log": {"level": "info", "format": "json"},
            "server": {"listen": f"127.0.0.1:{self.grpc_port}"},
            "database": {"path": str(self.db_path)},
            "metrics": {"listen": None},
            # The relay on a port of its own (plain HTTP: loopback only).
            "relay": {"listen": f"127.0.0.1:{free_port()}", "insecure_http": True},
            "liveness": {"heartbeat_interval": "1s", "offline_grace": "6s", "restart_grace": "8s"},
            "attestation": {"enabled": False, "required": False},
            "ledger": {"default_credit_micros": 10**12},
            # Anonymous test agent; enrolment has its own tests (tests/test_auth_*.py).
            "auth": {"registration": "open"},
        }
        _merge(cfg, self.scheduler_overrides)
        self.sched_cfg.write_text(yaml.safe_dump(cfg))

    def write_agent_config(self) -> None:
        port = self.proxy.port if self.proxy is not None else self.grpc_port
        cfg: dict[str, Any] = {
            "log": {"level": "info", "format": "json"},
            "node": {
                "name": "fault-node",
                "state_dir": str(self.state_dir),
                "price_micros_per_gpu_hour": 1_000_000,
            },
            "coordinator": {
                "address": f"127.0.0.1:{port}",
                "ca_file": str(self.sched_dir / "tls" / "ca.pem"),
                "server_name": "localhost",
                "keepalive_time": "5s",
                "keepalive_timeout": "2s",
                "call_timeout": "3s",
                "reconnect_initial": "0.5s",
                "reconnect_max": "4s",
            },
            "gpu": {
                "backend": "simulated",
                "health_interval": "1s",
                "simulated": {"profile": "h100-sxm-80gb", "count": self.gpus},
            },
            # A 2-core CI host: small leases, no CPU held back, or only one lease fits.
            "runtime": {
                "stop_grace": "1s",
                "pull_policy": "never",
                "default_cpus": 0.1,
                "default_memory": "32MiB",
                # Small too: the disk-full scenario's state dir is a 1.1 GB tmpfs, and a
                # scratch quota that does not fit the free disk is refused.
                "default_scratch": "64MiB",
                "cpu_reserve": 0,
                "memory_reserve": "64MiB",
            },
            "metering": {"sample_interval": "0.5s", "record_interval": "2s"},
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            # Rules of its own, matched to its own bridges, removed at close.
            "isolation": self.isolation,
        }
        _merge(cfg, self.agent_overrides)
        self.agent_cfg.write_text(yaml.safe_dump(cfg))

    # -- processes -----------------------------------------------------------------

    def start_scheduler(self) -> None:
        assert self.scheduler is None or self.scheduler.poll() is not None
        self.scheduler = _spawn(
            [str(BIN / "gpu-scheduler"), "-c", str(self.sched_cfg), "serve"], self.sched_log
        )
        wait_for(
            "the scheduler to listen",
            lambda: (self.sched_dir / "tls" / "ca.pem").exists() and port_open(self.grpc_port),
            30,
        )

    def start_agent(self) -> None:
        assert self.agent is None or self.agent.poll() is not None
        if self.via_proxy and self.proxy is None:
            self.proxy = TcpProxy(self.grpc_port)
        self.write_agent_config()
        self.agent = _spawn(
            [str(BIN / "gpu-agent"), "-c", str(self.agent_cfg), "run"], self.agent_log
        )

    def kill_agent(self) -> None:
        """kill -9: no shutdown path runs; containers are left to Docker."""
        _kill9(self.agent)

    def kill_scheduler(self) -> None:
        _kill9(self.scheduler)

    def start(self) -> None:
        self.start_scheduler()
        self.start_agent()
        self.wait_online()

    def stop(self) -> None:
        for proc in (self.agent, self.scheduler):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    _kill9(proc)
        if self.proxy is not None:
            self.proxy.close()
        self.remove_containers()

    def remove_containers(self) -> None:
        """Lease containers, their networks and mounted scratch, its firewall rules."""
        client = docker.from_env()
        try:
            remove_node_leftovers(
                client,
                self.node_id,
                self.state_dir / "scratch",
                IsolationConfig.model_validate(self.isolation),
            )
        finally:
            client.close()

    # -- observation -----------------------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def liveness(self) -> str:
        """The node's liveness as the scheduler's CLI reports it."""
        nodes = json.loads(self.scheduler_cli("nodes", "--json"))
        return str(nodes[0].get("liveness", "")) if nodes else ""

    def wait_online(self, timeout: float = 60) -> None:
        def online() -> bool:
            assert self.agent is not None
            if self.agent.poll() is not None:
                raise AssertionError(
                    f"agent exited ({self.agent.returncode}); see {self.agent_log}"
                )
            rows = self.query("SELECT node_id FROM nodes")
            if rows and self.connected():
                self.node_id = rows[0][0]
                return True
            return False

        wait_for("the agent to connect", online, timeout, 0.2)

    def agent_status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status", timeout=3) as r:
            return dict(json.load(r))

    def connected(self) -> bool:
        """Whether the agent's own status says its coordinator session is up."""
        try:
            status = self.agent_status()
        except OSError:
            return False
        return bool(status.get("coordinator", {}).get("connected"))

    def admin_token(self) -> str:
        """The admin token from ``acl bootstrap`` (run once, on the database file)."""
        token_file = self.root / "admin.token"
        if not token_file.exists():
            subprocess.run(
                [
                    str(BIN / "gpu-scheduler"),
                    "-c",
                    str(self.sched_cfg),
                    "acl",
                    "bootstrap",
                    "--token-file",
                    str(token_file),
                ],
                capture_output=True,
                timeout=60,
                check=True,
            )
        return token_file.read_text(encoding="utf-8").strip()

    def scheduler_cli(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [str(BIN / "gpu-scheduler"), "-c", str(self.sched_cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "GPU_SCHEDULER_TOKEN": self.admin_token()},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gpu-scheduler {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def submit(self, cmd: str, *, gpus: int = 1, key: str | None = None, **extra: str) -> str:
        args = ["submit", "--json", "--image", IMAGE, "--gpus", str(gpus), "--cmd", cmd]
        args += ["--buyer", "fault-buyer", "--price-max", "5000000", "--max-duration", "1h"]
        if key:
            args += ["--idempotency-key", key]
        for flag, value in extra.items():
            args += [f"--{flag.replace('_', '-')}", value]
        return str(json.loads(self.scheduler_cli(*args))["leaseId"])

    def lease_state(self, lease_id: str) -> str:
        rows = self.query("SELECT state FROM leases WHERE lease_id = ?", lease_id)
        return str(rows[0][0]) if rows else ""

    def containers(self) -> dict[str, dict[str, Any]]:
        """This node's containers by lease id (Docker's view)."""
        client = docker.from_env()
        try:
            found = client.containers.list(
                all=True, filters={"label": f"{NODE_LABEL}={self.node_id}"}
            )
            return {c.labels.get("io.gpuagent.lease-id", ""): c.attrs for c in found}
        finally:
            client.close()

    def log_events(self, message: str) -> list[dict[str, Any]]:
        """JSON log lines of the agent whose message starts with ``message``."""
        events = []
        for line in self.agent_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if str(event.get("message", event.get("msg", ""))).startswith(message):
                    events.append(event)
        return events


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _kill9(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@contextlib.contextmanager
def cluster(root: Path, **kwargs: Any) -> Iterator[Cluster]:
    c = Cluster(root, **kwargs)
    try:
        yield c
    finally:
        c.stop()


class DockerEvents:
    """Start and die times (ns, Docker's clock) of this node's containers, from the event stream."""

    def __init__(self, node_label_value: str | None = None) -> None:
        self.started: dict[str, int] = {}
        self.died: dict[str, int] = {}
        self.lease_of: dict[str, str] = {}
        self._client = docker.from_env()
        filters = {"type": "container", "event": ["start", "die"]}
        if node_label_value:
            filters["label"] = f"{NODE_LABEL}={node_label_value}"
        self._stream = self._client.events(decode=True, filters=filters)
        threading.Thread(target=self._run, daemon=True, name="docker-events").start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends when close() closes the client
            for event in self._stream:
                cid = event.get("id", "")
                attrs = event.get("Actor", {}).get("Attributes", {})
                self.lease_of[cid] = attrs.get("io.gpuagent.lease-id", "")
                if event.get("status") == "start":
                    self.started.setdefault(cid, int(event["timeNano"]))
                elif event.get("status") == "die":
                    self.died[cid] = int(event["timeNano"])

    def run_ns(self, container_id: str) -> int:
        return self.died[container_id] - self.started[container_id]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        self._client.close()


def report(
    record_property: Callable[[str, object], None], scenario: str, **figures: object
) -> None:
    """Attach measured figures to the test (junit XML) and, with FAULTS_FIGURES set,
    append them as one JSON line to that file (how docs/faults.md got its numbers)."""
    for key, value in figures.items():
        record_property(key, value)
    path = os.environ.get("FAULTS_FIGURES")
    if path:
        with Path(path).open("a", encoding="utf-8") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")
