"""A small sd_notify(3) client: tell systemd (Type=notify units) how the service is doing.

Messages are ``KEY=VALUE`` lines in one datagram to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (``@name`` is Linux's abstract namespace). Without that
variable, e.g. in a terminal or a test, every call is a cheap no-op returning
False, so daemon code can call these unconditionally.

The socket is non-blocking: a full receive queue drops the message (logged)
instead of stalling the event loop, and a send failure never raises, because a
missed STATUS line must not take the daemon down. The watchdog ping runs as an
asyncio task on purpose: if the event loop is stuck, the pings stop and systemd
restarts the service, which is the whole point of ``WatchdogSec=``.

Shared by ``gpu-agent`` and ``gpu-scheduler`` (the scheduler must not import agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time

log = logging.getLogger(__name__)

# Field names sd_notify understands are upper-case identifiers (READY, STATUS, ...).
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")


def _socket_address() -> str | None:
    """The notify socket address in the form ``socket.sendto`` takes, or None when unset."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@'.
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    # e.g. systemd 254's "vsock:CID:PORT" for VMs: not something a host daemon meets.
    log.warning("unsupported NOTIFY_SOCKET address; not notifying", extra={"address": path})
    return None


def _text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    # One datagram holds newline-separated fields: a newline inside a value
    # would start a bogus field.
    return str(value).replace("\n", " ")


def _encode(fields: dict[str, str | int | float | bool]) -> bytes:
    lines: list[str] = []
    for name, value in fields.items():
        key = name.upper()
        if not _KEY.fullmatch(key):
            raise ValueError(f"sd_notify field name {name!r} is not an identifier like STATUS")
        lines.append(f"{key}={_text(value)}")
    return ("\n".join(lines) + "\n").encode()


def notify(**fields: str | int | float | bool) -> bool:
    """Send ``KEY=VALUE`` fields (keys upper-cased) in one datagram; True if it was sent.

    ``notify(ready=True, status="running")`` sends ``READY=1\\nSTATUS=running\\n``.
    A bad field name is a programming error and raises ValueError; everything
    about the socket (unset, gone, full) is logged and returns False.
    """
    data = _encode(fields)
    address = _socket_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(data, address)
    except OSError as exc:
        log.warning(
            "sd_notify failed",
            extra={"address": os.environ.get("NOTIFY_SOCKET"), "error": str(exc)},
        )
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Startup finished (READY=1), optionally with a STATUS line in the same datagram."""
    if status is None:
        return notify(ready=True)
    return notify(ready=True, status=status)


def status(text: str) -> bool:
    """Free-form state shown by ``systemctl status`` (STATUS=...)."""
    return notify(status=text)


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (STOPPING=1), so systemd shows "deactivating" meanwhile."""
    if status is None:
        return notify(stopping=True)
    return notify(stopping=True, status=status)


def reloading(status: str | None = None) -> bool:
    """A config reload has begun; call ready() when it is done.

    MONOTONIC_USEC is what systemd >= 253 (Type=notify-reload) matches the
    reload by; older versions ignore it.
    """
    fields: dict[str, str | int | float | bool] = {
        "reloading": True,
        "monotonic_usec": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
    }
    if status is not None:
        fields["status"] = status
    return notify(**fields)


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop timeout fires (EXTEND_TIMEOUT_USEC)."""
    return notify(extend_timeout_usec=max(0, round(seconds * 1_000_000)))


def watchdog() -> bool:
    """One keep-alive ping (WATCHDOG=1)."""
    return notify(watchdog=True)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds systemd expects pings within, or None when off.

    Follows sd_watchdog_enabled(3): WATCHDOG_USEC is the timeout, and when
    WATCHDOG_PID is set the watchdog is meant for that process only (not for a
    child that inherited the environment).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        if not pid.isdigit():
            log.warning("ignoring malformed WATCHDOG_PID", extra={"value": pid})
            return None
        if int(pid) != os.getpid():
            return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("ignoring malformed WATCHDOG_USEC", extra={"value": usec})
        return None
    return int(usec) / 1_000_000


async def watchdog_task(stop: asyncio.Event) -> None:
    """Ping the watchdog at half its interval until ``stop`` is set; returns at once if off.

    Shaped as an agent component (``agent.add_component("watchdog", watchdog_task)``).
    Pinging from the event loop itself is deliberate: a blocked loop misses
    its pings and systemd restarts the service.
    """
    interval = watchdog_interval()
    if interval is None:
        log.debug("systemd watchdog not enabled")
        return
    period = interval / 2
    log.info("systemd watchdog enabled", extra={"interval_s": interval, "ping_every_s": period})
    while not stop.is_set():
        watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)
