"""Fetching a lease's outputs: download tickets and mismatch reports (scheduler/output_fetch),
the agent's HTTP/1.1 server over a carried stream (agent/tunnel/outputs_http), and the
CLI's own check of the node's signed commitment (scheduler/cmd_output)."""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable
from pathlib import Path

import h11
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.leases.output_store import RetainedOutput
from agent.tunnel.outputs_http import FRAME_BYTES, ByteStream, parse_range, serve
from gpuagent.outputs import CHUNK_BYTES, output_commitment_signing_bytes
from gpuagent.signing import node_id_from_public_key
from gpuagent.v1 import leases_pb2
from scheduler import output_fetch
from scheduler.cmd_output import commitment_problem, differences
from scheduler.db import Database
from scheduler.output_fetch import MAX_DETAIL_CHARS, TICKET_PREFIX, OutputTickets
from scheduler.secretbox import SecretBox

LEASE = "lease-abc123"
OTHER_LEASE = "lease-def456"
NOW = 1_700_000_000.0
TTL = 3600.0
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# --- scheduler/output_fetch.py: tickets -------------------------------------------------


def fake_clock(start: float = NOW) -> tuple[list[float], Callable[[], float]]:
    now = [start]
    return now, lambda: now[0]


def tickets(tmp_path: Path, clock: Callable[[], float], name: str = "secrets.key") -> OutputTickets:
    return OutputTickets(SecretBox(tmp_path / name), clock, TTL)


