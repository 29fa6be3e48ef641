"""Attestation messages: protobuf <-> the library's dataclasses, in one place.

``gpuagent.attest`` (prover and verifier) speaks plain dataclasses; the link speaks
``gpuagent.v1.attestation_pb2``. Both the agent and the scheduler convert here, so
the two directions cannot drift apart. Converting *from* protobuf never trusts the
peer: it only maps fields (the prover and verifier validate sizes, nonces and
signatures), and the few shapes that cannot map raise ``WireError`` naming the field.
"""

from __future__ import annotations

from gpuagent.attest.messages import (
    Challenge,
    Commitment,
    GpuIdentity,
    MatmulTask,
    OpenedRow,
    Openings,
    Reveal,
    Verdict,
)
from gpuagent.v1 import attestation_pb2

_NS = 1_000_000_000


class WireError(ValueError):
    """A protobuf attestation message that cannot become a library message."""


def challenge_to_pb(challenge: Challenge) -> attestation_pb2.AttestationChallenge:
    return attestation_pb2.AttestationChallenge(
        challenge_id=challenge.challenge_id,
        nonce=challenge.nonce,
        tasks=[
            attestation_pb2.AttestationTask(
                gpu_uuid=t.gpu_uuid,
                n=t.n,
                k=t.inner,
                dtype=t.dtype,
                bandwidth_probe_bytes=t.bandwidth_probe_bytes,
                sku=t.sku_id,
            )
            for t in challenge.tasks
        ],
        deadline_unix_nanos=round(challenge.expires_unix_s * _NS),
    )


def challenge_from_pb(pb: attestation_pb2.AttestationChallenge) -> Challenge:
    if not pb.challenge_id:
        raise WireError("attestation_challenge.challenge_id is empty")
    tasks = []
    seen: set[str] = set()
    for index, t in enumerate(pb.tasks):
        if not t.gpu_uuid:
            raise WireError(f"attestation_challenge.tasks[{index}].gpu_uuid is empty")
        if t.gpu_uuid in seen:
            # Two tasks for one GPU would run two matmuls on it and time both wrong.
            raise WireError(f"attestation_challenge.tasks[{index}]: GPU {t.gpu_uuid} repeated")
        seen.add(t.gpu_uuid)
        tasks.append(
            MatmulTask(
                gpu_uuid=t.gpu_uuid,
                sku_id=t.sku,
                n=t.n,
                inner=t.k,
                dtype=t.dtype or "fp16",
                bandwidth_probe_bytes=t.bandwidth_probe_bytes,
            )
        )
    return Challenge(
        challenge_id=pb.challenge_id,
        nonce=pb.nonce,
        tasks=tuple(tasks),
        expires_unix_s=pb.deadline_unix_nanos / _NS,
    )


def identity_to_pb(identity: GpuIdentity) -> attestation_pb2.GpuIdentity:
    return attestation_pb2.GpuIdentity(
        uuid=identity.uuid,
        name=identity.name,
        serial=identity.serial,
        pci_bus_id=identity.pci_bus_id,
        memory_total_bytes=identity.memory_total_bytes,
    )


def identity_from_pb(pb: attestation_pb2.GpuIdentity) -> GpuIdentity:
    return GpuIdentity(
        uuid=pb.uuid,
        name=pb.name,
        serial=pb.serial,
        pci_bus_id=pb.pci_bus_id,
        memory_total_bytes=pb.memory_total_bytes,
    )


def commitment_to_pb(c: Commitment) -> attestation_pb2.AttestationCommit:
    return attestation_pb2.AttestationCommit(
        challenge_id=c.challenge_id,
        gpu_uuid=c.gpu_uuid,
        merkle_root=c.merkle_root,
        elapsed_ns=c.elapsed_ns,
        compute_ns=c.compute_ns,
        bandwidth_bytes_per_second=c.bandwidth_bytes_per_second,
        identity=identity_to_pb(c.identity),
        signature=c.signature,
        nonce=c.nonce,
        n=c.n,
        k=c.inner,
        dtype=c.dtype,
    )


def commit_error_pb(
    challenge_id: str, gpu_uuid: str, error: str
) -> attestation_pb2.AttestationCommit:
    """The commit an agent sends for a task it could not compute."""
    return attestation_pb2.AttestationCommit(
        challenge_id=challenge_id, gpu_uuid=gpu_uuid, error=error or "unspecified error"
    )


def commitment_from_pb(pb: attestation_pb2.AttestationCommit) -> Commitment:
    if pb.error:
        raise WireError(f"attestation_commit carries an error, not a commitment: {pb.error}")
    return Commitment(
        challenge_id=pb.challenge_id,
        nonce=pb.nonce,
        gpu_uuid=pb.gpu_uuid,
        n=pb.n,
        inner=pb.k,
        dtype=pb.dtype,
        merkle_root=pb.merkle_root,
        elapsed_ns=pb.elapsed_ns,
        compute_ns=pb.compute_ns,
        bandwidth_bytes_per_second=pb.bandwidth_bytes_per_second,
        identity=identity_from_pb(pb.identity),
        signature=pb.signature,
    )


def reveal_to_pb(reveal: Reveal) -> attestation_pb2.AttestationReveal:
    return attestation_pb2.AttestationReveal(
        challenge_id=reveal.challenge_id, gpu_uuid=reveal.gpu_uuid, rows=reveal.rows
    )


def reveal_from_pb(pb: attestation_pb2.AttestationReveal) -> Reveal:
    return Reveal(challenge_id=pb.challenge_id, gpu_uuid=pb.gpu_uuid, rows=tuple(pb.rows))


def openings_to_pb(openings: Openings) -> attestation_pb2.AttestationOpen:
    return attestation_pb2.AttestationOpen(
        challenge_id=openings.challenge_id,
        gpu_uuid=openings.gpu_uuid,
        rows=[
            attestation_pb2.OpenedRow(index=r.index, values=r.values, proof=r.proof)
            for r in openings.rows
        ],
    )


def openings_from_pb(pb: attestation_pb2.AttestationOpen) -> Openings:
    return Openings(
        challenge_id=pb.challenge_id,
        gpu_uuid=pb.gpu_uuid,
        rows=tuple(
            OpenedRow(index=r.index, values=r.values, proof=tuple(r.proof)) for r in pb.rows
        ),
    )


def verdict_to_pb(
    verdict: Verdict, *, sku: str = "", elapsed_ns: int = 0
) -> attestation_pb2.AttestationResult:
    return attestation_pb2.AttestationResult(
        challenge_id=verdict.challenge_id,
        gpu_uuid=verdict.gpu_uuid,
        passed=verdict.passed,
        reason=verdict.reason,
        measured_tflops=verdict.measured_tflops,
        message=verdict.message,
        sku=sku,
        elapsed_ns=elapsed_ns,
    )


def verdict_from_pb(pb: attestation_pb2.AttestationResult) -> Verdict:
    return Verdict(
        challenge_id=pb.challenge_id,
        gpu_uuid=pb.gpu_uuid,
        passed=pb.passed,
        reason=pb.reason,
        message=pb.message,
        measured_tflops=pb.measured_tflops,
    )
