"""API and enrolment tokens: random, prefixed, stored only as a hash.

A token reads ``gst_<id>_<secret>`` (API) or ``gse_<id>_<secret>`` (enrolment):
the prefix makes a leaked token recognisable to secret scanners, ``<id>`` (12 hex
digits) names it in lists and revocations without revealing it, and ``<secret>``
carries 256 random bits. With that much entropy a fast hash is enough (a slow
password hash protects guessable secrets); SHA-256 of the whole token is stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Literal

Kind = Literal["api", "enrollment"]
PREFIXES: dict[Kind, str] = {"api": "gst_", "enrollment": "gse_"}
MAX_TOKEN_CHARS = 128
_SHAPE = re.compile(r"^(gst|gse)_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class MalformedToken(ValueError):
    """Not a token this scheduler issues; the message says what is wrong with it."""


def new_token(kind: Kind) -> tuple[str, str]:
    """(token_id, whole token)."""
    token_id = secrets.token_hex(6)
    return token_id, f"{PREFIXES[kind]}{token_id}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse(token: str) -> tuple[Kind, str]:
    """(kind, token_id) of a well-formed token, else MalformedToken."""
    if len(token) > MAX_TOKEN_CHARS:
        raise MalformedToken(f"token is {len(token)} characters; tokens have 61")
    match = _SHAPE.match(token)
    if match is None:
        raise MalformedToken("not a gpu-scheduler token (they look like gst_<12 hex>_<43 chars>)")
    kind: Kind = "api" if match.group(1) == "gst" else "enrollment"
    return kind, match.group(2)