def decoded(ticket: str) -> bytes:
    body = ticket[len(TICKET_PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def test_a_fresh_ticket_opens_its_lease_until_it_expires(tmp_path: Path) -> None:
    now, clock = fake_clock()
    box = tickets(tmp_path, clock)
    ticket, expires_ns = box.issue(LEASE)
    assert ticket.startswith(TICKET_PREFIX)
    assert expires_ns == int(NOW + TTL) * 10**9
    assert box.check(LEASE, ticket)
    now[0] = NOW + TTL  # the last second it is good
    assert box.check(LEASE, ticket)
    now[0] = NOW + TTL + 1
    assert not box.check(LEASE, ticket)


def test_a_ticket_opens_no_other_lease(tmp_path: Path) -> None:
    _, clock = fake_clock()
    box = tickets(tmp_path, clock)
    ticket, _ = box.issue(LEASE)
    assert not box.check(OTHER_LEASE, ticket)
    assert not box.check(LEASE + "x", ticket)
    assert not box.check("", ticket)
    assert box.issue(OTHER_LEASE)[0] != ticket


def test_every_single_character_change_that_alters_the_ticket_fails(tmp_path: Path) -> None:
    _, clock = fake_clock()
    box = tickets(tmp_path, clock)
    ticket, _ = box.issue(LEASE)
    body = decoded(ticket)
    tried = 0
    for at in range(len(ticket)):
        for char in _B64 + "!=+/.":
            if char == ticket[at]:
                continue
            changed = ticket[:at] + char + ticket[at + 1 :]
            try:
                same_bytes = changed.startswith(TICKET_PREFIX) and decoded(changed) == body
            except ValueError:
                same_bytes = False
            if same_bytes:
                continue  # another spelling of the same bytes: the xfail test below
            tried += 1
            assert not box.check(LEASE, changed), (at, char)
    assert tried > 30 * len(ticket)


def _malleable_spellings(box: OutputTickets) -> list[tuple[str, str]]:
    """(lease, ticket) pairs where the ticket differs from the one issued for the lease
    in a single character yet decodes to the same bytes: the last character's unused
    low bits, or ``+``/``/`` for ``-``/``_``."""
    spellings = []
    for n in range(200):
        lease = f"lease-{n}"
        ticket, _ = box.issue(lease)
        if n == 0:
            last = _B64.index(ticket[-1])
            spellings.append((lease, ticket[:-1] + _B64[last ^ 1]))
        for url, std in (("-", "+"), ("_", "/")):
            body = ticket[len(TICKET_PREFIX) :]
            if url in body:
                spellings.append((lease, TICKET_PREFIX + body.replace(url, std, 1)))
                return spellings
    return spellings


def test_no_other_spelling_of_an_issued_ticket_is_accepted(tmp_path: Path) -> None:
    _, clock = fake_clock()
    box = tickets(tmp_path, clock)
    spellings = _malleable_spellings(box)
    assert len(spellings) == 2
    assert [box.check(lease, spelling) for lease, spelling in spellings] == [False, False]


def test_a_ticket_from_another_schedulers_key_fails(tmp_path: Path) -> None:
    _, clock = fake_clock()
    ours = tickets(tmp_path, clock, "ours.key")
    theirs = tickets(tmp_path, clock, "theirs.key")
    ticket, _ = theirs.issue(LEASE)
    assert theirs.check(LEASE, ticket)
    assert not ours.check(LEASE, ticket)
    assert (tmp_path / "ours.key").read_bytes() != (tmp_path / "theirs.key").read_bytes()


def test_replicas_sharing_the_key_file_accept_each_others_tickets(tmp_path: Path) -> None:
    _, clock = fake_clock()
    first = tickets(tmp_path, clock)
    second = tickets(tmp_path, clock)  # a second SecretBox on the same file
    one, _ = first.issue(LEASE)
    two, _ = second.issue(OTHER_LEASE)
    assert second.check(LEASE, one)
    assert first.check(OTHER_LEASE, two)
    assert not first.check(LEASE, two)


def _forged(expires_s: int) -> str:
    body = struct.pack(">Q", expires_s) + bytes(20)
    return TICKET_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


@pytest.mark.parametrize(
    "ticket",
    [
        "",
        "gso_",
        "gso_!!!",
        "gso_" + "A" * 9_996,
        "A" * 40,  # no prefix
        "gso_é" + "A" * 37,
        "gso_\u2603\u2603\u2603\u2603",
        "gso_\x00\x00\x00\x00",
        "gso_" + base64.urlsafe_b64encode(bytes(27)).decode(),  # one byte short
        "gso_" + base64.urlsafe_b64encode(bytes(29)).decode(),  # one byte long
        "gso_AAAA=AAAA",
        _forged(2**64 - 1),
        _forged(int(NOW + 60)),
    ],
)
def test_garbage_tickets_are_refused_without_raising(tmp_path: Path, ticket: str) -> None:
    _, clock = fake_clock()
    box = tickets(tmp_path, clock)
    assert box.check(LEASE, ticket) is False


def test_the_forged_never_expiring_ticket_has_the_right_shape(tmp_path: Path) -> None:
    """The 2**64-1 forgery above is refused by its MAC, not by its length or expiry."""
    forged = _forged(2**64 - 1)
    assert len(decoded(forged)) == 28
    _, clock = fake_clock()
    real, _ = tickets(tmp_path, clock).issue(LEASE)
    assert len(forged) == len(real)


# --- scheduler/output_fetch.py: mismatch reports (SQLite and PostgreSQL) ----------------

both_backends = pytest.mark.parametrize("storage_backend", ["sqlite", "postgresql"], indirect=True)


async def _record(
    db: Database, lease: str, reporter: str, node: str, now_ns: int, detail: str
) -> bool:
    return await db.call(
        lambda conn: output_fetch.record_mismatch(
            conn, lease_id=lease, reporter=reporter, node_id=node, now_ns=now_ns, detail=detail
        )
    )


@both_backends
@pytest.mark.asyncio
async def test_a_mismatch_is_kept_once_per_lease_and_reporter(db: Database) -> None:
    assert await _record(db, LEASE, "alice", "node-a", 2_000, "x" * 600)
    assert not await _record(db, LEASE, "alice", "node-a", 3_000, "again")
    assert await _record(db, LEASE, "bob", "node-a", 1_000, "size: signed 1, fetched 2")
    assert await _record(db, OTHER_LEASE, "alice", "node-a", 4_000, "digest")

    reports = await output_fetch.mismatches(db, "node-a")
    assert [(r.lease_id, r.reporter, r.reported_at_unix_nanos) for r in reports] == [
        (LEASE, "bob", 1_000),
        (LEASE, "alice", 2_000),
        (OTHER_LEASE, "alice", 4_000),
    ]
    # The first report stands; the repeat changed nothing. Detail is clipped.
    assert reports[1].detail == "x" * MAX_DETAIL_CHARS
    assert reports[0].detail == "size: signed 1, fetched 2"
    assert await output_fetch.mismatches(db, "node-b") == []


@both_backends
@pytest.mark.asyncio
async def test_mismatches_keeps_the_latest_hundred_oldest_first(db: Database) -> None:
    for n in range(105):
        assert await _record(db, f"lease-{n}", "alice", "node-a", 1_000 + n, str(n))
    reports = await output_fetch.mismatches(db, "node-a")
    assert [r.detail for r in reports] == [str(n) for n in range(5, 105)]


# --- agent/tunnel/outputs_http.py: parse_range ------------------------------------------

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"bytes=0-", (0, SIZE - 1)),
        (b"bytes=10-19", (10, 19)),
        (b"bytes=10-10", (10, 10)),
        (b"bytes=990-", (990, SIZE - 1)),
        (b"bytes=999-", (SIZE - 1, SIZE - 1)),
        (b"bytes=500-5000", (500, SIZE - 1)),
        (b" bytes=1-2 ", (1, 2)),
        (b"bytes=1000-", "unsatisfiable"),
        (b"bytes=1000-2000", "unsatisfiable"),
        (b"bytes=20-19", "unsatisfiable"),
        (b"bytes=-5", None),
        (b"items=0-1", None),
        (b"bytes=0-1,5-6", None),
        (b"bytes=" + b"9" * 25 + b"-", None),
        (b"bytes=0-" + b"9" * 25, None),
        (b"bytes=a-b", None),
        (b"", None),
    ],
)
def test_parse_range(header: bytes | None, expected: object) -> None:
    assert parse_range(header, SIZE) == expected


