"""A coordinator name with several DNS records: one replica per record (agent/link/targets.py).

``expand`` against a fake resolver (records, IPv6, duplicates, failures, what is left
alone, how agents spread); ``TargetCycle``'s walk through records and addresses; the
real link dialing an IP while TLS verifies the name; and, with the real resolver, two
real ``gpu-scheduler serve`` processes behind one name in /etc/hosts (a private copy,
bind-mounted in a mount namespace): the agent is welcomed by one, that one is killed
-9, and the agent is welcomed by the other after one backoff step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml

from agent.config import CoordinatorConfig
from agent.link import CoordinatorLink, targets
from agent.link.channel import make_channel
from agent.link.targets import Target, TargetCycle, expand
from tests.coordinator_harness import (
    Pki,
    agent_config,
    db_rows,
    make_link,
    scheduler_config,
    start_server,
)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
_real_getaddrinfo = socket.getaddrinfo


class FakeDns:
    """A resolver with a table of names; records every question it is asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[tuple[str, object, dict[str, Any]]] = []

    def __call__(self, host: str, port: object, *args: Any, **kwargs: Any) -> list[Any]:
        self.asked.append((host, port, kwargs))
        ips = self.table.get(host)
        if ips is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]


def refuse(host: str, *args: Any, **kwargs: Any) -> list[Any]:
    raise AssertionError(f"asked to resolve {host!r}")


@pytest.fixture(autouse=True)
def fresh_failure_streaks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "_failing", set())


def node_ids(n: int) -> list[str]:
    return [hashlib.sha256(f"node-{i}".encode()).hexdigest()[:32] for i in range(n)]


# -- expand ----------------------------------------------------------------------------


def test_several_records_become_one_target_each_over_tcp() -> None:
    """Each A record of the name is a target ``ip:port``; only TCP records are asked for."""
    dns = FakeDns({"coord.example": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]})
    got = expand("coord.example:7443", "n1", getaddrinfo=dns)
    assert sorted(got) == ["10.0.0.1:7443", "10.0.0.2:7443", "10.0.0.3:7443"]
    [(host, port, kwargs)] = dns.asked
    assert (host, port) == ("coord.example", 7443)
    assert kwargs["type"] == socket.SOCK_STREAM and kwargs["proto"] == socket.IPPROTO_TCP


def test_ipv6_records_are_bracketed() -> None:
    """AAAA records come back as ``[ip]:port`` (what gRPC parses), beside the A ones."""
    dns = FakeDns({"coord.example": ["2001:db8::1", "10.0.0.1"]})
    got = expand("coord.example:7443", "n1", getaddrinfo=dns)
    assert sorted(got) == ["10.0.0.1:7443", "[2001:db8::1]:7443"]


