"""Node identity: key file lifecycle and the canonical bytes signatures cover."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.identity import KEY_FILE_NAME, IdentityError, load_or_create
from gpuagent.signing import hello_signing_bytes, node_id_from_public_key, verify_ed25519


def test_key_is_created_0600_and_survives_restart(tmp_path: Path) -> None:
    """First start writes a 0600 key; the next start loads the same key and node id."""
    first = load_or_create(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_or_create(tmp_path / "state")
    assert second.node_id == first.node_id
    assert second.public_key_bytes == first.public_key_bytes


def test_node_id_derives_from_public_key(tmp_path: Path) -> None:
    """The node id is node- plus 26 lower base32 chars of SHA-256(public key)."""
    ident = load_or_create(tmp_path)
    assert ident.node_id == node_id_from_public_key(ident.public_key_bytes)
    assert ident.node_id.startswith("node-") and len(ident.node_id) == 5 + 26
    assert ident.node_id == ident.node_id.lower()
    assert load_or_create(tmp_path / "other").node_id != ident.node_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A key with any group/other bit is refused, with the chmod that fixes it."""
    load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    path.chmod(mode)
    with pytest.raises(IdentityError, match=rf"chmod 600 {path}") as info:
        load_or_create(tmp_path)
    assert f"{mode:04o}" in str(info.value)


def test_garbage_key_file_is_a_clear_error(tmp_path: Path) -> None:
    """A corrupt key file is reported with its path, not a traceback."""
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        load_or_create(tmp_path)


def test_signature_verifies_only_for_the_signed_bytes(tmp_path: Path) -> None:
    """A Hello signature verifies with its key over its nonce, and fails on any change."""
    ident = load_or_create(tmp_path)
    pub = ident.public_key_bytes
    msg = hello_signing_bytes(b"n" * 32, ident.node_id, pub, "1.0")
    sig = ident.sign(msg)
    assert verify_ed25519(pub, sig, msg)
    assert not verify_ed25519(pub, sig, hello_signing_bytes(b"m" * 32, ident.node_id, pub, "1.0"))
    assert not verify_ed25519(pub, sig[:-1] + bytes([sig[-1] ^ 1]), msg)
    assert not verify_ed25519(load_or_create(tmp_path / "x").public_key_bytes, sig, msg)
    assert not verify_ed25519(pub[:5], sig, msg)  # malformed key: False, never an exception


@given(
    a=st.tuples(
        st.binary(max_size=8), st.text(max_size=4), st.binary(max_size=8), st.text(max_size=4)
    ),
    b=st.tuples(
        st.binary(max_size=8), st.text(max_size=4), st.binary(max_size=8), st.text(max_size=4)
    ),
)
def test_hello_signing_bytes_are_injective(
    a: tuple[bytes, str, bytes, str], b: tuple[bytes, str, bytes, str]
) -> None:
    """Different inputs never give the same signed bytes (length prefixes, no ambiguity)."""
    if a != b:
        assert hello_signing_bytes(*a) != hello_signing_bytes(*b)