def test_parse_range_of_an_empty_archive_is_unsatisfiable() -> None:
    assert parse_range(b"bytes=0-", 0) == "unsatisfiable"
    assert parse_range(None, 0) is None


# --- agent/tunnel/outputs_http.py: serve ------------------------------------------------

DATA_BYTES = 3 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(DATA_BYTES)


def retained(tmp_path: Path, data: bytes, size: int | None = None) -> RetainedOutput:
    archive = tmp_path / f"{LEASE}.tar"
    archive.write_bytes(data)
    return RetainedOutput(
        lease_id=LEASE,
        archive=archive,
        size=len(data) if size is None else size,
        digest_hex="ab" * 32,
        retained_until_unix_nanos=0,
    )


class Wire:
    """An in-memory carried stream: the reads are given, the writes collected."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.written: list[bytes] = []
        self.eofs = 0

    async def read(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        self.eofs += 1
        assert self.eofs < 5, "serve kept reading after EOF"
        return b""

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    def stream(self) -> ByteStream:
        return ByteStream(self.read, self.write)


def raw(method: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} /_outputs/{LEASE} HTTP/1.1", "Host: relay"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request(method: str, headers: dict[str, str] | None = None) -> h11.Request:
    return h11.Request(
        method=method,
        target=f"/_outputs/{LEASE}",
        headers=[("Host", "relay"), *(headers or {}).items()],
    )


class Reply:
    def __init__(self, response: h11.Response, body: bytes, complete: bool) -> None:
        self.status = response.status_code
        self.headers = {k.decode(): v.decode() for k, v in response.headers}
        self.body = body
        self.complete = complete


def replies(requests: list[h11.Request], written: bytes) -> list[Reply]:
    """Parse what the server wrote as a client that sent ``requests``, in turn."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(written)
    out: list[Reply] = []
    for req in requests:
        if client.our_state is not h11.IDLE:
            break
        client.send(req)
        length = dict(req.headers).get(b"content-length")
        if length:
            client.send(h11.Data(data=b"x" * int(length)))
        client.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                out.append(Reply(response, bytes(body), True))
                break
            else:  # NEED_DATA: the server wrote no more
                if response is not None:
                    out.append(Reply(response, bytes(body), False))
                return out
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        else:
            break
    return out


