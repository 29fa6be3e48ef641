"""Endpoint tokens: what a buyer sends as ``Authorization: Bearer`` to reach a lease's ports.

The relay keeps only SHA-256 hashes (pulled with the lease's route and cached), so it
checks a request without touching the database and a leaked cache holds no token.
"""

from __future__ import annotations

import secrets

# The checking rules are shared with an agent in direct mode (one home).
from gpuagent.endpoint_tokens import MAX_TOKEN_CHARS, bearer, token_hash, token_matches

__all__ = ["MAX_TOKEN_CHARS", "TOKEN_PREFIX", "bearer", "new_token", "token_hash", "token_matches"]

# "gpu service port": greppable in leaked logs (like gh tokens); not a secret itself.
# Not gse_ (enrolment tokens, scheduler/auth/tokens.py): one prefix per kind of secret.
TOKEN_PREFIX = "gsp_"  # noqa: S105


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)
