"""Challenge -> commit -> reveal -> open: honest provers pass; each cheat fails its own way."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from benchmarks.attest.backends import NumpyBackend
from gpuagent.attest.messages import GpuIdentity, Openings, Reveal
from gpuagent.attest.prover import Prover, ProverError
from gpuagent.attest.skus import AcceptanceBand, SkuSpec, get_sku
from gpuagent.attest.verifier import AttestationRejected, RejectReason, Verifier

SIM_NAME = "Simulated GPU"
SIM_MEMORY = 1024 * 1024**2
# Effectively infinite peak: the band's lower edge is ~0 and its upper edge is the
# fixed overhead, generous enough that a loaded CI machine never trips it honestly.
SIM_SKU = SkuSpec(
    "sim", "Simulated GPU", (SIM_NAME,), 1024, SIM_MEMORY, 1e9, 1e9, 1e9, 1e12, "test",
    AcceptanceBand(low=0.6, high=1.15, fixed_overhead_s=1.0),
)  # fmt: skip
UUID = "GPU-0000-sim"


def identity(uuid: str) -> GpuIdentity:
    return GpuIdentity(uuid, SIM_NAME, "serial-1", "0000:01:00.0", SIM_MEMORY)


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pair(
    seed: int, backend: object | None = None, clock: object = time.monotonic, **verifier_kw: object
) -> tuple[Verifier, Prover, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    verifier = Verifier(
        skus={"sim": SIM_SKU},
        rng=random.Random(seed),  # noqa: S311 - seeded on purpose: reproducible runs,
        clock=clock,
        **verifier_kw,  # type: ignore[arg-type]
    )
    prover = Prover(key.sign, backend or NumpyBackend(), identity)  # type: ignore[arg-type]
    return verifier, prover, key


class RandomBackend(NumpyBackend):
    """Fabricates C: random integers of the right shape and magnitude."""

    def matmul(
        self, nonce: bytes, n: int, inner: int, dtype: str
    ) -> tuple[NDArray[np.int32], float]:
        rng = np.random.default_rng(0)
        return rng.integers(-60, 60, size=(n, n), dtype=np.int32), 0.001


class OtherNonceBackend(NumpyBackend):
    """Reuses work: computes C for a nonce of its own choosing."""

    def matmul(
        self, nonce: bytes, n: int, inner: int, dtype: str
    ) -> tuple[NDArray[np.int32], float]:
        return super().matmul(b"\x07" * 32, n, inner, dtype)


class PartialBackend(NumpyBackend):
    """Fills only the rows it guesses will be opened (a random half); zeros elsewhere."""

    def matmul(
        self, nonce: bytes, n: int, inner: int, dtype: str
    ) -> tuple[NDArray[np.int32], float]:
        c, seconds = super().matmul(nonce, n, inner, dtype)
        guessed = np.random.default_rng(1).permutation(n)[: n // 2]
        partial = np.zeros_like(c)
        partial[guessed] = c[guessed]
        return partial, seconds / 2


class SleepyBackend(NumpyBackend):
    """An honest but slower device: right answer, too late for the declared SKU."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def matmul(
        self, nonce: bytes, n: int, inner: int, dtype: str
    ) -> tuple[NDArray[np.int32], float]:
        time.sleep(self.delay_s)  # the slowness being simulated, not synchronisation
        return super().matmul(nonce, n, inner, dtype)


SIZES = (64, 64)


def _run(verifier: Verifier, prover: Prover, key: Ed25519PrivateKey, sizes=SIZES):
    challenge = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=sizes)
    commitment = prover.commit(challenge, challenge.tasks[0])
    reveal = verifier.check_commitment(commitment)
    return verifier.check_openings(prover.open(reveal))


def _reason(verifier: Verifier, prover: Prover, key: Ed25519PrivateKey) -> RejectReason:
    with pytest.raises(AttestationRejected) as info:
        _run(verifier, prover, key)
    return info.value.reason


def test_honest_prover_passes_100_seeded_runs() -> None:
    """No false rejections: 100 seeded challenges of varied sizes all pass on the CPU backend."""
    sizes = [(8, 4), (33, 64), (64, 128), (100, 36), (17, 256)]
    for seed in range(100):
        verifier, prover, key = make_pair(seed)
        verdict = _run(verifier, prover, key, sizes[seed % len(sizes)])
        assert verdict.passed and verdict.reason == "ok", (seed, verdict)