async def exchange(
    output: RetainedOutput, chunks: list[bytes], requests: list[h11.Request]
) -> tuple[list[Reply], Wire]:
    wire = Wire(chunks)
    await serve(wire.stream(), output)
    return replies(requests, b"".join(wire.written)), wire


@pytest.mark.asyncio
async def test_a_get_is_answered_with_the_whole_archive_in_frames(
    tmp_path: Path, data: bytes
) -> None:
    (reply,), wire = await exchange(retained(tmp_path, data), [raw("GET")], [request("GET")])
    assert reply.status == 200
    assert reply.complete
    assert reply.headers["content-length"] == str(DATA_BYTES)
    assert reply.headers["content-type"] == "application/x-tar"
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["x-output-digest"] == "ab" * 32
    assert "content-range" not in reply.headers
    assert reply.body == data
    # Read and written a frame at a time: never the whole archive in one write.
    assert max(len(w) for w in wire.written) <= FRAME_BYTES
    assert sum(1 for w in wire.written if len(w) == FRAME_BYTES) == 3


@pytest.mark.asyncio
async def test_a_request_arriving_a_byte_at_a_time_is_answered(tmp_path: Path, data: bytes) -> None:
    head = raw("GET", {"Range": "bytes=5-9"})
    (reply,), _ = await exchange(
        retained(tmp_path, data),
        [head[i : i + 1] for i in range(len(head))],
        [request("GET", {"Range": "bytes=5-9"})],
    )
    assert (reply.status, reply.body) == (206, data[5:10])


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=10-19", 10, 19),
        ("bytes=0-", 0, DATA_BYTES - 1),
        (f"bytes={DATA_BYTES - 17}-", DATA_BYTES - 17, DATA_BYTES - 1),
        (f"bytes=1048570-{DATA_BYTES + 99}", 1048570, DATA_BYTES - 1),
    ],
)
@pytest.mark.asyncio
async def test_a_range_is_answered_206_with_its_span(
    tmp_path: Path, data: bytes, spec: str, first: int, last: int
) -> None:
    (reply,), _ = await exchange(
        retained(tmp_path, data), [raw("GET", {"Range": spec})], [request("GET", {"Range": spec})]
    )
    assert reply.status == 206
    assert reply.complete
    assert reply.headers["content-range"] == f"bytes {first}-{last}/{DATA_BYTES}"
    assert reply.headers["content-length"] == str(last - first + 1)
    assert reply.body == data[first : last + 1]


@pytest.mark.asyncio
async def test_a_range_past_the_end_is_416_and_closes(tmp_path: Path, data: bytes) -> None:
    spec = f"bytes={DATA_BYTES}-"
    replies_, _ = await exchange(
        retained(tmp_path, data),
        [raw("GET", {"Range": spec}) + raw("GET")],  # the second is never answered
        [request("GET", {"Range": spec}), request("GET")],
    )
    assert len(replies_) == 1
    (reply,) = replies_
    assert reply.status == 416
    assert reply.headers["content-range"] == f"bytes */{DATA_BYTES}"
    assert reply.headers["connection"] == "close"
    assert b"past the end" in reply.body


