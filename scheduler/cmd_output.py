"""``gpu-scheduler output LEASE -o results.tar``: fetch a lease's outputs and verify them.

The coordinator hands the lease's buyer a ticket and the node's signed commitment
(``Leases.OutputTicket``); the archive comes from the provider through the relay
(``/_outputs/<lease-id>``) into ``FILE.part``, resuming from what is already there;
then the whole file's Merkle root and size are checked against what the node signed.
Only a match becomes ``FILE`` and prints ``ok``. A mismatch keeps the bytes as
``FILE.mismatch``, names what differed, exits 1 and is reported against the node.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict

from gpuagent.outputs import CHUNK_BYTES, file_root, output_commitment_signing_bytes
from gpuagent.signing import node_id_from_public_key, verify_ed25519
from gpuagent.v1 import leases_pb2, leases_pb2_grpc

from .cli import UsageError, load_config_from_args
from .client import RpcFailed, connection_parent, invoke
from .cmd_nodes import format_size
from .tlsfiles import tls_dir

if TYPE_CHECKING:
    import httpx

MAX_REDIRECTS = 3
READ_BYTES = 1024 * 1024


class FetchError(Exception):
    """The download failed; the message says why (one line for the user)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()
    output = sub.add_parser(
        "output",
        parents=[conn],
        help="download a lease's outputs and verify them against the node's signature",
    )
    output.add_argument("lease_id", metavar="LEASE")
    output.add_argument(
        "-o", "--output", type=Path, default=None, help="where to write (default: LEASE.tar)"
    )
    output.add_argument(
        "--relay-ca-file",
        type=Path,
        default=None,
        help="CA of the relay's certificate (default: --ca-file, the scheduler's CA, "
        "then the system's)",
    )
    output.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    output.set_defaults(handler=_output)


def _output(args: argparse.Namespace) -> int:
    try:
        download = invoke(
            args,
            leases_pb2_grpc.LeasesStub,
            "OutputTicket",
            leases_pb2.OutputTicketRequest(lease_id=args.lease_id),
        )
    except RpcFailed:
        return 1
    commitment = download.commitment
    problem = commitment_problem(download)
    if problem:
        print(f"error: {problem}", file=sys.stderr)  # noqa: T201
        return 1
    target: Path = args.output or Path(f"{download.lease_id}.tar")
    part = target.with_name(target.name + ".part")
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        fetch(
            download.url,
            download.ticket,
            part,
            commitment.size,
            verify=_ssl_context(args),
            progress=Progress(commitment.size) if show else None,
        )
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        if part.exists():
            print(f"  {part} keeps what arrived; run again to resume", file=sys.stderr)  # noqa: T201
        return 1
    digest, size = file_root(part)
    differs = differences(commitment, digest, size)
    if differs:
        kept = target.with_name(target.name + ".mismatch")
        part.replace(kept)
        print(  # noqa: T201
            f"error: outputs of lease {download.lease_id} do not match what node "
            f"{commitment.node_id} signed: {'; '.join(differs)} (the bytes are in {kept})",
            file=sys.stderr,
        )
        _report(args, download.lease_id, digest, size, "; ".join(differs))
        return 1
    part.replace(target)
    if getattr(args, "json", False):
        print(  # noqa: T201
            json.dumps(
                {
                    "ok": True,
                    "file": str(target),
                    "lease_id": download.lease_id,
                    "commitment": MessageToDict(commitment, preserving_proto_field_name=True),
                },
                indent=2,
            )
        )
    else:
        print(  # noqa: T201
            f"ok {target}: {format_size(size)} ({size} bytes), {commitment.file_count} file(s), "
            f"digest {digest.hex()} signed by node {commitment.node_id}"
        )
        if commitment.missing:
            print(f"  declared but missing: {', '.join(commitment.missing)}")  # noqa: T201
    return 0


def commitment_problem(download: leases_pb2.OutputDownload) -> str:
    """Why the coordinator's commitment is not the node's word; "" when it is. The CLI
    checks the signature itself: a coordinator cannot vouch for bytes the node never
    signed."""
    c = download.commitment
    key = bytes(download.node_public_key)
    try:
        derived = node_id_from_public_key(key)
    except ValueError as exc:
        return f"the node's public key is unusable: {exc}"
    if derived != c.node_id:
        return f"the commitment names node {c.node_id}, but the key given is node {derived}'s"
    if c.chunk_bytes != CHUNK_BYTES:
        # The one leaf size everyone hashes with (the coordinator refuses others too).
        return f"the commitment's chunk_bytes is {c.chunk_bytes}, not {CHUNK_BYTES}"
    if c.lease_id != download.lease_id:
        return f"the commitment is for lease {c.lease_id}, not {download.lease_id}"
    try:
        message = output_commitment_signing_bytes(
            c.lease_id, c.node_id, bytes(c.digest), c.size, c.chunk_bytes
        )
    except ValueError as exc:
        return f"the commitment is malformed: {exc}"
    if not verify_ed25519(key, bytes(c.signature), message):
        return f"the commitment's signature does not verify with node {c.node_id}'s key"
    return ""