def test_fabricated_random_result_is_caught() -> None:
    """A random C commits fine but no opened row matches A@B: result_wrong."""
    verifier, _, key = make_pair(1)
    cheat = Prover(key.sign, RandomBackend(), identity)
    assert _reason(verifier, cheat, key) is RejectReason.RESULT_WRONG


def test_result_for_another_nonce_is_caught() -> None:
    """C computed honestly but for a different nonce (reused work) is result_wrong."""
    verifier, _, key = make_pair(2)
    cheat = Prover(key.sign, OtherNonceBackend(), identity)
    assert _reason(verifier, cheat, key) is RejectReason.RESULT_WRONG


def test_partially_computed_result_is_caught() -> None:
    """Filling only a guessed half of the rows fails on the unfilled opened ones: result_partial."""
    verifier, _, key = make_pair(3)
    cheat = Prover(key.sign, PartialBackend(), identity)
    assert _reason(verifier, cheat, key) is RejectReason.RESULT_PARTIAL


def test_partial_cheat_is_caught_in_almost_every_seeded_run() -> None:
    """With k=8 of 64 rows opened, half-filling passes only when all 8 land in the filled half."""
    caught = 0
    for seed in range(40):
        verifier, _, key = make_pair(seed)
        try:
            _run(verifier, Prover(key.sign, PartialBackend(), identity), key)
        except AttestationRejected:
            caught += 1
    assert caught >= 39


def test_slower_device_claiming_the_sku_is_too_slow() -> None:
    """An exact result delivered after the SKU band's upper edge is rejected as too_slow."""
    verifier, _, key = make_pair(4)
    slow = Prover(key.sign, SleepyBackend(SIM_SKU.band.fixed_overhead_s + 0.6), identity)
    assert _reason(verifier, slow, key) is RejectReason.TOO_SLOW


def test_replayed_commitment_from_an_earlier_challenge_is_caught() -> None:
    """A closed challenge's commitment resent is replayed; moved to a new one, nonce_mismatch."""
    verifier, prover, key = make_pair(5)
    first = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    old = prover.commit(first, first.tasks[0])
    verifier.check_openings(prover.open(verifier.check_commitment(old)))
    second = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    with pytest.raises(AttestationRejected) as info:
        verifier.check_commitment(old)
    assert info.value.reason is RejectReason.REPLAYED
    moved = replace(old, challenge_id=second.challenge_id, signature=b"")
    moved = replace(moved, signature=key.sign(moved.signing_bytes()))
    with pytest.raises(AttestationRejected) as info:
        verifier.check_commitment(moved)
    assert info.value.reason is RejectReason.NONCE_MISMATCH


def test_commitment_signed_by_another_nodes_key_is_caught() -> None:
    """A commitment signed by a key other than the challenged node's is bad_signature."""
    verifier, _, key = make_pair(6)
    impostor = Prover(Ed25519PrivateKey.generate().sign, NumpyBackend(), identity)
    assert _reason(verifier, impostor, key) is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "ident",
    [
        GpuIdentity(UUID, "NVIDIA GeForce RTX 3080", memory_total_bytes=10240 * 1024**2),
        GpuIdentity(UUID, "Simulated GPU", memory_total_bytes=512 * 1024**2),
        GpuIdentity("GPU-other", "Simulated GPU", memory_total_bytes=1024 * 1024**2),
    ],
    ids=["other-name", "less-memory", "other-uuid"],
)
def test_nvml_identity_not_matching_the_sku_is_caught(ident: GpuIdentity) -> None:
    """Wrong NVML name, memory total or UUID for the declared GPU is identity_mismatch."""
    verifier, _, key = make_pair(7)
    liar = Prover(key.sign, NumpyBackend(), lambda _u: ident)
    assert _reason(verifier, liar, key) is RejectReason.IDENTITY_MISMATCH


