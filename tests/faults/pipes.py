"""Byte pumps for the fault suite's proxies (the loopback TCP proxy and the Docker
socket proxy): one direction of a connection, copied until either side closes."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable


def pipe(src: socket.socket, dst: socket.socket, swallow: Callable[[], bool] | None = None) -> None:
    """Copy ``src`` to ``dst``; while ``swallow()`` holds, bytes are dropped instead
    (a blackhole: the peer sees no error, just silence). Half-closes ``dst`` at the end."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if swallow is not None and swallow():
                time.sleep(0.05)  # a dropped chunk; not waiting on anything
                continue
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
