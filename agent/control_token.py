"""The local control token: who may drain or uncordon through the status endpoint.

The status endpoint listens on TCP (loopback by default), where any local user and
any web page the operator opens can send requests. Reads stay open (metrics and
status are for scrapers); actions need ``Authorization: Bearer`` with this token,
which lives in the agent's state directory (0600, like the node key), so only root
and the agent's own user — the ones who could stop the agent anyway — can act.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILE_NAME = "control.token"


def token_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load_or_create(state_dir: Path) -> str:
    """The token, made on first start (created 0600, never briefly readable by others)."""
    path = token_path(state_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    return token


def read(state_dir: Path) -> str:
    """The running agent's token, for ``gpu-agent drain``; OSError when unreadable."""
    return token_path(state_dir).read_text(encoding="utf-8").strip()
