"""Benchmark attestation: seeded exact matmul, Merkle commitment, prover and verifier.

See docs/attestation.md for the scheme and its soundness argument.
"""
