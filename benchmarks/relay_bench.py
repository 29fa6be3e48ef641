"""The relay's cost, side by side with the direct path and Debian's nginx (issue #16).

One real stack (``gpu-scheduler serve`` with its relay, ``gpu-agent run``, a service
lease of the pyservice image, tests/images/pyservice.py). Three paths to the same
container port, on loopback, in one run:

- direct: the container's address on its lease network (what the agent dials);
- nginx: Debian's nginx as a plain reverse proxy to that address (keep-alive upstream);
- relay: buyer -> relay (plain HTTP on loopback, token checked) -> tunnel -> agent -> container.

Figures: added latency p50/p99 over direct for 1 KiB responses at 1 and 64 concurrent
keep-alive connections, throughput of one 1 GiB streamed response, and CPU seconds the
relay's process (the scheduler) and the agent's tunnel spend per 1,000 requests.
The load generator is one asyncio client; its own cost is in every path alike.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import grpc
import psutil

from agent.leases.docker_runtime import container_name
from gpuagent.v1 import acl_pb2, acl_pb2_grpc, common_pb2, leases_pb2, leases_pb2_grpc

from .agent_stack import Stack, free_port, running_stack, wait_until
from .registry import Figure, register

MB = 1024 * 1024
LEASE_ID = "bench-relay-svc"
NGINX_CONF = """\
daemon off;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;  # nginx closes a keep-alive connection after 1000 by default
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream service {{ server {host}:{port}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{listen};
    location / {{
      proxy_pass http://service;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


class Client:
    """A minimal keep-alive HTTP/1.1 client (Content-Length or chunked responses)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host = host
        self.port = port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )

    async def get(self, path: str) -> int:
        """Bytes of body read."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {head[:200]!r}")
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            total = 0
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return total
                left = size
                while left:
                    left -= len(await self.reader.read(min(left, 1 << 20)))
                await self.reader.readexactly(2)
                total += size
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        left = length
        while left:
            left -= len(await self.reader.read(min(left, 1 << 20)))
        return length

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _latencies(
    host: str, port: int, headers: dict[str, str], conns: int, per_conn: int
) -> list[float]:
    clients = [Client(host, port, headers) for _ in range(conns)]
    await asyncio.gather(*(c.connect() for c in clients))
    samples: list[float] = []

    async def run(client: Client) -> None:
        for _ in range(5):  # warm: caches, route lookups, upstream connections
            await client.get("/big?n=1024")
        for _ in range(per_conn):
            started = time.perf_counter()
            await client.get("/big?n=1024")
            samples.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(run(c) for c in clients))
    finally:
        for client in clients:
            client.close()
    return samples


async def _throughput(host: str, port: int, headers: dict[str, str], size: int) -> float:
    client = Client(host, port, headers)
    await client.connect()
    try:
        started = time.perf_counter()
        got = await client.get(f"/stream?n={size}")
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    assert got == size, (got, size)
    return size / elapsed / MB


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _service(stack: Stack) -> tuple[str, str]:
    """Submit the service lease as a buyer; (endpoint token, container address)."""
    acl = acl_pb2_grpc.AclStub(stack.channel)
    acl.CreateAccount(acl_pb2.CreateAccountRequest(name="bench-buyer", role=acl_pb2.ROLE_BUYER))
    secret = acl.CreateToken(acl_pb2.CreateTokenRequest(account="bench-buyer")).secret
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=stack.ca_file.read_bytes()),
        grpc.access_token_call_credentials(secret),
    )
    with grpc.secure_channel(f"localhost:{stack.grpc_port}", creds) as channel:
        stub = leases_pb2_grpc.LeasesStub(channel)
        lease = stub.Submit(
            leases_pb2.SubmitLeaseRequest(
                spec=leases_pb2.LeaseSpec(
                    image="gpu-agent-test/pyservice:latest",
                    gpu_count=1,
                    cpus=1.0,
                    memory_bytes=256 * MB,
                    max_duration_seconds=3600,
                    ports=[leases_pb2.PortSpec(container_port=8080, protocol="http")],
                ),
                idempotency_key=LEASE_ID,
            ),
            timeout=10,
        )
        wait_until(
            "for the service lease to run",
            lambda: (
                stub.Get(leases_pb2.GetLeaseRequest(lease_id=LEASE_ID), timeout=5).state
                == common_pb2.LEASE_STATE_RUNNING
            ),
            60,
        )
    client = docker.from_env()
    try:
        container = client.containers.get(container_name(LEASE_ID))
        networks = container.attrs["NetworkSettings"]["Networks"]
        address = next(n["IPAddress"] for n in networks.values() if n.get("IPAddress"))
    finally:
        client.close()
    return lease.endpoint_token, address


