"""``make gpu-check``: one prepared command that proves or disproves, on a machine with an
NVIDIA GPU, everything the agent has so far only run against fakes (docs/gpu-check.md).

The checks are plain functions over a ``Machine`` (the NVML module, nvidia-smi's output,
``gpu-agent detect --json``, a GPU workload, the attestation backends present, a
footprint probe), so the same logic and report format run against the fakes in tests.
"""
