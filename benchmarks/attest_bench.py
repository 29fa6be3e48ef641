"""Attestation cost on the CPU backend: the prover per commitment, the verifier per challenge.

Targets (issue 7): verification under 1 % of the prover's compute, and under 100 ms on
the critical path for a 16k-row commitment with k = 8 opened rows.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuagent.attest.generator import expected_entries
from gpuagent.attest.messages import GpuIdentity
from gpuagent.attest.prover import Prover
from gpuagent.attest.skus import AcceptanceBand, SkuSpec, get_sku, task_size
from gpuagent.attest.verifier import Verifier

from .attest.backends import NumpyBackend
from .registry import Figure, register

_UNBOUNDED = AcceptanceBand(low=1e-12, high=float("inf"), fixed_overhead_s=1e9)
_SKU = SkuSpec("bench-cpu", "CPU", ("CPU",), 1, 1, 1.0, 1.0, 1.0, 1.0, "n/a", _UNBOUNDED)
OPEN_ROWS = 8


@register("attestation")
def attestation(smoke: bool) -> list[Figure]:
    n, inner = (2048, 256) if smoke else (16384, 256)
    key = Ed25519PrivateKey.generate()
    backend = NumpyBackend()
    verifier = Verifier(skus={"cpu": _SKU}, open_rows=OPEN_ROWS)
    prover = Prover(key.sign, backend, lambda u: GpuIdentity(u, "CPU", memory_total_bytes=2**20),
                    max_result_bytes=4 * n * n)  # fmt: skip

    challenge = verifier.issue(key.public_key(), [("GPU-bench", "cpu")], sizes=(n, inner))
    t0 = time.perf_counter()
    verifier.prepare(challenge.challenge_id)
    prepare_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    commitment = prover.commit(challenge, challenge.tasks[0])
    commit_s = time.perf_counter() - t0
    compute_s = commitment.compute_ns / 1e9

    t0 = time.perf_counter()
    reveal = verifier.check_commitment(commitment)
    check_commit_s = time.perf_counter() - t0
    openings = prover.open(reveal)
    t0 = time.perf_counter()
    verdict = verifier.check_openings(openings)
    check_open_s = time.perf_counter() - t0
    critical_s = check_commit_s + check_open_s
    verify_total_s = critical_s + prepare_s

    figures = [
        Figure(f"prover: commit n={n} K={inner} (total)", commit_s, "s"),
        Figure("prover: matmul alone", compute_s, "s"),
        Figure("prover: Merkle + signing", commit_s - compute_s, "s"),
        Figure(f"verifier: prepare {OPEN_ROWS} rows x 32 cols (off path)", prepare_s * 1e3, "ms"),
        Figure("verifier: check commitment", check_commit_s * 1e3, "ms"),
        Figure(f"verifier: check {OPEN_ROWS} openings", check_open_s * 1e3, "ms"),
        Figure(
            f"verifier: critical path, {n} rows k={OPEN_ROWS}",
            critical_s * 1e3,
            "ms",
            "< 100 ms",
            critical_s < 0.1,
        ),
        Figure(
            "verifier total / prover compute",
            verify_total_s / compute_s * 100,
            "%",
            "< 1 %",
            verify_total_s / compute_s < 0.01,
        ),
        Figure("honest run verdict passed", float(verdict.passed), "bool", "1", verdict.passed),
    ]
    if not smoke:
        # The verifier's off-path work for a real H100-sized challenge (inner ~3.7M).
        _, h100_inner = task_size(get_sku("h100-sxm"))
        t0 = time.perf_counter()
        expected_entries(challenge.nonce, h100_inner, range(OPEN_ROWS), range(32))
        figures.append(
            Figure(
                f"verifier: prepare for h100-sxm (K={h100_inner})", time.perf_counter() - t0, "s"
            )
        )
    return figures
