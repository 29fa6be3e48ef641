"""What every ``gpu-scheduler`` client command shares: connection options and calls.

Address and TLS default to the same config file ``serve`` reads (and its
auto-generated CA), so on the scheduler's host plain commands just work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc

from .cli import UsageError, load_config_from_args
from .server import tls_dir

DEFAULT_TIMEOUT = 5.0


class RpcFailed(Exception):
    """The call failed; the error was already printed for the user."""


def connection_parent() -> argparse.ArgumentParser:
    """Options for reaching the server, accepted before or after a subcommand."""
    conn = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: options may come before or after an action without one hiding the other.
    s = argparse.SUPPRESS
    conn.add_argument("--address", default=s, help="host:port (default: server.listen)")
    conn.add_argument("--ca-file", type=Path, default=s, help="CA to verify the server")
    conn.add_argument("--client-cert", type=Path, default=s, help="mTLS client certificate")
    conn.add_argument("--client-key", type=Path, default=s, help="mTLS client key")
    conn.add_argument("--insecure", action="store_true", default=s, help="plaintext gRPC")
    conn.add_argument("--timeout", type=float, default=s, help="deadline in seconds (default 5)")
    conn.add_argument("--json", action="store_true", default=s, help="machine-readable output")
    return conn


def channel(args: argparse.Namespace) -> grpc.Channel:
    config = load_config_from_args(args)
    address = getattr(args, "address", None) or config.server.listen
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):  # noqa: S104 - a listen address, not a bind
        address = f"127.0.0.1:{port}"
    if getattr(args, "insecure", False) or (
        config.server.insecure and not hasattr(args, "ca_file")
    ):
        return grpc.insecure_channel(address)
    ca_file: Path | None = getattr(args, "ca_file", None)
    if ca_file is None and config.server.cert_file is None:
        generated = tls_dir(config) / "ca.pem"
        ca_file = generated if generated.exists() else None
    cert, key = getattr(args, "client_cert", None), getattr(args, "client_key", None)
    if (cert is None) != (key is None):
        raise UsageError("--client-cert and --client-key must be given together")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes() if ca_file else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.secure_channel(address, creds)


def invoke(args: argparse.Namespace, stub_class: Any, method: str, request: Any) -> Any:
    """One unary call with the deadline from ``--timeout``; errors print and raise RpcFailed."""
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    with channel(args) as ch:
        stub = stub_class(ch)
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # noqa: T201
            raise RpcFailed from None
