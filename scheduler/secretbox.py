"""Buyers' registry credentials, encrypted at rest (AES-256-GCM).

The key is 32 random bytes in ``secrets.key`` beside the database (0600, created
on first use), so a copy of the database alone — a backup, a support bundle —
does not reveal any buyer's registry password. The lease id is the associated
data: a ciphertext moved onto another lease's row does not decrypt.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE = "secrets.key"
_NONCE = 12


class SecretBoxError(Exception):
    """The key file is unusable or a ciphertext does not decrypt; the message says which."""


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._aead: AESGCM | None = None
        self._raw = b""

    def _key(self) -> AESGCM:
        if self._aead is None:
            path = self.key_path
            if not path.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(AESGCM.generate_key(bit_length=256))
            key = path.read_bytes()
            if len(key) != 32:
                raise SecretBoxError(f"{path}: expected a 32-byte key, found {len(key)} bytes")
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
            self._aead = AESGCM(key)
            self._raw = key
        return self._aead

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for ``purpose`` (HKDF-SHA256 of the box key), so another use of
        the same secret (MACs on output tickets) never reuses the AES key itself."""
        self._key()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(
            self._raw
        )

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._key().encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        try:
            return self._key().decrypt(sealed[:_NONCE], sealed[_NONCE:], context.encode())
        except Exception as exc:  # InvalidTag and friends: wrong key or tampered row
            raise SecretBoxError(f"cannot decrypt the secret of {context}: {exc!r}") from None
