"""GPU benchmark kernels used by attestation, and the system's own performance benchmarks."""