@pytest.mark.asyncio
async def test_head_gives_the_headers_and_no_body(tmp_path: Path, data: bytes) -> None:
    (reply,), wire = await exchange(retained(tmp_path, data), [raw("HEAD")], [request("HEAD")])
    assert reply.status == 200
    assert reply.headers["content-length"] == str(DATA_BYTES)
    assert reply.headers["x-output-digest"] == "ab" * 32
    assert reply.body == b""
    assert sum(len(w) for w in wire.written) < 1024


@pytest.mark.asyncio
async def test_post_is_405_and_closes(tmp_path: Path, data: bytes) -> None:
    post = request("POST", {"Content-Length": "3"})
    replies_, _ = await exchange(
        retained(tmp_path, data),
        [raw("POST", {"Content-Length": "3"}, b"abc") + raw("GET")],
        [post, request("GET")],
    )
    assert [r.status for r in replies_] == [405]
    assert replies_[0].headers["connection"] == "close"
    assert b"GET or HEAD" in replies_[0].body


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.asyncio
async def test_two_keep_alive_gets_on_one_stream_are_both_answered(
    tmp_path: Path, data: bytes, pipelined: bool
) -> None:
    first, second = raw("GET"), raw("GET", {"Range": "bytes=100-"})
    chunks = [first + second] if pipelined else [first, second]
    (one, two), wire = await exchange(
        retained(tmp_path, data), chunks, [request("GET"), request("GET", {"Range": "bytes=100-"})]
    )
    assert (one.status, one.body == data, one.complete) == (200, True, True)
    assert (two.status, two.body == data[100:], two.complete) == (206, True, True)
    assert wire.eofs == 1  # it then returned at the relay's EOF


@pytest.mark.asyncio
async def test_a_missing_archive_file_is_404(tmp_path: Path, data: bytes) -> None:
    output = retained(tmp_path, data)
    output.archive.unlink()
    (reply,), _ = await exchange(output, [raw("GET")], [request("GET")])
    assert reply.status == 404
    assert reply.headers["connection"] == "close"
    assert b"unreadable" in reply.body


@pytest.mark.asyncio
async def test_an_archive_shorter_than_its_size_ends_the_body_short(
    tmp_path: Path, data: bytes
) -> None:
    output = retained(tmp_path, data[:1000], size=5000)
    (reply,), _ = await exchange(output, [raw("GET"), raw("GET")], [request("GET")])
    assert reply.headers["content-length"] == "5000"
    assert reply.body == data[:1000]
    assert not reply.complete  # the client sees a short body, not a complete 5000


@pytest.mark.asyncio
async def test_an_archive_longer_than_its_size_is_served_to_its_size(
    tmp_path: Path, data: bytes
) -> None:
    output = retained(tmp_path, data[:5000], size=1000)
    (reply,), _ = await exchange(output, [raw("GET")], [request("GET")])
    assert (reply.status, reply.body, reply.complete) == (200, data[:1000], True)


@pytest.mark.asyncio
async def test_eof_before_any_request_returns_quietly(tmp_path: Path, data: bytes) -> None:
    wire = Wire([])
    await serve(wire.stream(), retained(tmp_path, data))
    assert wire.written == []


@pytest.mark.parametrize(
    "chunks",
    [
        [b"garbage\r\n\r\n"],
        [b"GET / HTTP/1.1\r\nHost: x\r\n"],  # EOF in the middle of the head
        [b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000],  # a head over 16 KiB
    ],
)
@pytest.mark.asyncio
async def test_a_malformed_request_gets_a_400_and_nothing_else(
    tmp_path: Path, data: bytes, chunks: list[bytes]
) -> None:
    """A request h11 cannot parse (garbage, a head cut off; 431 for one over 16 KiB) is
    answered 400 with the reason, the stream ends, and no byte of the archive is sent."""
    wire = Wire(chunks)
    await serve(wire.stream(), retained(tmp_path, data))
    sent = b"".join(wire.written)
    expected = (
        b"HTTP/1.1 431 Request Header Fields Too Large"
        if len(chunks[0]) > 16384
        else b"HTTP/1.1 400 Bad Request"
    )
    assert sent.startswith(expected), sent[:80]
    assert b"bad request:" in sent and data[:64] not in sent


