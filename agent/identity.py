"""The node's Ed25519 identity, kept in the state dir across restarts.

The key is created on first start (mode 0600, in a directory the agent owns) and
the node id is derived from its public key, so re-registering with the same key
is the same node and nobody can claim a node id without holding its key.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuagent.signing import node_id_from_public_key

log = logging.getLogger(__name__)

KEY_FILE_NAME = "node.key"


class IdentityError(Exception):
    """The key cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey
    path: Path

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key_bytes)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def _check_permissions(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path}: node key is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"anyone who can read it can impersonate this node. Fix with: chmod 600 {path}"
        )


def _load(path: Path) -> NodeIdentity:
    _check_permissions(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: node key must be Ed25519, got {type(key).__name__}")
    return NodeIdentity(key, path)


def _create(path: Path) -> NodeIdentity:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: two agents racing on one state dir must not overwrite each other's key;
    # 0600 from creation, so the key is never readable by others, even briefly.
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the key meanwhile
    except FileExistsError:
        tmp.unlink()
        return _load(path)
    tmp.unlink()
    identity = NodeIdentity(key, path)
    log.info("created node identity", extra={"node_id": identity.node_id, "key": str(path)})
    return identity


def load_or_create(state_dir: Path) -> NodeIdentity:
    """The identity in ``state_dir``, created on first call; raises IdentityError."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"{state_dir}: cannot create the state dir: {exc.strerror}") from None
    path = state_dir / KEY_FILE_NAME
    try:
        if path.exists():
            return _load(path)
        return _create(path)
    except PermissionError:
        raise IdentityError(f"{path}: permission denied; run as the agent's user") from None
    except OSError as exc:
        raise IdentityError(f"{path}: {exc.strerror}") from None