def _start_nginx(workdir: Path, host: str, port: int) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    listen = free_port()
    conf_dir = workdir / "nginx"
    conf_dir.mkdir()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, host=host, port=port, listen=listen))
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(conf_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until("for nginx", lambda: _answers("127.0.0.1", listen, {"Host": "x"}), 10)
    return proc, listen


def _answers(host: str, port: int, headers: dict[str, str]) -> bool:
    async def probe() -> None:
        client = Client(host, port, headers)
        await client.connect()
        try:
            await client.get("/big?n=1")
        finally:
            client.close()

    asyncio.run(probe())
    return True


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@register("relay")
def bench(smoke: bool) -> list[Figure]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise RuntimeError("the relay benchmark compares with nginx: apt-get install nginx-light")
    from tests.images import build_pyservice

    build_pyservice()
    per_conn_1, per_conn_64 = (200, 10) if smoke else (2000, 50)
    stream_bytes = (64 if smoke else 1024) * MB
    figures: list[Figure] = []
    with running_stack() as stack, tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        token, address = _service(stack)
        nginx, nginx_port = _start_nginx(Path(tmp), address, 8080)
        relay_headers = {
            "Host": f"{LEASE_ID}-8080.relay.localhost",
            "Authorization": f"Bearer {token}",
        }
        wait_until(
            "for the relay path",
            lambda: _answers("127.0.0.1", stack.relay_port, relay_headers),
            30,
        )
        try:
            paths = {
                "direct": (address, 8080, {"Host": "svc"}),
                "nginx": ("127.0.0.1", nginx_port, {"Host": "svc"}),
                "relay": ("127.0.0.1", stack.relay_port, relay_headers),
            }
            scheduler = psutil.Process(stack.procs["scheduler"].pid)
            agent = stack.agent
            results: dict[str, dict[str, float]] = {}
            for name, (host, port, headers) in paths.items():
                row: dict[str, float] = {}
                for conns, per in ((1, per_conn_1), (64, per_conn_64)):
                    cpu_s, cpu_a = _cpu(scheduler), _cpu(agent)
                    try:
                        samples = asyncio.run(_latencies(host, port, headers, conns, per))
                    except (OSError, asyncio.IncompleteReadError, RuntimeError) as exc:
                        raise RuntimeError(f"{name} path, {conns} connections: {exc!r}") from exc
                    row[f"p50_c{conns}"] = statistics.median(samples)
                    row[f"p99_c{conns}"] = _pct(samples, 0.99)
                    if name == "relay" and conns == 64:
                        n = len(samples) + 5 * conns
                        row["relay_cpu_per_1k"] = (_cpu(scheduler) - cpu_s) / n * 1000
                        row["agent_cpu_per_1k"] = (_cpu(agent) - cpu_a) / n * 1000
                row["mb_s"] = asyncio.run(_throughput(host, port, headers, stream_bytes))
                results[name] = row
        finally:
            nginx.terminate()
            nginx.wait(10)
    base = results["direct"]
    for name in ("relay", "nginx"):
        row = results[name]
        for conns in (1, 64):
            p50 = (row[f"p50_c{conns}"] - base[f"p50_c{conns}"]) * 1000
            p99 = (row[f"p99_c{conns}"] - base[f"p99_c{conns}"]) * 1000
            relay = name == "relay"
            figures.append(
                Figure(
                    f"{name} added p50, 1 KiB, {conns} conn",
                    p50,
                    "ms",
                    "< 1" if relay else "",
                    (p50 < 1.0) if relay else None,
                )
            )
            figures.append(
                Figure(
                    f"{name} added p99, 1 KiB, {conns} conn",
                    p99,
                    "ms",
                    "< 5" if relay else "",
                    (p99 < 5.0) if relay else None,
                )
            )
    for name in ("direct", "nginx", "relay"):
        for conns in (1, 64):
            figures.append(
                Figure(
                    f"{name} p50, 1 KiB, {conns} conn", results[name][f"p50_c{conns}"] * 1000, "ms"
                )
            )
    size = f"{stream_bytes // MB} MiB"
    figures.append(Figure(f"direct throughput, {size} stream", base["mb_s"], "MB/s"))
    figures.append(Figure(f"nginx throughput, {size} stream", results["nginx"]["mb_s"], "MB/s"))
    relay_mb = results["relay"]["mb_s"]
    target = max(200.0, base["mb_s"] / 2)
    figures.append(
        Figure(
            f"relay throughput, {size} stream",
            relay_mb,
            "MB/s",
            f">= {target:.0f}",
            relay_mb >= target,
        )
    )
    figures.append(
        Figure("relay CPU per 1,000 requests", results["relay"]["relay_cpu_per_1k"], "s")
    )
    figures.append(
        Figure("agent tunnel CPU per 1,000 requests", results["relay"]["agent_cpu_per_1k"], "s")
    )
    return figures
