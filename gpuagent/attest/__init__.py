"""Benchmark attestation protocol: seeded exact matmul, Merkle commitment, prover and verifier.

Shared by agent (prover) and coordinator (verifier); the GPU kernels the prover runs
live in ``benchmarks/attest/backends.py``. See docs/attestation.md for the scheme and
its soundness argument.
"""
