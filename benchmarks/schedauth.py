"""The benchmarks' scheduler credentials: a bootstrapped admin token over TLS.

Benchmarks run the real scheduler, so they authenticate like any client: the
first admin token from ``gpu-scheduler acl bootstrap`` (run on the database file
before the server starts), sent as call credentials on a TLS channel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc

BIN = Path(sys.executable).parent
# The benchmarks' agents are anonymous test nodes (enrolment is tested in tests/).
OPEN_REGISTRATION = {"registration": "open"}


def bootstrap_admin(config: Path, token_file: Path) -> str:
    """The admin token, bootstrapping it into ``token_file`` on first use."""
    if not token_file.exists():
        subprocess.run(
            [
                str(BIN / "gpu-scheduler"),
                "-c",
                str(config),
                "acl",
                "bootstrap",
                "--token-file",
                str(token_file),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return token_file.read_text(encoding="utf-8").strip()


def credentials(ca_file: Path, token: str) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes()),
        grpc.access_token_call_credentials(token),
    )
