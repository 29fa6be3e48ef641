"""Canonical bytes that protocol signatures cover, shared by agent and coordinator.

Protobuf serialization is not canonical across implementations, so signatures
never cover serialized messages: they cover these explicit byte strings. Each
starts with a domain-separation tag so a signature made for one purpose can
never verify for another, and every variable-length part is length-prefixed so
no two different inputs produce the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

NODE_ID_PREFIX = "node-"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
HELLO_DOMAIN = b"gpuagent.v1.hello\x00"


def node_id_from_public_key(public_key: bytes) -> str:
    """``node-`` + lower base32 of the first 16 bytes of SHA-256(raw public key).

    128 bits keep collisions out of reach while the id stays short enough to type.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    digest = hashlib.sha256(public_key).digest()[:16]
    return NODE_ID_PREFIX + base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def hello_signing_bytes(
    nonce: bytes, node_id: str, public_key: bytes, protocol_version: str
) -> bytes:
    """What the agent signs in Hello: tag || len-prefixed nonce, node id, key, version."""
    return HELLO_DOMAIN + b"".join(
        _field(part) for part in (nonce, node_id.encode(), public_key, protocol_version.encode())
    )


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``; never raises."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


TUNNEL_HELLO_DOMAIN = b"gpuagent.v1.tunnel-hello\x00"


def tunnel_hello_signing_bytes(nonce: bytes, node_id: str, public_key: bytes) -> bytes:
    """What the agent signs to open a relay tunnel: its own tag, so a Hello signature
    (or any other) never opens a tunnel and a tunnel signature never opens a session."""
    return TUNNEL_HELLO_DOMAIN + b"".join(
        _field(part) for part in (nonce, node_id.encode(), public_key)
    )


BANDWIDTH_PROBE_DOMAIN = b"gpuagent.v1.bandwidth-probe\x00"


def bandwidth_probe_signing_bytes(node_id: str, at_unix_nanos: int, wanted_bytes: int) -> bytes:
    """What the agent signs in a BandwidthProbeRequest: tag || node id, time, size."""
    return BANDWIDTH_PROBE_DOMAIN + b"".join(
        (_field(node_id.encode()), struct.pack(">qQ", at_unix_nanos, wanted_bytes))
    )
