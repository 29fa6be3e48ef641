"""Protocol-agnostic attestation messages and the canonical bytes signatures cover.

The gRPC layer maps these one to one; signatures never cover serialized protobuf
(not canonical across implementations) but the explicit byte strings built here:
a domain tag, then every field length-prefixed so no two messages share bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

COMMIT_DOMAIN = b"gpuagent.v1.attest.commit\x00"


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _u64(value: int) -> bytes:
    return _field(struct.pack(">Q", value))


@dataclass(frozen=True)
class MatmulTask:
    """One GPU's work: C = A (n x inner) @ B (inner x n), entries derived from the nonce."""

    gpu_uuid: str
    sku_id: str
    n: int
    inner: int
    dtype: str = "fp16"
    bandwidth_probe_bytes: int = 0  # 0 = skip the memory-bandwidth probe


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    nonce: bytes
    tasks: tuple[MatmulTask, ...]
    expires_unix_s: float  # commits arriving later are rejected as expired


@dataclass(frozen=True)
class GpuIdentity:
    """The NVML view of the GPU at commit time, bound into the signed commitment."""

    uuid: str
    name: str
    serial: str = ""
    pci_bus_id: str = ""
    memory_total_bytes: int = 0

    def canonical(self) -> bytes:
        return b"".join(
            _field(part.encode()) for part in (self.uuid, self.name, self.serial, self.pci_bus_id)
        ) + _u64(self.memory_total_bytes)


@dataclass(frozen=True)
class Commitment:
    challenge_id: str
    nonce: bytes
    gpu_uuid: str
    n: int
    inner: int
    dtype: str
    merkle_root: bytes
    elapsed_ns: int  # challenge received -> commit ready, prover's clock (informational)
    compute_ns: int  # the matmul alone, prover's clock (informational)
    bandwidth_bytes_per_second: float
    identity: GpuIdentity
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return COMMIT_DOMAIN + b"".join(
            (
                _field(self.challenge_id.encode()),
                _field(self.nonce),
                _field(self.gpu_uuid.encode()),
                _u64(self.n),
                _u64(self.inner),
                _field(self.dtype.encode()),
                _field(self.merkle_root),
                _u64(self.elapsed_ns),
                _u64(self.compute_ns),
                _field(struct.pack(">d", self.bandwidth_bytes_per_second)),
                _field(self.identity.canonical()),
            )
        )


@dataclass(frozen=True)
class Reveal:
    """Sent only after a commitment passed: the rows the prover must open.

    The columns the verifier checks inside those rows are never sent: revealing them
    would let a prover compute just those entries.
    """

    challenge_id: str
    gpu_uuid: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class OpenedRow:
    index: int
    values: bytes  # the row of C, little-endian int32
    proof: tuple[bytes, ...]  # Merkle siblings, leaf to root


@dataclass(frozen=True)
class Openings:
    challenge_id: str
    gpu_uuid: str
    rows: tuple[OpenedRow, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Verdict:
    challenge_id: str
    gpu_uuid: str
    passed: bool
    reason: str  # "ok" or a RejectReason value
    message: str
    measured_tflops: float = 0.0
