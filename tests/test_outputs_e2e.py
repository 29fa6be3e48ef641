"""Lease outputs end to end: a real `gpu-scheduler serve`, a real `gpu-agent run`, real
Docker. A batch lease writes known files; the coordinator ends up with the node's
signed commitment to exactly the archive the agent retained, and `lease show` prints it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from benchmarks.agent_stack import BIN, IMAGE, Stack, running_stack, wait_until
from gpuagent.outputs import file_root, output_commitment_signing_bytes
from gpuagent.signing import verify_ed25519
from gpuagent.v1 import common_pb2, leases_pb2, leases_pb2_grpc, nodes_pb2, nodes_pb2_grpc

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

SCRIPT = (
    "mkdir -p /scratch/out/sub && printf 'answer=42\\n' > /scratch/out/result.txt && "
    "printf 'x%.0s' $(seq 1 5000) > /scratch/out/sub/big.txt && "
    "ln -s /etc/passwd /scratch/out/passwd && echo scratch-only > /scratch/tmp.txt"
)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as running:
        yield running


def _cli(stack: Stack, *argv: str) -> str:
    env = {**os.environ, "GPU_SCHEDULER_TOKEN": stack.token}
    done = subprocess.run(
        [str(BIN / "gpu-scheduler"), "-c", str(stack.sched_cfg), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_batch_lease_ends_with_a_verified_commitment_to_its_retained_archive(
    stack: Stack,
) -> None:
    """The coordinator's Lease.outputs is signed by the node's registered key over the
    lease, the node and the Merkle root of the tar the agent keeps; the symlink and the
    undeclared file are not in it; `lease show` and `--json` carry the commitment."""
    stub = leases_pb2_grpc.LeasesStub(stack.channel)
    stub.Submit(
        leases_pb2.SubmitLeaseRequest(
            spec=leases_pb2.LeaseSpec(
                image=IMAGE,
                command=["sh", "-c", SCRIPT],
                gpu_count=1,
                cpus=0.1,
                memory_bytes=32 * 1024**2,
                max_duration_seconds=600,
                outputs=["out", "missing/*.csv"],
                output_retention_seconds=3600,
            ),
            idempotency_key="outputs-e2e",
            buyer="bench",
        ),
        timeout=10,
    )

    def ended() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id="outputs-e2e"), timeout=5)
        return got.state == common_pb2.LEASE_STATE_SUCCEEDED and got.HasField("outputs")

    wait_until("for the lease to succeed with its outputs", ended, 90)
    lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id="outputs-e2e"), timeout=5)
    outputs = lease.outputs
    archive = stack.workdir / "agent" / "outputs" / "outputs-e2e.tar"
    root, size = file_root(archive)
    assert (outputs.digest, outputs.size) == (root, size)
    assert outputs.file_count == 2
    assert "missing/*.csv" in outputs.missing
    assert "out/passwd (symlink, not followed)" in outputs.missing
    assert b"scratch-only" not in archive.read_bytes()
    node = nodes_pb2_grpc.NodesStub(stack.channel).Get(
        nodes_pb2.GetNodeRequest(node_id=stack.node_id), timeout=5
    )
    signed = output_commitment_signing_bytes(
        "outputs-e2e", stack.node_id, root, size, outputs.chunk_bytes
    )
    assert verify_ed25519(node.public_key, outputs.signature, signed)
    shown = _cli(stack, "lease", "show", "outputs-e2e")
    assert f"digest:    {root.hex()}" in shown and "2 file(s)" in shown
    as_json = json.loads(_cli(stack, "lease", "show", "outputs-e2e", "--json"))
    assert as_json["outputs"]["fileCount"] == 2
    assert "gpu_agent_retained_outputs 1.0" in stack.metrics()
    # The node's inventory says what it keeps (as of its Hello: before this lease).
    assert "archive(s)" in _cli(stack, "nodes", "show", stack.node_id)
