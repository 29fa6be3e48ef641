"""Shared pieces for the attestation tests: a simulated SKU, a fake clock, cheating backends."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from benchmarks.attest.backends import NumpyBackend
from benchmarks.attest.messages import GpuIdentity
from benchmarks.attest.prover import Prover
from benchmarks.attest.skus import AcceptanceBand, SkuSpec
from benchmarks.attest.verifier import Verifier

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


@dataclass
class Node:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)


def make_pair(
    seed: int, backend: object | None = None, clock: object = time.monotonic, **verifier_kw: object
) -> tuple[Verifier, Prover, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    verifier = Verifier(
        skus={"sim": SIM_SKU}, rng=random.Random(seed), clock=clock, **verifier_kw  # type: ignore[arg-type]
    )
    prover = Prover(key.sign, backend or NumpyBackend(), identity)  # type: ignore[arg-type]
    return verifier, prover, key


class RandomBackend(NumpyBackend):
    """Fabricates C: random integers of the right shape and magnitude."""

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> tuple[NDArray[np.int32], float]:
        rng = np.random.default_rng(0)
        return rng.integers(-60, 60, size=(n, n), dtype=np.int32), 0.001


class OtherNonceBackend(NumpyBackend):
    """Reuses work: computes C for a nonce of its own choosing."""

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> tuple[NDArray[np.int32], float]:
        return super().matmul(b"\x07" * 32, n, inner, dtype)


class PartialBackend(NumpyBackend):
    """Fills only the rows it guesses will be opened (a random half); zeros elsewhere."""

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> tuple[NDArray[np.int32], float]:
        c, seconds = super().matmul(nonce, n, inner, dtype)
        guessed = np.random.default_rng(1).permutation(n)[: n // 2]
        partial = np.zeros_like(c)
        partial[guessed] = c[guessed]
        return partial, seconds / 2


class SleepyBackend(NumpyBackend):
    """An honest but slower device: right answer, too late for the declared SKU."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> tuple[NDArray[np.int32], float]:
        time.sleep(self.delay_s)  # the slowness being simulated, not synchronisation
        return super().matmul(nonce, n, inner, dtype)
