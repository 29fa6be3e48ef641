"""What every ``gpu-scheduler`` client command shares: connection options and calls.

Address and TLS default to the same config file ``serve`` reads (and its
auto-generated CA), so on the scheduler's host plain commands just work.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

import grpc

from .cli import UsageError, load_config_from_args
from .tlsfiles import tls_dir

DEFAULT_TIMEOUT = 5.0
TOKEN_ENV = "GPU_SCHEDULER_TOKEN"  # noqa: S105 - a variable name, not a secret
HOW_TO_GET_ONE = (
    "pass --token, set GPU_SCHEDULER_TOKEN or write it to ~/.config/gpu-scheduler/token "
    "(mode 0600); an admin creates one with 'gpu-scheduler tokens create ACCOUNT', and the "
    "first admin token comes from 'gpu-scheduler acl bootstrap' on the scheduler's host"
)


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
    conn.add_argument(
        "--token",
        default=s,
        help=f"API token (default: ${TOKEN_ENV}, else ~/.config/gpu-scheduler/token)",
    )
    return conn


def token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpu-scheduler" / "token"


class NoToken(Exception):
    """No usable token; the message says which source failed and how to get one."""


def resolve_token(args: argparse.Namespace) -> str:
    """The caller's token: --token, else $GPU_SCHEDULER_TOKEN, else the token file."""
    given = getattr(args, "token", None)
    if given:
        return str(given).strip()
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = token_file()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NoToken(f"no token: {HOW_TO_GET_ONE}") from None
    except OSError as exc:
        raise NoToken(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise NoToken(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); refusing to use it: "
            f"chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise NoToken(f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise NoToken(f"{path} is empty: {HOW_TO_GET_ONE}")
    return text


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
    """One unary call with the deadline from ``--timeout`` and the caller's token;
    errors print one line and raise RpcFailed."""
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    try:
        token = resolve_token(args)
    except NoToken as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        raise RpcFailed from None
    with channel(args) as ch:
        stub = stub_class(ch)
        try:
            return getattr(stub, method)(
                request, timeout=timeout, metadata=(("authorization", f"Bearer {token}"),)
            )
        except grpc.RpcError as exc:
            code = exc.code()
            hint = ""
            if code == grpc.StatusCode.UNAUTHENTICATED:
                hint = f" ({HOW_TO_GET_ONE})"
            print(f"error: {code.name}: {exc.details()}{hint}", file=sys.stderr)  # noqa: T201
            raise RpcFailed from None
