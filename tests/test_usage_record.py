"""The shared usage record: canonical bytes, signatures, validation."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gpuagent.usage import (
    ALL_UNMEASURED,
    USAGE_DOMAIN,
    CanonicalDecodeError,
    Unmeasured,
    UsageRecord,
    UsageRecordError,
    canonical_bytes,
    check_follows,
    decode_canonical,
    sign_record,
    validate_record,
    verify_record,
)

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
U32 = st.integers(0, 2**32 - 1)
IDS = st.text(min_size=0, max_size=40)

any_record = st.builds(
    UsageRecord,
    node_id=IDS,
    seq=U64,
    lease_id=IDS,
    start_unix_ns=I64,
    end_unix_ns=I64,
    duration_ns=U64,
    gpu_count=U32,
    gpu_ns=U64,
    gpu_util_permille=U32,
    peak_gpu_memory_bytes=U64,
    energy_mj=U64,
    energy_estimated=st.booleans(),
    cpu_usec=U64,
    peak_memory_bytes=U64,
    net_rx_bytes=U64,
    net_tx_bytes=U64,
    unmeasured=U32,
    final=st.booleans(),
)


def good_record(**changes: object) -> UsageRecord:
    record = UsageRecord(
        node_id="node-abc",
        seq=7,
        lease_id="lease-1",
        start_unix_ns=1_700_000_000_000_000_000,
        end_unix_ns=1_700_000_060_000_000_000,
        duration_ns=60_000_000_000,
        gpu_count=2,
        gpu_ns=120_000_000_000,
        gpu_util_permille=875,
        peak_gpu_memory_bytes=40 * 2**30,
        energy_mj=42_000_000,
        cpu_usec=59_000_000,
        peak_memory_bytes=2**30,
        net_rx_bytes=1234,
        net_tx_bytes=5678,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


@given(any_record)
def test_canonical_bytes_round_trip(record: UsageRecord) -> None:
    """Every encodable record decodes back to itself, and starts with the domain tag."""
    data = canonical_bytes(record)
    assert data.startswith(USAGE_DOMAIN)
    assert decode_canonical(data) == record


@given(any_record, any_record)
def test_canonical_bytes_are_injective(a: UsageRecord, b: UsageRecord) -> None:
    """Two different records never share canonical bytes (so never a signature)."""
    if a != b:
        assert canonical_bytes(a) != canonical_bytes(b)


def test_id_boundaries_cannot_be_shifted() -> None:
    """Length prefixes stop bytes moving between node_id and lease_id unnoticed."""
    a = good_record(node_id="node-ab", lease_id="c")
    b = good_record(node_id="node-a", lease_id="bc")
    assert canonical_bytes(a) != canonical_bytes(b)


def test_encoding_is_pinned() -> None:
    """The v1 layout is fixed: a change here breaks every stored signature."""
    data = canonical_bytes(good_record())
    assert data[: len(USAGE_DOMAIN)] == b"gpuagent.usage.v1\x00"
    pos = len(USAGE_DOMAIN)
    assert struct.unpack_from(">I", data, pos) == (8,)
    assert data[pos + 4 : pos + 12] == b"node-abc"
    assert struct.unpack_from(">Q", data, pos + 12) == (7,)
    # tag + 2 strings (4+8, 4+7) + 11 u64/i64 + 3 u32 + 2 bools
    assert len(data) == 18 + 12 + 11 + 11 * 8 + 3 * 4 + 2
    assert hashlib.sha256(data).hexdigest() == (
        "16e99f2a821235c71e61c6c809c4920dcb0f312018f8b83b106166d1bbf15291"
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x00", "trailing"),
        (lambda d: b"gpuagent.usage.v2\x00" + d[18:], "domain"),
        (lambda d: d[:-1] + b"\x02", "not 0 or 1"),
        (lambda d: d[:18] + b"\xff\xff\xff\xff" + d[22:], "bad length"),
    ],
)
def test_decoder_rejects_non_canonical_bytes(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    """Short, long, mis-tagged, bad-bool or bad-length input is refused with a reason."""
    with pytest.raises(CanonicalDecodeError, match=message):
        decode_canonical(mutate(canonical_bytes(good_record())))


def test_decoder_rejects_invalid_utf8() -> None:
    """An id that is not UTF-8 is not a canonical record."""
    data = bytearray(canonical_bytes(good_record()))
    data[22] = 0xFF  # first byte of node_id
    with pytest.raises(CanonicalDecodeError, match="UTF-8"):
        decode_canonical(bytes(data))


def test_unencodable_values_are_refused() -> None:
    """Negative counters and out-of-range widths cannot be encoded, hence not signed."""
    with pytest.raises(UsageRecordError, match="cpu_usec"):
        canonical_bytes(good_record(cpu_usec=-1))
    with pytest.raises(UsageRecordError, match="gpu_count"):
        canonical_bytes(good_record(gpu_count=2**32))
    with pytest.raises(UsageRecordError, match="final"):
        canonical_bytes(good_record(final=1))
    with pytest.raises(UsageRecordError, match="seq"):
        canonical_bytes(good_record(seq=True))


def test_signature_verifies_with_the_signing_key_only() -> None:
    """A record signed by the node verifies with its key and not with another node's."""
    key = Ed25519PrivateKey.generate()
    record = good_record()
    signature = sign_record(record, key.sign)
    assert verify_record(record, signature, key.public_key())
    assert not verify_record(record, signature, Ed25519PrivateKey.generate().public_key())


@given(
    field=st.sampled_from(
        [f.name for f in dataclasses.fields(UsageRecord) if f.name not in ("node_id", "lease_id")]
    ),
    bump=st.integers(1, 1000),
)
def test_any_altered_field_fails_verification(field: str, bump: int) -> None:
    """Changing any numeric or flag field after signing breaks the signature."""
    key = Ed25519PrivateKey.generate()
    record = good_record()
    signature = sign_record(record, key.sign)
    value = getattr(record, field)
    altered_value = (not value) if isinstance(value, bool) else value + bump
    altered = dataclasses.replace(record, **{field: altered_value})
    assert not verify_record(altered, signature, key.public_key())


def test_altered_ids_and_forged_signatures_fail() -> None:
    """Another lease id, a flipped signature bit or a truncated signature never verify."""
    key = Ed25519PrivateKey.generate()
    record = good_record()
    signature = sign_record(record, key.sign)
    assert not verify_record(good_record(lease_id="lease-2"), signature, key.public_key())
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_record(record, flipped, key.public_key())
    assert not verify_record(record, signature[:-1], key.public_key())
    assert not verify_record(record, b"\x00" * 64, key.public_key())


def test_signature_is_domain_separated() -> None:
    """A signature over the record's bytes without the domain tag does not verify."""
    key = Ed25519PrivateKey.generate()
    record = good_record()
    bare = canonical_bytes(record)[len(USAGE_DOMAIN) :]
    assert not verify_record(record, key.sign(bare), key.public_key())


def test_signer_returning_garbage_is_refused() -> None:
    """A signer that does not return 64 bytes is a bug caught before storing."""
    with pytest.raises(ValueError, match="64"):
        sign_record(good_record(), lambda _: b"short")


def test_validate_accepts_a_consistent_record() -> None:
    """The reference record passes every check."""
    validate_record(good_record())
    validate_record(good_record(unmeasured=int(ALL_UNMEASURED)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq": 0}, "seq"),
        ({"node_id": ""}, "node_id"),
        ({"lease_id": ""}, "lease_id"),
        ({"end_unix_ns": 1_600_000_000_000_000_000}, "before start"),
        ({"start_unix_ns": -5, "end_unix_ns": 0}, "before 1970"),
        ({"gpu_ns": 1}, "gpu_ns"),
        ({"gpu_util_permille": 1001}, "exceeds 1000"),
        ({"unmeasured": 1 << 10}, "unknown bits"),
        ({"energy_estimated": True, "unmeasured": int(Unmeasured.ENERGY)}, "energy_estimated"),
        ({"net_rx_bytes": -1}, "net_rx_bytes"),
    ],
)
def test_validate_rejects_inconsistent_records(changes: dict[str, object], message: str) -> None:
    """Each impossible combination is rejected with the offending field in the message."""
    with pytest.raises(UsageRecordError, match=message):
        validate_record(good_record(**changes))


def test_check_follows_rejects_overlap_and_records_after_final() -> None:
    """Contiguous records pass; an overlapping one or one after the final record fails."""
    first = good_record(seq=1)
    second = good_record(
        seq=2, start_unix_ns=first.end_unix_ns, end_unix_ns=first.end_unix_ns + 60 * 10**9
    )
    check_follows(None, first)
    check_follows(first, second)
    with pytest.raises(UsageRecordError, match="overlap"):
        check_follows(second, good_record(seq=3, end_unix_ns=second.end_unix_ns + 1))
    with pytest.raises(UsageRecordError, match="final"):
        final = dataclasses.replace(second, final=True)
        check_follows(
            final,
            good_record(seq=3, start_unix_ns=second.end_unix_ns, end_unix_ns=second.end_unix_ns),
        )
    with pytest.raises(UsageRecordError, match="does not follow"):
        check_follows(second, dataclasses.replace(second, seq=2))
