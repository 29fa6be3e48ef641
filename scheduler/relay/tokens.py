"""Endpoint tokens: what a buyer sends as ``Authorization: Bearer`` to reach a lease's ports.

The relay keeps only SHA-256 hashes (pulled with the lease's route and cached), so it
checks a request without touching the database and a leaked cache holds no token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

# "gpu service port": greppable in leaked logs (like gh tokens); not a secret itself.
# Not gse_ (enrolment tokens, scheduler/auth/tokens.py): one prefix per kind of secret.
TOKEN_PREFIX = "gsp_"  # noqa: S105
MAX_TOKEN_CHARS = 256


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", errors="replace")).digest()


def token_matches(token: str, expected_sha256: bytes) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    if not token or len(token) > MAX_TOKEN_CHARS or len(expected_sha256) != 32:
        return False
    return hmac.compare_digest(token_hash(token), expected_sha256)


def bearer(header: bytes | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; "" for none or another scheme."""
    if not header:
        return ""
    scheme, _, value = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()