def differences(c: leases_pb2.OutputCommitment, digest: bytes, size: int) -> list[str]:
    """What the fetched archive has that differs from the commitment, in words."""
    found = []
    if size != c.size:
        found.append(f"size: signed {c.size} bytes, fetched {size}")
    if digest != bytes(c.digest):
        found.append(f"digest: signed {bytes(c.digest).hex()}, fetched {digest.hex()}")
    return found


def _report(args: argparse.Namespace, lease_id: str, digest: bytes, size: int, what: str) -> None:
    try:
        ack = invoke(
            args,
            leases_pb2_grpc.LeasesStub,
            "ReportOutputMismatch",
            leases_pb2.OutputMismatchReport(
                lease_id=lease_id, fetched_digest=digest, fetched_size=size, detail=what[:512]
            ),
        )
    except RpcFailed:
        return
    state = "recorded" if ack.recorded else "already recorded"
    print(f"  mismatch {state} against the node (nodes show)", file=sys.stderr)  # noqa: T201


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    ca: Path | None = args.relay_ca_file or getattr(args, "ca_file", None)
    if ca is None:
        try:
            generated = tls_dir(load_config_from_args(args)) / "ca.pem"
        except Exception:  # no readable config: the system's roots only
            generated = None
        ca = generated if generated is not None and generated.exists() else None
    context = ssl.create_default_context()
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the relay's CA {ca}: {exc}") from None
    return context


class Progress:
    """``  12.0 MiB / 40.0 MiB  30%  8.1 MiB/s`` on stderr, redrawn at most 10 times/s."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        self.drawn = 0.0
        self.first = 0

    def start(self, offset: int) -> None:
        self.first = offset
        self.started = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.drawn < 0.1:
            return
        self.drawn = now
        rate = (done - self.first) / max(now - self.started, 1e-6)
        share = f"{100 * done / self.total:3.0f}%" if self.total else "100%"
        line = (
            f"\r  {format_size(done)} / {format_size(self.total)}  {share}  "
            f"{format_size(int(rate))}/s"
        )
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


def fetch(
    url: str,
    ticket: str,
    part: Path,
    size: int,
    *,
    verify: ssl.SSLContext | bool,
    progress: Progress | None = None,
) -> None:
    """Download ``url`` into ``part`` until it holds ``size`` bytes, resuming from the
    bytes ``part`` already has. Raises FetchError with the relay's or agent's reason."""
    import httpx

    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        part.unlink()  # not a prefix of this archive: start over
        offset = 0
    if offset == size and size:
        return
    headers = {"authorization": f"Bearer {ticket}"}
    if offset:
        headers["range"] = f"bytes={offset}-"
    timeout = httpx.Timeout(60.0, connect=10.0)
    with httpx.Client(verify=verify, timeout=timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host, request_url = _loopback_for_localhost(url)
            extensions: dict[str, Any] = {"sni_hostname": host} if host else {}
            request_headers = dict(headers)
            if host:
                request_headers["host"] = httpx.URL(url).netloc.decode()
            try:
                with client.stream(
                    "GET", request_url, headers=request_headers, extensions=extensions
                ) as response:
                    if response.status_code in (301, 302, 307, 308):
                        # Another replica's relay holds the node's tunnel. The ticket is
                        # good at any replica, and unlike most clients we resend it there.
                        url = str(response.url.join(response.headers.get("location", "")))
                        continue
                    _write(response, part, offset, size, progress)
                    return
            except httpx.HTTPError as exc:
                raise FetchError(f"download from {url} failed: {exc!r}") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects from the relay")


def _write(
    response: httpx.Response, part: Path, offset: int, size: int, progress: Progress | None
) -> None:
    if response.status_code not in (200, 206):
        response.read()
        text = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
        raise FetchError(f"the relay answered {response.status_code}: {text}")
    if response.status_code == 200:
        offset = 0  # the whole archive came back (no resume): rewrite from the start
    mode = "ab" if offset else "wb"
    done = offset
    if progress is not None:
        progress.start(offset)
    with part.open(mode) as out:
        _copy(response, out, progress, done, size)


def _copy(
    response: httpx.Response, out: IO[bytes], progress: Progress | None, done: int, size: int
) -> None:
    for block in response.iter_bytes(READ_BYTES):
        out.write(block)
        done += len(block)
        if done > size:
            break  # more than was signed: the check after names it
        if progress is not None:
            progress.update(done)
    if progress is not None:
        progress.update(done, final=True)
    if done < size:
        out.flush()
        raise FetchError(f"the connection ended after {done} of {size} bytes")


def _loopback_for_localhost(url: str) -> tuple[str, str]:
    """A ``*.localhost`` relay (the demo, one machine): connect to 127.0.0.1, keep the
    name for TLS and Host (RFC 6761: such names are loopback; not every resolver says
    so). Returns ("", url) for any other host."""
    import httpx

    parsed = httpx.URL(url)
    host = parsed.host
    if host == "localhost" or host.endswith(".localhost"):
        return host, str(parsed.copy_with(host="127.0.0.1"))
    return "", url