def test_the_six_cheats_have_six_distinct_reasons() -> None:
    """Operators can tell the cheats apart from the reason code alone."""
    reasons = set()
    for seed, backend, signer, ident in [
        (10, RandomBackend(), None, identity),
        (11, PartialBackend(), None, identity),
        (12, SleepyBackend(SIM_SKU.band.fixed_overhead_s + 0.6), None, identity),
        (13, NumpyBackend(), Ed25519PrivateKey.generate().sign, identity),
        (14, NumpyBackend(), None, lambda u: GpuIdentity(u, "NVIDIA L40S", memory_total_bytes=1)),
    ]:
        verifier, _, key = make_pair(seed)
        reasons.add(_reason(verifier, Prover(signer or key.sign, backend, ident), key))
    verifier, prover, key = make_pair(15)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    old = prover.commit(ch, ch.tasks[0])
    verifier.check_openings(prover.open(verifier.check_commitment(old)))
    with pytest.raises(AttestationRejected) as info:
        verifier.check_commitment(old)
    reasons.add(info.value.reason)
    assert len(reasons) == 6, reasons


def test_timing_band_uses_the_declared_skus_datasheet_peak() -> None:
    """Against a real SKU row: faster than 1.15x peak is too_fast, slower than 0.6x too_slow."""
    sku = replace(get_sku("h100-sxm"), reported_names=("Simulated GPU",), reported_memory_mib=1024)
    clock = FakeClock()
    key = Ed25519PrivateKey.generate()
    n, inner = 64, 1 << 20  # 8.6 GFLOP: ~8.7 us at 989 TFLOPS
    fastest, slowest = sku.time_bounds(n, inner, "fp16")

    class Instant(NumpyBackend):
        def matmul(self, nonce, n, inner, dtype):  # the real product at K=4 is enough here
            return super().matmul(nonce, n, 4, dtype)

    for elapsed, reason in [(fastest * 0.5, RejectReason.TOO_FAST),
                            (slowest + 1.0, RejectReason.TOO_SLOW)]:  # fmt: skip
        rng = random.Random(0)  # noqa: S311 - seeded: reproducible
        verifier = Verifier(skus={sku.sku_id: sku}, rng=rng, clock=clock)
        prover = Prover(key.sign, Instant(), identity)
        ch = verifier.issue(key.public_key(), [(UUID, sku.sku_id)], sizes=(n, inner),
                            network_allowance_s=0.0)  # fmt: skip
        commitment = prover.commit(ch, ch.tasks[0])
        clock.now += elapsed
        with pytest.raises(AttestationRejected) as info:
            verifier.check_commitment(commitment)
        assert info.value.reason is reason


def test_network_allowance_is_subtracted_before_judging_too_slow() -> None:
    """The measured round trip is not charged to the GPU: slowest + allowance still passes."""
    clock = FakeClock()
    verifier, prover, key = make_pair(20, clock=clock)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES, network_allowance_s=2.0)
    commitment = prover.commit(ch, ch.tasks[0])
    clock.now += SIM_SKU.time_bounds(*SIZES, "fp16")[1] + 1.9
    verdict = verifier.check_openings(prover.open(verifier.check_commitment(commitment)))
    assert verdict.passed


def test_late_commitment_after_expiry_is_expired() -> None:
    """A commitment after the challenge's expiry is expired, and so are late openings."""
    clock = FakeClock()
    verifier, prover, key = make_pair(21, clock=clock)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES, ttl_s=5.0)
    commitment = prover.commit(ch, ch.tasks[0])
    clock.now += 6.0
    with pytest.raises(AttestationRejected) as info:
        verifier.check_commitment(commitment)
    assert info.value.reason is RejectReason.EXPIRED

    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    commitment = prover.commit(ch, ch.tasks[0])
    clock.now += 0.01  # a plausible compute time, so the commit itself passes
    reveal = verifier.check_commitment(commitment)
    clock.now += 31.0
    with pytest.raises(AttestationRejected) as info:
        verifier.check_openings(prover.open(reveal))
    assert info.value.reason is RejectReason.EXPIRED


