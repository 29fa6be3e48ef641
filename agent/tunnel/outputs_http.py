"""The agent's end of an outputs download: HTTP/1.1 over one Carry stream.

The relay forwards ``GET /_outputs/<lease-id>`` (after the coordinator checked the
buyer's ticket) as a request for the tunnel "port" ``@outputs``; here the agent
answers it from its own output store, never from a container, with ``Range``
support so an interrupted download resumes where it stopped. The archive is read in
frames as the tunnel's flow control allows: a 100 GiB archive never sits in memory.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11

from ..leases.output_store import RetainedOutput

FRAME_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 16 * 1024
_RANGE = re.compile(rb"^bytes=(\d{1,20})-(\d{0,20})$")


class ByteStream:
    """What the server needs of a carried stream: read bytes, write bytes."""

    def __init__(
        self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]
    ) -> None:
        self.read = read
        self.write = write


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | str | None:
    """The inclusive byte span a ``Range`` header asks for: None (whole file), a
    (first, last) pair, or "unsatisfiable". Only one ``bytes=N-`` / ``bytes=N-M`` span:
    what a resuming client sends; anything else is served whole (RFC 9110 allows it)."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, min(last, size - 1)


async def serve(stream: ByteStream, output: RetainedOutput) -> None:
    """Answer requests on ``stream`` until the relay closes it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read())
                continue
        except h11.RemoteProtocolError as exc:
            # A malformed or oversized request: say so (the relay passes it on) and end.
            # Written by hand: h11 will not send a response to a request it never parsed.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"bad request: {exc}\n".encode()
                status = HTTPStatus(exc.error_status_hint)
                await stream.write(
                    f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                    "content-type: text/plain; charset=utf-8\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                    + body
                )
            return
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return
        if isinstance(event, h11.Request):
            keep = await _answer(stream, conn, event, output)
            if not keep:
                return
            continue
        if isinstance(event, h11.EndOfMessage) and conn.our_state is h11.DONE:
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


async def _answer(
    stream: ByteStream, conn: h11.Connection, request: h11.Request, output: RetainedOutput
) -> bool:
    headers = dict(request.headers)
    size = output.size
    common = [
        (b"content-type", b"application/x-tar"),
        (b"accept-ranges", b"bytes"),
        # The committed digest, for a client that only wants to compare (HEAD).
        (b"x-output-digest", output.digest_hex.encode()),
    ]
    if request.method not in (b"GET", b"HEAD"):
        await _simple(stream, conn, 405, b"outputs are read with GET or HEAD\n")
        return False
    span = parse_range(headers.get(b"range"), size)
    if span == "unsatisfiable":
        await _simple(
            stream,
            conn,
            416,
            b"range starts past the end of the archive\n",
            [(b"content-range", f"bytes */{size}".encode())],
        )
        return False
    first, last = span if isinstance(span, tuple) else (0, size - 1)
    length = max(0, last - first + 1)
    status = 206 if isinstance(span, tuple) else 200
    extra = [(b"content-range", f"bytes {first}-{last}/{size}".encode())] if status == 206 else []
    response = h11.Response(
        status_code=status,
        headers=[*common, *extra, (b"content-length", str(length).encode())],
    )
    try:
        handle = output.archive.open("rb")
    except OSError as exc:
        await _simple(stream, conn, 404, f"the archive is unreadable: {exc.strerror}\n".encode())
        return False
    with handle:
        await stream.write(conn.send(response) or b"")
        if request.method == b"GET":
            handle.seek(first)
            left = length
            while left > 0:
                data = await asyncio.to_thread(handle.read, min(FRAME_BYTES, left))
                if not data:
                    break  # the file shrank under us: the client sees a short body
                left -= len(data)
                await stream.write(conn.send(h11.Data(data=data)) or b"")
            if left:
                return False
        await stream.write(conn.send(h11.EndOfMessage()) or b"")
    return True


async def _simple(
    stream: ByteStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await stream.write(
        (
            conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *(headers or []),
                    ],
                )
            )
            or b""
        )
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )
