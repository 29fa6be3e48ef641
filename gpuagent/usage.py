"""Usage records: the billed unit, its canonical bytes and its Ed25519 signature.

Shared by the agent (which creates and signs records) and the coordinator (which
verifies and stores them), so both sides agree byte for byte on what a signature
covers. Everything billed is an integer: floats do not survive every language's
encoder and decoder bit for bit, and a bill must add up exactly.

Canonical encoding, version 1 (also in docs/metering.md)::

    "gpuagent.usage.v1" 0x00           domain-separation tag (18 bytes)
    str   node_id                      u32 big-endian byte length + UTF-8
    u64   seq
    str   lease_id
    i64   start_unix_ns                wall clock, for humans
    i64   end_unix_ns
    u64   duration_ns                  monotonic clock: what is billed
    u32   gpu_count
    u64   gpu_ns                       gpu_count * duration_ns
    u32   gpu_util_permille            time-weighted mean, 0..1000
    u64   peak_gpu_memory_bytes
    u64   energy_mj
    u8    energy_estimated             0 or 1
    u64   cpu_usec
    u64   peak_memory_bytes
    u64   net_rx_bytes
    u64   net_tx_bytes
    u32   unmeasured                   bit set of ``Unmeasured``
    u8    final                        0 or 1

Fields are fixed in order and width, strings are length-prefixed, and the
decoder rejects anything else (short input, trailing bytes, bools other than
0/1, invalid UTF-8), so exactly one byte string encodes each record. A change
to the layout gets a new tag (``...usage.v2``), never a silent reinterpretation.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

USAGE_DOMAIN = b"gpuagent.usage.v1\x00"
SIGNATURE_BYTES = 64
MAX_ID_BYTES = 256  # node and lease ids; bounds what a peer can make us store

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


class Unmeasured(enum.IntFlag):
    """Fields a record could not measure (reported as 0, never as a guess)."""

    GPU_UTIL = 1
    GPU_MEMORY = 2
    ENERGY = 4
    CPU = 8
    MEMORY = 16
    NETWORK = 32


ALL_UNMEASURED = (
    Unmeasured.GPU_UTIL
    | Unmeasured.GPU_MEMORY
    | Unmeasured.ENERGY
    | Unmeasured.CPU
    | Unmeasured.MEMORY
    | Unmeasured.NETWORK
)


class UsageRecordError(ValueError):
    """A record that must not be billed; the message names the field and why."""


class CanonicalDecodeError(ValueError):
    """Bytes that are not a canonical v1 usage record; the message says where."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One closed interval of one lease. ``seq`` is 0 until the outbox assigns it."""

    node_id: str
    seq: int
    lease_id: str
    start_unix_ns: int
    end_unix_ns: int
    duration_ns: int
    gpu_count: int
    gpu_ns: int
    gpu_util_permille: int = 0
    peak_gpu_memory_bytes: int = 0
    energy_mj: int = 0
    energy_estimated: bool = False
    cpu_usec: int = 0
    peak_memory_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    unmeasured: int = 0
    final: bool = False

    @property
    def gpu_seconds(self) -> float:
        """For display only; bill from ``gpu_ns``."""
        return self.gpu_ns / 1e9

    def with_seq(self, seq: int) -> UsageRecord:
        return dataclasses.replace(self, seq=seq)


@dataclass(frozen=True)
class SignedUsageRecord:
    record: UsageRecord
    signature: bytes


# (field name, struct code or "str"/"bool") in canonical order.
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("node_id", "str"),
    ("seq", "Q"),
    ("lease_id", "str"),
    ("start_unix_ns", "q"),
    ("end_unix_ns", "q"),
    ("duration_ns", "Q"),
    ("gpu_count", "I"),
    ("gpu_ns", "Q"),
    ("gpu_util_permille", "I"),
    ("peak_gpu_memory_bytes", "Q"),
    ("energy_mj", "Q"),
    ("energy_estimated", "bool"),
    ("cpu_usec", "Q"),
    ("peak_memory_bytes", "Q"),
    ("net_rx_bytes", "Q"),
    ("net_tx_bytes", "Q"),
    ("unmeasured", "I"),
    ("final", "bool"),
)
_RANGES = {"Q": (0, U64_MAX), "q": (I64_MIN, I64_MAX), "I": (0, U32_MAX)}


_U32 = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
# Everything after lease_id, in layout order, as one struct: decoding 100,000
# pending records at startup is one unpack each, not eighteen.
_TAIL_FIELDS = tuple(name for name, _ in _LAYOUT[3:])
_TAIL_BOOLS = tuple(i for i, (_, code) in enumerate(_LAYOUT[3:]) if code == "bool")
_TAIL = struct.Struct(">" + "".join("B" if code == "bool" else code for _, code in _LAYOUT[3:]))


def _check_field(name: str, code: str, value: object) -> None:
    if code == "str":
        if not isinstance(value, str):
            raise UsageRecordError(f"{name}: expected a string, got {type(value).__name__}")
    elif code == "bool":
        if not isinstance(value, bool):
            raise UsageRecordError(f"{name}: expected a bool, got {type(value).__name__}")
    else:
        # bool is an int subclass; a True seq is a bug, not the number 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageRecordError(f"{name}: expected an integer, got {type(value).__name__}")
        low, high = _RANGES[code]
        if not low <= value <= high:
            raise UsageRecordError(f"{name}: {value} is outside [{low}, {high}]")


def _encode_str(name: str, value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > MAX_ID_BYTES:
        raise UsageRecordError(f"{name}: {len(data)} bytes exceeds {MAX_ID_BYTES}")
    return _U32.pack(len(data)) + data


def canonical_bytes(record: UsageRecord) -> bytes:
    """The exact bytes a record's signature covers (see the module docstring).

    Raises UsageRecordError when a field does not fit its encoded width, so an
    unencodable record can never be signed.
    """
    for name, code in _LAYOUT:
        _check_field(name, code, getattr(record, name))
    return b"".join(
        (
            USAGE_DOMAIN,
            _encode_str("node_id", record.node_id),
            _SEQ.pack(record.seq),
            _encode_str("lease_id", record.lease_id),
            _TAIL.pack(*(getattr(record, name) for name in _TAIL_FIELDS)),
        )
    )


def _decode_str(name: str, data: bytes, pos: int) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise CanonicalDecodeError(f"{name}: truncated length at byte {pos}")
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    if length > MAX_ID_BYTES or pos + length > len(data):
        raise CanonicalDecodeError(f"{name}: bad length {length} at byte {pos - 4}")
    try:
        return data[pos : pos + length].decode("utf-8"), pos + length
    except UnicodeDecodeError:
        raise CanonicalDecodeError(f"{name}: not UTF-8") from None


def decode_canonical(data: bytes) -> UsageRecord:
    """The record whose canonical bytes are ``data``; raises CanonicalDecodeError."""
    if not data.startswith(USAGE_DOMAIN):
        raise CanonicalDecodeError("missing the gpuagent.usage.v1 domain tag")
    node_id, pos = _decode_str("node_id", data, len(USAGE_DOMAIN))
    if pos + _SEQ.size > len(data):
        raise CanonicalDecodeError(f"seq: truncated at byte {pos}")
    (seq,) = _SEQ.unpack_from(data, pos)
    lease_id, pos = _decode_str("lease_id", data, pos + _SEQ.size)
    if pos + _TAIL.size > len(data):
        raise CanonicalDecodeError(f"truncated at byte {pos}: {len(data) - pos} of {_TAIL.size}")
    if pos + _TAIL.size != len(data):
        raise CanonicalDecodeError(
            f"{len(data) - pos - _TAIL.size} trailing bytes after the record"
        )
    tail: list[Any] = list(_TAIL.unpack_from(data, pos))
    for index in _TAIL_BOOLS:
        if tail[index] not in (0, 1):
            name = _TAIL_FIELDS[index]
            raise CanonicalDecodeError(f"{name}: bool byte {tail[index]} is not 0 or 1")
        tail[index] = tail[index] == 1
    return UsageRecord(node_id, seq, lease_id, *tail)


def sign_record(record: UsageRecord, sign: Callable[[bytes], bytes]) -> bytes:
    """Ed25519 signature (via ``sign``, e.g. ``NodeIdentity.sign``) over the canonical bytes."""
    signature = sign(canonical_bytes(record))
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"signer returned {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    return signature


def verify_record(record: UsageRecord, signature: bytes, public_key: Ed25519PublicKey) -> bool:
    """True when ``signature`` is the node's signature of exactly this record; never raises."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        message = canonical_bytes(record)
        public_key.verify(signature, message)
    except (InvalidSignature, UsageRecordError):
        return False
    return True


def validate_record(record: UsageRecord) -> None:
    """Raise UsageRecordError unless the record is internally consistent.

    What a coordinator checks before storing; the agent checks it before signing,
    so a bug surfaces on the node rather than as a rejected bill.
    """
    canonical_bytes(record)  # types and widths: negative counters fail here
    if not record.node_id:
        raise UsageRecordError("node_id: empty")
    if not record.lease_id:
        raise UsageRecordError("lease_id: empty")
    if record.seq < 1:
        raise UsageRecordError(f"seq: {record.seq} (sequence numbers start at 1)")
    if record.start_unix_ns < 0:
        raise UsageRecordError(f"start_unix_ns: {record.start_unix_ns} is before 1970")
    if record.end_unix_ns < record.start_unix_ns:
        raise UsageRecordError(
            f"end_unix_ns: {record.end_unix_ns} is before start_unix_ns {record.start_unix_ns}"
        )
    if record.gpu_ns != record.gpu_count * record.duration_ns:
        raise UsageRecordError(
            f"gpu_ns: {record.gpu_ns} != gpu_count {record.gpu_count} "
            f"x duration_ns {record.duration_ns}"
        )
    if record.gpu_util_permille > 1000:
        raise UsageRecordError(f"gpu_util_permille: {record.gpu_util_permille} exceeds 1000")
    if record.unmeasured & ~int(ALL_UNMEASURED):
        raise UsageRecordError(f"unmeasured: unknown bits {record.unmeasured:#x}")
    if record.energy_estimated and record.unmeasured & Unmeasured.ENERGY:
        raise UsageRecordError("energy_estimated: set on a record whose energy is unmeasured")


def check_follows(previous: UsageRecord | None, record: UsageRecord) -> None:
    """Raise UsageRecordError unless ``record`` may follow ``previous`` of the same lease.

    Intervals of one lease must not overlap (a record starting before the last one
    ended bills the same time twice) and nothing may follow a lease's final record.
    The agent makes consecutive intervals share their boundary exactly, so a start
    later than the previous end is a gap a coordinator may flag rather than reject.
    """
    if previous is None:
        return
    if previous.lease_id != record.lease_id or previous.node_id != record.node_id:
        raise UsageRecordError("check_follows: records of different leases or nodes")
    if record.seq <= previous.seq:
        raise UsageRecordError(f"seq: {record.seq} does not follow {previous.seq}")
    if previous.final:
        raise UsageRecordError(
            f"lease {record.lease_id}: record seq {record.seq} follows the final record "
            f"seq {previous.seq}"
        )
    if record.start_unix_ns < previous.end_unix_ns:
        raise UsageRecordError(
            f"lease {record.lease_id}: record seq {record.seq} starts at {record.start_unix_ns}, "
            f"before seq {previous.seq} ended at {previous.end_unix_ns} (overlap)"
        )