def test_tampered_openings_fail_the_merkle_check() -> None:
    """Rows that differ from the committed ones, however plausible, are bad_proof."""
    verifier, prover, key = make_pair(22)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    reveal = verifier.check_commitment(prover.commit(ch, ch.tasks[0]))
    openings = prover.open(reveal)
    first = openings.rows[0]
    forged = replace(first, values=b"\x00" * len(first.values))
    with pytest.raises(AttestationRejected) as info:
        verifier.check_openings(replace(openings, rows=(forged, *openings.rows[1:])))
    assert info.value.reason is RejectReason.BAD_PROOF


def test_openings_of_other_rows_are_malformed() -> None:
    """Opening rows other than the revealed ones is rejected, naming the expected rows."""
    verifier, prover, key = make_pair(23)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    reveal = verifier.check_commitment(prover.commit(ch, ch.tasks[0]))
    openings = prover.open(Reveal(reveal.challenge_id, reveal.gpu_uuid, (0, 1)))
    with pytest.raises(AttestationRejected) as info:
        verifier.check_openings(openings)
    assert info.value.reason is RejectReason.MALFORMED
    assert "expected exactly" in info.value.message


def test_unknown_challenge_and_unknown_gpu_are_rejected() -> None:
    """Messages naming no live challenge, or a GPU outside it, get distinct clear reasons."""
    verifier, prover, key = make_pair(24)
    with pytest.raises(AttestationRejected) as info:
        verifier.check_openings(Openings("att-nope", UUID))
    assert info.value.reason is RejectReason.UNKNOWN_CHALLENGE
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    commitment = prover.commit(ch, ch.tasks[0])
    with pytest.raises(AttestationRejected) as info:
        verifier.check_commitment(replace(commitment, gpu_uuid="GPU-x"))
    assert info.value.reason is RejectReason.MALFORMED


def test_multi_gpu_challenge_judges_each_gpu_separately() -> None:
    """One GPU failing does not fail its neighbour in the same challenge."""
    verifier, prover, key = make_pair(25)
    ch = verifier.issue(key.public_key(), [("GPU-a", "sim"), ("GPU-b", "sim")], sizes=SIZES)
    verifier.prepare(ch.challenge_id)
    good = prover.commit(ch, ch.tasks[0])
    bad = Prover(key.sign, RandomBackend(), identity).commit(ch, ch.tasks[1])
    assert verifier.check_openings(prover.open(verifier.check_commitment(good))).passed
    cheat = Prover(key.sign, RandomBackend(), identity)
    cheat.commit(ch, ch.tasks[1])
    with pytest.raises(AttestationRejected) as info:
        verifier.check_openings(cheat.open(verifier.check_commitment(bad)))
    assert info.value.reason is RejectReason.RESULT_WRONG


def test_prover_refuses_hostile_challenges_with_clear_errors() -> None:
    """Oversized, misshapen or foreign tasks are refused before any memory is allocated."""
    _, prover, key = make_pair(26)
    rng = random.Random(0)  # noqa: S311 - seeded: reproducible
    verifier = Verifier(skus={"sim": SIM_SKU}, rng=rng)
    ch = verifier.issue(key.public_key(), [(UUID, "sim")], sizes=SIZES)
    task = ch.tasks[0]
    huge = replace(task, n=60000)
    with pytest.raises(ProverError, match="not in challenge"):
        prover.commit(ch, huge)
    with pytest.raises(ProverError, match="bytes for C"):
        prover.commit(replace(ch, tasks=(huge,)), huge)
    with pytest.raises(ProverError, match="multiple of 4"):
        bad = replace(task, inner=6)
        prover.commit(replace(ch, tasks=(bad,)), bad)
    with pytest.raises(ProverError, match="nonce must be 32 bytes"):
        prover.commit(replace(ch, nonce=b"short"), task)
    with pytest.raises(ProverError, match="no committed result"):
        prover.open(Reveal(ch.challenge_id, UUID, (0,)))
    prover.commit(ch, task)
    with pytest.raises(ProverError, match="out of range"):
        prover.open(Reveal(ch.challenge_id, UUID, (64,)))


def test_relaxed_band_helper_is_not_the_default() -> None:
    """The shipped band is the documented 0.6-1.15x; tests relax it only explicitly."""
    assert get_sku("h100-sxm").band == AcceptanceBand()
    assert (AcceptanceBand().low, AcceptanceBand().high) == (0.6, 1.15)
