"""gpuagent.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from gpuagent import sdnotify


class Receiver:
    """The systemd side: a bound SOCK_DGRAM socket that collects datagrams."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536).decode()

    async def arecv(self) -> str:
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
        return data.decode()

    def pending(self) -> list[str]:
        """Everything already queued, without waiting."""
        self.sock.setblocking(False)
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, and pytest's
    # tmp_path can be longer than that.
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")  # noqa: PTH118 - socket API takes str
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Receiver(sock)
    finally:
        sock.close()
        shutil.rmtree(directory)


def test_every_call_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no NOTIFY_SOCKET) each helper returns False and raises nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog() is False
    assert sdnotify.stopping() is False


@pytest.mark.asyncio
async def test_lifecycle_messages_arrive_in_order(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY (with its STATUS), STATUS updates, watchdog pings, then STOPPING, in that order."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: pings every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    assert sdnotify.ready("connected to coordinator; 8 GPUs")
    assert sdnotify.status("running: 2 leases")
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog_task(stop))
    got = [await receiver.arecv(), await receiver.arecv()]
    # Two pings, so the task keeps pinging rather than sending once.
    got += [await receiver.arecv(), await receiver.arecv()]
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sdnotify.stopping("stopping: signal SIGTERM")
    got += receiver.pending()

    assert got[0] == "READY=1\nSTATUS=connected to coordinator; 8 GPUs\n"
    assert got[1] == "STATUS=running: 2 leases\n"
    assert got[-1] == "STOPPING=1\nSTATUS=stopping: signal SIGTERM\n"
    pings = got[2:-1]
    assert len(pings) >= 2
    assert set(pings) == {"WATCHDOG=1\n"}


def test_abstract_namespace_socket_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name addresses Linux's abstract namespace (leading NUL), as systemd may."""
    name = f"gpu-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.status("abstract")
        sock.settimeout(5)
        assert sock.recv(4096) == b"STATUS=abstract\n"


def test_newline_in_a_value_cannot_inject_a_field(receiver: Receiver) -> None:
    """A STATUS text with a newline stays one STATUS field: it cannot smuggle in READY=1."""
    assert sdnotify.status("coordinator said:\nREADY=1")
    assert receiver.recv() == "STATUS=coordinator said: READY=1\n"


def test_field_names_must_be_identifiers(receiver: Receiver) -> None:
    """A malformed field name is a programming error: ValueError, and nothing is sent."""
    with pytest.raises(ValueError, match="not an identifier"):
        sdnotify.notify(**{"bad=key": "x"})
    assert receiver.pending() == []


def test_unreachable_socket_returns_false_without_raising(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET that points nowhere is logged and reported as False, never raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(tmp_path, "gone"))  # noqa: PTH118
    assert sdnotify.ready() is False
    assert "sd_notify failed" in caplog.text


def test_full_queue_drops_the_message_instead_of_blocking(receiver: Receiver) -> None:
    """When systemd does not read, sends fail fast (False) rather than block the event loop."""
    started = time.monotonic()
    results = [sdnotify.status(f"update {i}") for i in range(5000)]
    assert False in results
    assert results[0] is True
    assert time.monotonic() - started < 5


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC taken from CLOCK_MONOTONIC (notify-reload protocol)."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading("reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in receiver.recv().splitlines())
    assert fields["RELOADING"] == "1"
    assert fields["STATUS"] == "reloading config"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_extend_timeout_is_sent_in_microseconds(receiver: Receiver) -> None:
    """extend_timeout(1.5) asks for 1 500 000 more microseconds."""
    assert sdnotify.extend_timeout(1.5)
    assert receiver.recv() == "EXTEND_TIMEOUT_USEC=1500000\n"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("30000000", "12abc", None),
        ("soon", None, None),
        ("0", None, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """WATCHDOG_USEC gives the timeout; WATCHDOG_PID for another process or bad values mean off."""
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_interval() == expected


@pytest.mark.asyncio
async def test_watchdog_task_returns_at_once_when_disabled(receiver: Receiver) -> None:
    """Without WATCHDOG_USEC the component ends immediately and sends nothing."""
    await asyncio.wait_for(sdnotify.watchdog_task(asyncio.Event()), 1)
    assert receiver.pending() == []


@pytest.mark.asyncio
async def test_stuck_event_loop_stops_the_pings(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the loop is blocked no WATCHDOG=1 is sent, so systemd would restart the service."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 50 ms
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    arrived = asyncio.Event()
    done = threading.Event()

    def collect() -> None:
        receiver.sock.settimeout(0.05)
        while not done.is_set():
            try:
                receiver.sock.recv(4096)
            except TimeoutError:
                continue
            arrivals.append(time.monotonic())
            loop.call_soon_threadsafe(arrived.set)

    async def next_ping() -> None:
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), 5)

    collector = threading.Thread(target=collect)
    collector.start()
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog_task(stop))
    try:
        for _ in range(3):
            await next_ping()
        blocked_at = time.monotonic()
        time.sleep(0.6)  # noqa: ASYNC251 - the stuck loop under test, not synchronisation
        unblocked_at = time.monotonic()
        await next_ping()
    finally:
        stop.set()
        await task
        done.set()
        collector.join()
    during = [t for t in arrivals if blocked_at + 0.05 < t < unblocked_at]
    assert during == []
    assert arrivals[-1] > unblocked_at, "pings did not resume once the loop was free"
