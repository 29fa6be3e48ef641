"""Checking an endpoint token: what a buyer sends as ``Authorization: Bearer`` to reach a
service lease's ports. One home for the rule, shared by the relay (scheduler/relay/) and
an agent serving in direct mode (agent/direct/): both keep only the token's SHA-256, so
neither holds the token itself.
"""

from __future__ import annotations

import hashlib
import hmac

MAX_TOKEN_CHARS = 256


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
