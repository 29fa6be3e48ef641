"""Attestation messages survive protobuf both ways; what cannot map is refused by name."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.attest.backends import NumpyBackend
from gpuagent import attestation_wire as wire
from gpuagent import bounds
from gpuagent.attest.messages import GpuIdentity, Verdict
from gpuagent.attest.prover import Prover
from gpuagent.attest.skus import AcceptanceBand, SkuSpec
from gpuagent.attest.verifier import Verifier
from gpuagent.v1 import attestation_pb2, coordinator_pb2

NAME = "Wire Test GPU"
MEMORY = 1024**3
SKU = SkuSpec(
    "wire", NAME, (NAME,), 1024, MEMORY, 1e9, 1e9, 1e9, 1e12, "test",
    AcceptanceBand(fixed_overhead_s=30.0),
)  # fmt: skip
UUIDS = ("GPU-aaaa", "GPU-bbbb")


def _identity(uuid: str) -> GpuIdentity:
    return GpuIdentity(uuid, NAME, "SER1", "0000:17:00.0", MEMORY)


def _pair() -> tuple[Verifier, Prover, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    verifier = Verifier(skus={"wire": SKU}, rng=random.Random(7))  # noqa: S311 - reproducible
    return verifier, Prover(key.sign, NumpyBackend(), _identity), key


def test_full_round_trip_through_protobuf_verifies() -> None:
    """Challenge, commitment, reveal and openings go through serialized protobuf in both
    directions and the verifier still accepts: signed bytes and row bytes are unchanged."""
    verifier, prover, key = _pair()
    challenge = verifier.issue(key.public_key(), [(u, "wire") for u in UUIDS], sizes=(32, 64))
    verifier.prepare(challenge.challenge_id)

    def through(
        message: coordinator_pb2.AgentMessage | coordinator_pb2.CoordinatorMessage,
    ) -> bytes:
        return message.SerializeToString()

    sent = coordinator_pb2.CoordinatorMessage(attestation_challenge=wire.challenge_to_pb(challenge))
    got = coordinator_pb2.CoordinatorMessage.FromString(through(sent)).attestation_challenge
    received = wire.challenge_from_pb(got)
    assert received.challenge_id == challenge.challenge_id
    assert received.nonce == challenge.nonce
    assert received.tasks == challenge.tasks  # n, inner, dtype, sku all carried
    assert received.expires_unix_s == pytest.approx(challenge.expires_unix_s, abs=1e-6)

    for task in received.tasks:
        commitment = prover.commit(received, task)
        pb = coordinator_pb2.AgentMessage(attestation_commit=wire.commitment_to_pb(commitment))
        back = wire.commitment_from_pb(
            coordinator_pb2.AgentMessage.FromString(through(pb)).attestation_commit
        )
        assert back == commitment
        assert back.signing_bytes() == commitment.signing_bytes()

        reveal = verifier.check_commitment(back)
        reveal_pb = coordinator_pb2.CoordinatorMessage(attestation_reveal=wire.reveal_to_pb(reveal))
        reveal_back = wire.reveal_from_pb(
            coordinator_pb2.CoordinatorMessage.FromString(through(reveal_pb)).attestation_reveal
        )
        assert reveal_back == reveal

        openings = prover.open(reveal_back)
        open_pb = coordinator_pb2.AgentMessage(attestation_open=wire.openings_to_pb(openings))
        open_back = wire.openings_from_pb(
            coordinator_pb2.AgentMessage.FromString(through(open_pb)).attestation_open
        )
        assert open_back == openings
        verdict = verifier.check_openings(open_back)
        assert verdict.passed and verdict.reason == "ok"


def test_verdict_maps_with_sku_and_elapsed() -> None:
    """A verdict carries its figures and the SKU judged against; the agent reads them back."""
    verdict = Verdict("att-1", "GPU-aaaa", False, "too_slow", "committed after 9s", 1.5)
    pb = wire.verdict_to_pb(verdict, sku="rtx-4090", elapsed_ns=9_000_000_000)
    assert (pb.sku, pb.elapsed_ns) == ("rtx-4090", 9_000_000_000)
    assert wire.verdict_from_pb(pb) == verdict


def test_error_commit_is_not_a_commitment() -> None:
    """A commit carrying the agent's error converts to an error, never to an empty
    commitment the verifier would judge as a malformed proof."""
    pb = wire.commit_error_pb("att-1", "GPU-aaaa", "task n=70000 out of range")
    assert pb.error and not pb.signature
    with pytest.raises(wire.WireError, match="out of range"):
        wire.commitment_from_pb(pb)


@pytest.mark.parametrize(
    ("challenge", "complaint"),
    [
        (attestation_pb2.AttestationChallenge(nonce=b"x" * 32), "challenge_id is empty"),
        (
            attestation_pb2.AttestationChallenge(
                challenge_id="c", tasks=[attestation_pb2.AttestationTask(n=4, k=4)]
            ),
            r"tasks\[0\].gpu_uuid is empty",
        ),
        (
            attestation_pb2.AttestationChallenge(
                challenge_id="c",
                tasks=[
                    attestation_pb2.AttestationTask(gpu_uuid="GPU-a", n=4, k=4),
                    attestation_pb2.AttestationTask(gpu_uuid="GPU-a", n=4, k=4),
                ],
            ),
            r"tasks\[1\]: GPU GPU-a repeated",
        ),
    ],
)
def test_malformed_challenge_is_refused_naming_the_field(
    challenge: attestation_pb2.AttestationChallenge, complaint: str
) -> None:
    """Challenges that cannot be answered sensibly fail conversion with the field path."""
    with pytest.raises(wire.WireError, match=complaint):
        wire.challenge_from_pb(challenge)


def test_openings_for_a_datasheet_sized_challenge_fit_the_bounds() -> None:
    """Eight opened rows of an n = 16384 challenge (64 KiB each, 14-level proofs) pass the
    receive-side bounds and stay under the 4 MiB message limit."""
    row = attestation_pb2.OpenedRow(index=1, values=b"\0" * 4 * 16384, proof=[b"h" * 32] * 14)
    message = attestation_pb2.AttestationOpen(
        challenge_id="att-1", gpu_uuid="GPU-a", rows=[row] * 8
    )
    bounds.check(message, "attestation_open")
    assert message.ByteSize() < 4 * 1024 * 1024