def test_duplicate_records_are_one_target() -> None:
    """The same address twice (several sockaddrs for one IP, a repeated record) is dialed
    once per round, not twice."""
    dns = FakeDns({"coord.example": ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1"]})
    assert sorted(expand("coord.example:7443", getaddrinfo=dns)) == [
        "10.0.0.1:7443",
        "10.0.0.2:7443",
    ]


def test_resolution_failure_returns_the_address_and_logs_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name that does not resolve is handed to gRPC as given (it reports the real error);
    a streak of failures logs one warning, the recovery one line, the next streak again."""
    dns = FakeDns({})
    caplog.set_level(logging.INFO, logger="agent.link.targets")
    for _ in range(3):
        assert expand("coord.example:7443", "n1", getaddrinfo=dns) == ["coord.example:7443"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].address == "coord.example:7443"  # type: ignore[attr-defined]
    assert "Name or service not known" in warnings[0].error  # type: ignore[attr-defined]

    dns.table["coord.example"] = ["10.0.0.1"]
    assert expand("coord.example:7443", "n1", getaddrinfo=dns) == ["10.0.0.1:7443"]
    assert expand("coord.example:7443", "n1", getaddrinfo=dns) == ["10.0.0.1:7443"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "the coordinator's name resolves again"
    ]

    del dns.table["coord.example"]
    expand("coord.example:7443", "n1", getaddrinfo=dns)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:7443",
        "10.1.2.3:7443",
        "[::1]:7443",
        "[2001:db8::5]:7443",
        "2001:db8::5",
        "ipv4:127.0.0.1:7443",
        "ipv6:[::1]:7443",
        "dns:coord.example:7443",
        "dns:///coord.example:7443",
        "unix:/run/gpu-scheduler.sock",
        "unix-abstract:gpu-scheduler",
        "localhost:7443",
        "LOCALHOST.:7443",
        "grpc.localhost:7443",
        "127.1:7443",
        "coord.example",
        "coord.example:https",
        "coord.example:0",
        "-bad-.example:7443",
    ],
)
def test_literals_uris_localhost_and_odd_addresses_are_left_to_grpc(address: str) -> None:
    """Nothing but ``name:port`` with a real DNS name is resolved: IP literals, gRPC target
    URIs, localhost (gRPC tries its ::1 and 127.0.0.1 in one attempt) and malformed
    addresses go to gRPC exactly as configured."""
    assert expand(address, "n1", getaddrinfo=refuse) == [address]


def test_agents_spread_evenly_over_the_records() -> None:
    """100 agents over 2 records: each record is the first choice of about half of them."""
    dns = FakeDns({"coord.example": ["10.0.0.1", "10.0.0.2"]})
    first = [expand("coord.example:7443", n, getaddrinfo=dns)[0] for n in node_ids(100)]
    on_one = first.count("10.0.0.1:7443")
    assert 35 <= on_one <= 65, f"{on_one} of 100 agents prefer 10.0.0.1"


def test_the_same_agent_keeps_its_order_whatever_order_dns_answers_in() -> None:
    """An agent's order depends on its node id and the records only: the same on every
    resolution, even when the resolver rotates its answers (round-robin DNS)."""
    records = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    for node in node_ids(20):
        orders = {
            tuple(
                expand(
                    "coord.example:7443",
                    node,
                    getaddrinfo=FakeDns({"coord.example": records[k:] + records[:k]}),
                )
            )
            for k in range(len(records))
        }
        assert len(orders) == 1


def test_a_dead_replicas_agents_spread_over_the_rest() -> None:
    """Rendezvous order, not a rotation: the agents preferring one record do not all fall
    back to the same next one, and removing a record moves only the agents on it."""
    dns = FakeDns({"coord.example": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]})
    orders = {n: expand("coord.example:7443", n, getaddrinfo=dns) for n in node_ids(300)}
    on_first = [o for o in orders.values() if o[0] == "10.0.0.1:7443"]
    seconds = [o[1] for o in on_first]
    assert min(seconds.count("10.0.0.2:7443"), seconds.count("10.0.0.3:7443")) > len(on_first) / 4

    dns.table["coord.example"] = ["10.0.0.2", "10.0.0.3"]
    for node, before in orders.items():
        after = expand("coord.example:7443", node, getaddrinfo=dns)
        assert after == [t for t in before if t != "10.0.0.1:7443"]


# -- TargetCycle -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cycle_walks_every_record_of_every_address_then_starts_over() -> None:
    """Attempt after attempt: each record of the name, then the next configured address,
    then the name's records again."""
    dns = FakeDns({"coord.example": ["10.0.0.1", "10.0.0.2"]})
    cycle = TargetCycle("n1", getaddrinfo=dns)
    addresses = ("coord.example:7443", "10.9.9.9:7443")
    order = expand("coord.example:7443", "n1", getaddrinfo=dns)
    seen: list[Target] = []
    for _ in range(5):
        seen.append(await cycle.pick(addresses))
        cycle.advance()
    assert [t.dial for t in seen] == [*order, "10.9.9.9:7443", *order]
    assert [t.configured for t in seen] == [addresses[0]] * 2 + [addresses[1]] + [addresses[0]] * 2
    assert [t.authority for t in seen] == ["coord.example:7443"] * 2 + [None] + [
        "coord.example:7443"
    ] * 2
    assert str(seen[0]) == f"coord.example:7443 ({order[0]})"
    assert str(seen[2]) == "10.9.9.9:7443"


@pytest.mark.asyncio
async def test_cycle_resolves_again_at_every_attempt() -> None:
    """A record added to (or replacing those of) the name is dialed at the next round: the
    name is resolved at each attempt, not once at start."""
    dns = FakeDns({"coord.example": ["10.0.0.1"]})
    cycle = TargetCycle("n1", getaddrinfo=dns)
    assert (await cycle.pick(["coord.example:7443"])).dial == "10.0.0.1:7443"
    cycle.advance()
    dns.table["coord.example"] = ["10.0.0.7"]
    assert (await cycle.pick(["coord.example:7443"])).dial == "10.0.0.7:7443"
    assert len(dns.asked) == 2


@pytest.mark.asyncio
async def test_a_resolver_that_hangs_does_not_hold_the_link() -> None:
    """A resolver with no answer within the link's timeout: the attempt goes ahead with the
    name as configured (gRPC resolves it and reports what goes wrong)."""
    release = threading.Event()

    def hang(*args: Any, **kwargs: Any) -> list[Any]:
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    cycle = TargetCycle("n1", timeout=0.05, getaddrinfo=hang)
    try:
        target = await asyncio.wait_for(cycle.pick(["coord.example:7443"]), 5)
    finally:
        release.set()
    assert target == Target("coord.example:7443", "coord.example:7443")
    assert "coord.example:7443" in targets._failing


# -- the link: an IP dialed, the name verified -------------------------------------------


def name_pki(tmp: Path, *names: str) -> Pki:
    """A CA and a server certificate for ``names`` only: no IP in it, so a TLS session to
    the IP verifies only if the name is what is checked."""
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    tmp.mkdir(parents=True, exist_ok=True)
    pki = Pki(ca, tmp / "ca.pem", tmp / "server.pem", tmp / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    cert.private_key_pem.write_to_path(str(pki.key_file))
    cert.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(pki.cert_file), append=True)
    return pki


@pytest.fixture
def fake_names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """socket.getaddrinfo answering test names from a table, everything else for real."""
    table: dict[str, list[str]] = {}
    fake = FakeDns(table)

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host in table:
            return fake(host, *args, **kwargs)
        return _real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


class Dials:
    """``make_channel`` that remembers what each attempt dialed and which authority."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str | None]] = []

    def __call__(self, config: CoordinatorConfig, authority: str | None = None) -> Any:
        self.made.append((str(config.address), authority))
        return make_channel(config, authority)


@contextlib.asynccontextmanager
async def running(link: CoordinatorLink) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def connected_or_error(link: CoordinatorLink, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not link.connected and link.last_error is None:
        assert time.monotonic() < deadline, "neither connected nor an error"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_link_dials_the_records_ip_and_tls_verifies_the_name(
    tmp_path: Path, fake_names: dict[str, list[str]]
) -> None:
    """``coord.test:P`` resolving to 127.0.0.1: the channel connects to the IP, presents
    and verifies the name (the certificate names no IP), and the link says both."""
    pki = name_pki(tmp_path / "pki", "coord.test")
    server = await start_server(scheduler_config(tmp_path, pki))
    try:
        fake_names["coord.test"] = ["127.0.0.1"]
        port = server.port
        config = agent_config(port, pki, address=f"coord.test:{port}")
        link, identity = make_link(config, tmp_path / "agent")
        dials = Dials()
        link._channel_factory = dials
        async with running(link):
            await asyncio.wait_for(link.wait_connected(), 5)
            assert identity.node_id in server.registry.sessions
        assert dials.made == [(f"127.0.0.1:{port}", f"coord.test:{port}")]
        assert (link.address, link.dialed) == (f"coord.test:{port}", f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_link_refuses_a_record_whose_server_does_not_hold_the_name(
    tmp_path: Path, fake_names: dict[str, list[str]]
) -> None:
    """Dialing by IP does not loosen TLS: a name whose record leads to a server with a
    certificate for another name fails verification, and the error names name and IP."""
    pki = name_pki(tmp_path / "pki", "coord.test")
    server = await start_server(scheduler_config(tmp_path, pki))
    try:
        fake_names["impostor.test"] = ["127.0.0.1"]
        port = server.port
        config = agent_config(port, pki, address=f"impostor.test:{port}")
        link, _ = make_link(config, tmp_path / "agent")
        async with running(link):
            await connected_or_error(link)
            assert not link.connected
        error = link.last_error or ""
        assert f"impostor.test:{port} (127.0.0.1:{port})" in error
        assert "UNAVAILABLE" in error
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_server_name_still_decides_what_tls_verifies(
    tmp_path: Path, fake_names: dict[str, list[str]]
) -> None:
    """With ``server_name`` set, the certificate is checked against it, as before, also
    when the address is a name the link resolved."""
    pki = name_pki(tmp_path / "pki", "scheduler.internal")
    server = await start_server(scheduler_config(tmp_path, pki))
    try:
        fake_names["coord.test"] = ["127.0.0.1"]
        port = server.port
        config = agent_config(
            port, pki, address=f"coord.test:{port}", server_name="scheduler.internal"
        )
        link, _ = make_link(config, tmp_path / "agent")
        async with running(link):
            await asyncio.wait_for(link.wait_connected(), 5)
        assert link.dialed == f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


# -- the real resolver, real schedulers, kill -9 -------------------------------------------


def _mount_namespace_problem(tmp: Path) -> str | None:
    """Why /etc/hosts cannot be replaced in a private mount namespace here, or None."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    if os.geteuid() != 0:
        return "unshare --mount with a bind mount needs root"
    probe = tmp / "probe.hosts"
    probe.write_text("127.0.0.1 probe.gpu-agent.test\n")
    try:
        result = subprocess.run(
            ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && cat /etc/hosts',
             str(probe)],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --mount failed: {exc}"
    if result.returncode != 0 or "probe.gpu-agent.test" not in result.stdout:
        return f"cannot bind-mount a hosts file in a mount namespace: {result.stderr.strip()}"
    return None


def _port_on_both(ips: tuple[str, ...]) -> int:
    """A TCP port free on every one of ``ips`` (loopback addresses)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((ips[0], 0))
            port = int(first.getsockname()[1])
            try:
                for ip in ips[1:]:
                    with socket.socket() as other:
                        other.bind((ip, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no port free on all of {ips}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(ip: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ip, port), 0.5):
        return True
    return False


def _scheduler_yaml(root: Path, ip: str, port: int, pki: Pki) -> Path:
    cfg = {
        "log": {"level": "info", "format": "json"},
        "server": {
            "listen": f"{ip}:{port}",
            "cert_file": str(pki.cert_file),
            "key_file": str(pki.key_file),
        },
        "database": {"path": str(root / "scheduler.db")},
        "metrics": {"listen": None},
        "relay": {"listen": f"127.0.0.1:{_free_port()}", "insecure_http": True},
        "liveness": {"heartbeat_interval": "0.5s"},
        "attestation": {"enabled": False, "required": False},
        "auth": {"registration": "open"},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "scheduler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Lines:
    """A child's stdout, one JSON object a line, read by a thread into a queue."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.queue.put(json.loads(line))

    def next(self, kind: str, within: float) -> tuple[dict[str, Any], float]:
        """The next event of ``kind`` and when it arrived (monotonic)."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event within {within}s")
            try:
                event = self.queue.get(timeout=left)
            except queue.Empty:
                raise AssertionError(f"no {kind} event within {within}s") from None
            if event.get("event") == kind:
                return event, time.monotonic()


@contextlib.contextmanager
def spawned(
    argv: list[str], log: Path, *, capture: bool = False, **kwargs: Any
) -> Iterator[subprocess.Popen[str]]:
    """A child in its own session, killed -9 at the end; stderr (and stdout unless
    ``capture``, then a pipe) to ``log``."""
    with log.open("ab") as sink:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if capture else sink,
            stderr=sink,
            start_new_session=True,
            text=True,
            **kwargs,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_agent_fails_over_between_the_records_of_one_name(tmp_path: Path) -> None:
    """``coord.test`` has two records, 127.0.0.1 and 127.0.0.2, each a real scheduler on the
    same port with a certificate for the name only; the agent (real resolver, real
    /etc/hosts lookup) is welcomed through one record; that scheduler is killed -9; the
    very next attempt dials the other record and is welcomed there (Hello/Welcome as
    on any reconnect) after one backoff step, well within backoff plus a handshake."""
    problem = _mount_namespace_problem(tmp_path)
    if problem is not None:
        pytest.skip(problem)
    ips = ("127.0.0.1", "127.0.0.2")
    try:
        port = _port_on_both(ips)
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2 here: {exc}")
    pki = name_pki(tmp_path / "pki", "coord.test")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 coord.test\n127.0.0.2 coord.test\n")
    agent_cfg = tmp_path / "agent.json"
    initial, call_timeout = 0.2, 2.0
    agent_cfg.write_text(
        json.dumps(
            {
                "address": f"coord.test:{port}",
                "ca_file": str(pki.ca_file),
                "call_timeout": call_timeout,
                "reconnect_initial": initial,
                "reconnect_max": 1.0,
            }
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with contextlib.ExitStack() as stack:
        schedulers: dict[str, subprocess.Popen[str]] = {}
        for ip in ips:
            cfg = _scheduler_yaml(tmp_path / ip, ip, port, pki)
            argv = [str(BIN / "gpu-scheduler"), "-c", str(cfg), "serve"]
            log = tmp_path / f"scheduler-{ip}.log"
            schedulers[ip] = stack.enter_context(spawned(argv, log, env=env))
        deadline = time.monotonic() + 30
        while not all(_listening(ip, port) for ip in ips):
            assert all(p.poll() is None for p in schedulers.values()), "a scheduler exited"
            assert time.monotonic() < deadline, "the schedulers did not start listening"
            time.sleep(0.05)
        agent = stack.enter_context(
            spawned(
                ["unshare", "--mount", "sh", "-c",
                 'mount --bind "$0" /etc/hosts && exec "$1" -m tests.test_link_targets "$2" "$3"',
                 str(hosts), sys.executable, str(agent_cfg), str(tmp_path / "agent")],
                tmp_path / "agent.log", capture=True, cwd=REPO, env=env,
            )
        )  # fmt: skip
        events = Lines(agent)

        first_dial, _ = events.next("dial", 30)
        first, _ = events.next("welcome", 30)
        held = first["dialed"].rpartition(":")[0]
        assert held in ips and first["dialed"] == first_dial["address"]
        assert first["address"] == f"coord.test:{port}"
        assert first_dial["authority"] == f"coord.test:{port}"
        nodes = db_rows(_config_of(tmp_path / held), "SELECT node_id FROM nodes")
        assert nodes == [(first["node_id"],)]

        schedulers[held].send_signal(signal.SIGKILL)
        schedulers[held].wait(10)
        killed_at = time.monotonic()
        other = next(ip for ip in ips if ip != held)

        next_dial, _ = events.next("dial", 10)
        assert next_dial["address"] == f"{other}:{port}", "the next attempt went elsewhere"
        second, welcomed_at = events.next("welcome", 10)
        took = welcomed_at - killed_at
        assert second["dialed"] == f"{other}:{port}"
        assert second["node_id"] == first["node_id"] and second["session"] != first["session"]
        assert took < initial + call_timeout, f"welcomed by the other replica after {took:.2f}s"
        nodes = db_rows(_config_of(tmp_path / other), "SELECT node_id FROM nodes")
        assert nodes == [(first["node_id"],)]


def _config_of(root: Path) -> Any:
    from scheduler.config import SchedulerConfig

    return SchedulerConfig.model_validate(yaml.safe_load((root / "scheduler.yaml").read_text()))


# -- the agent side of the real test, run as ``python -m tests.test_link_targets`` ---------


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def _agent(config: CoordinatorConfig, state_dir: Path) -> None:
    link, identity = make_link(config, state_dir)

    def dial(config: CoordinatorConfig, authority: str | None = None) -> grpc.aio.Channel:
        _emit(event="dial", address=str(config.address), authority=authority)
        return make_channel(config, authority)

    async def welcomed(welcome: Any) -> None:
        _emit(
            event="welcome",
            address=link.address,
            dialed=link.dialed,
            node_id=identity.node_id,
            session=welcome.session_id,
        )

    link._channel_factory = dial
    link.on_session(welcomed)
    await link.run(asyncio.Event())  # until the test kills this process


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = CoordinatorConfig.model_validate(json.loads(Path(argv[0]).read_text()))
    asyncio.run(_agent(config, Path(argv[1])))


if __name__ == "__main__":
    _main(sys.argv[1:])