# --- scheduler/cmd_output.py ------------------------------------------------------------

DIGEST = bytes(range(32))
OUT_SIZE = 12345


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def download(
    key: Ed25519PrivateKey,
    *,
    lease: str = LEASE,
    signed_size: int = OUT_SIZE,
    signed_chunk: int = CHUNK_BYTES,
) -> leases_pb2.OutputDownload:
    node = node_id_from_public_key(raw_public(key))
    signature = key.sign(
        output_commitment_signing_bytes(lease, node, DIGEST, signed_size, signed_chunk)
    )
    return leases_pb2.OutputDownload(
        lease_id=lease,
        commitment=leases_pb2.OutputCommitment(
            lease_id=lease,
            node_id=node,
            digest=DIGEST,
            size=OUT_SIZE,
            chunk_bytes=CHUNK_BYTES,
            signature=signature,
        ),
        node_public_key=raw_public(key),
    )


def test_a_good_commitment_has_no_problem() -> None:
    assert commitment_problem(download(Ed25519PrivateKey.generate())) == ""


def test_a_commitment_with_another_nodes_key_names_both_nodes() -> None:
    good = download(Ed25519PrivateKey.generate())
    other = Ed25519PrivateKey.generate()
    good.node_public_key = raw_public(other)
    problem = commitment_problem(good)
    assert good.commitment.node_id in problem
    assert node_id_from_public_key(raw_public(other)) in problem


def test_an_unusable_public_key_is_named() -> None:
    bad = download(Ed25519PrivateKey.generate())
    bad.node_public_key = bad.node_public_key[:31]
    assert "public key is unusable" in commitment_problem(bad)


@pytest.mark.parametrize(
    "change",
    [
        {"signed_size": OUT_SIZE + 1},
        {"signed_chunk": 4096},
    ],
)
def test_a_signature_over_other_fields_does_not_verify(change: dict[str, int]) -> None:
    bad = download(Ed25519PrivateKey.generate(), **change)
    assert "does not verify" in commitment_problem(bad)


def test_a_missing_or_foreign_signature_does_not_verify() -> None:
    bad = download(Ed25519PrivateKey.generate())
    bad.commitment.signature = b""
    assert "does not verify" in commitment_problem(bad)
    bad.commitment.signature = download(Ed25519PrivateKey.generate()).commitment.signature
    assert "does not verify" in commitment_problem(bad)


def test_a_commitment_for_another_lease_names_both() -> None:
    bad = download(Ed25519PrivateKey.generate(), lease=OTHER_LEASE)
    bad.lease_id = LEASE
    problem = commitment_problem(bad)
    assert LEASE in problem
    assert OTHER_LEASE in problem


def test_a_short_digest_is_malformed() -> None:
    bad = download(Ed25519PrivateKey.generate())
    bad.commitment.digest = DIGEST[:31]
    assert "malformed" in commitment_problem(bad)


def test_differences_names_only_what_differs() -> None:
    c = download(Ed25519PrivateKey.generate()).commitment
    other = bytes(32)
    assert differences(c, DIGEST, OUT_SIZE) == []
    (size_line,) = differences(c, DIGEST, OUT_SIZE + 1)
    assert size_line.startswith("size:")
    assert str(OUT_SIZE) in size_line and str(OUT_SIZE + 1) in size_line
    (digest_line,) = differences(c, other, OUT_SIZE)
    assert digest_line.startswith("digest:")
    assert DIGEST.hex() in digest_line and other.hex() in digest_line
    both = differences(c, other, 0)
    assert [line.split(":")[0] for line in both] == ["size", "digest"]
