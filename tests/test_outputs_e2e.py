"""Lease outputs end to end: a real `gpu-scheduler serve`, a real `gpu-agent run`, real
Docker. A batch lease writes known files; the coordinator ends up with the node's
signed commitment to exactly the archive the agent retained, and `lease show` prints it.
The buyer fetches it with `gpu-scheduler output` through the relay and the CLI checks
it; strangers, other tickets and expired outputs are refused; a byte flipped on the
provider's disk is caught and recorded against the node.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from benchmarks.agent_stack import BIN, IMAGE, Stack, running_stack, wait_until
from gpuagent.outputs import file_root, output_commitment_signing_bytes
from gpuagent.signing import verify_ed25519
from gpuagent.v1 import (
    acl_pb2,
    acl_pb2_grpc,
    common_pb2,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from scheduler.cmd_nodes import format_size

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


def _run(stack: Stack, token: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_SCHEDULER_TOKEN": token}
    return subprocess.run(
        [str(BIN / "gpu-scheduler"), "-c", str(stack.sched_cfg), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _cli(stack: Stack, *argv: str) -> str:
    done = _run(stack, stack.token, *argv)
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


@dataclass
class Buyers:
    dana: str  # the buyer of the fetched leases
    eve: str  # another buyer
    dana_channel: grpc.Channel


def _buyer(stack: Stack, name: str) -> str:
    acl = acl_pb2_grpc.AclStub(stack.channel)
    acl.CreateAccount(acl_pb2.CreateAccountRequest(name=name, role=acl_pb2.ROLE_BUYER))
    return str(acl.CreateToken(acl_pb2.CreateTokenRequest(account=name)).secret)


@pytest.fixture(scope="module")
def buyers(stack: Stack) -> Iterator[Buyers]:
    from benchmarks import schedauth

    dana = _buyer(stack, "dana")
    channel = grpc.secure_channel(
        f"localhost:{stack.grpc_port}", schedauth.credentials(stack.ca_file, dana)
    )
    yield Buyers(dana=dana, eve=_buyer(stack, "eve"), dana_channel=channel)
    channel.close()


def _submit_for_dana(stack: Stack, lease_id: str, script: str, retention: int = 3600) -> None:
    leases_pb2_grpc.LeasesStub(stack.channel).Submit(
        leases_pb2.SubmitLeaseRequest(
            spec=leases_pb2.LeaseSpec(
                image=IMAGE,
                command=["sh", "-c", script],
                gpu_count=1,
                cpus=0.1,
                memory_bytes=32 * 1024**2,
                max_duration_seconds=600,
                outputs=["out"],
                output_retention_seconds=retention,
            ),
            idempotency_key=lease_id,
            buyer="dana",
        ),
        timeout=10,
    )


def _ended_with_outputs(stack: Stack, lease_id: str) -> leases_pb2.Lease:
    stub = leases_pb2_grpc.LeasesStub(stack.channel)

    def ended() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)
        return got.state == common_pb2.LEASE_STATE_SUCCEEDED and got.HasField("outputs")

    wait_until(f"for {lease_id} to succeed with its outputs", ended, 90)
    lease: leases_pb2.Lease = stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)
    return lease


# ~3 MiB of output: several Merkle chunks, so a resume starts mid-archive.
FETCH_SCRIPT = (
    "mkdir -p /scratch/out && printf 'answer=42\\n' > /scratch/out/result.txt && "
    "head -c 3145728 /dev/zero | tr '\\0' 'z' > /scratch/out/big.bin"
)


def _ticket(buyers: Buyers, lease_id: str) -> leases_pb2.OutputDownload:
    stub = leases_pb2_grpc.LeasesStub(buyers.dana_channel)
    got: leases_pb2.OutputDownload = stub.OutputTicket(
        leases_pb2.OutputTicketRequest(lease_id=lease_id), timeout=10
    )
    return got


def _relay_get(
    stack: Stack, lease_id: str, token: str = "", method: str = "GET", **headers: str
) -> httpx.Response:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(
        method,
        f"http://127.0.0.1:{stack.relay_port}/_outputs/{lease_id}",
        headers=headers,
        timeout=30,
    )


def test_the_buyer_fetches_and_verifies_its_outputs_and_nobody_else_can(
    stack: Stack, buyers: Buyers, tmp_path: Path
) -> None:
    """`gpu-scheduler output` as the buyer: the archive arrives through the relay from the
    node, is checked against the node's signature, says ok and holds the files; --json
    prints the commitment; a partial download resumes (Range: 206). Another buyer, an
    admin, no ticket, a forged or another lease's ticket, a POST: all refused."""
    _submit_for_dana(stack, "fetch-e2e", FETCH_SCRIPT)
    _submit_for_dana(
        stack, "fetch-e2e-other", "mkdir -p /scratch/out && echo other > /scratch/out/o"
    )
    lease = _ended_with_outputs(stack, "fetch-e2e")
    _ended_with_outputs(stack, "fetch-e2e-other")
    committed = lease.outputs
    target = tmp_path / "results.tar"
    done = _run(stack, buyers.dana, "output", "fetch-e2e", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok {target}: ") and committed.digest.hex() in done.stdout
    assert file_root(target) == (committed.digest, committed.size)
    with tarfile.open(target) as tar:
        assert sorted(tar.getnames()) == ["out", "out/big.bin", "out/result.txt"]
        member = tar.extractfile("out/result.txt")
        assert member is not None and member.read() == b"answer=42\n"
    as_json = json.loads(
        _run(
            stack, buyers.dana, "output", "fetch-e2e", "-o", str(tmp_path / "j.tar"), "--json"
        ).stdout
    )
    assert as_json["ok"] is True and as_json["commitment"]["node_id"] == stack.node_id

    # Resume: the first 1.5 MiB are already there; the rest comes as a 206 and the whole
    # file still verifies.
    whole = target.read_bytes()
    resumed = tmp_path / "resumed.tar"
    (tmp_path / "resumed.tar.part").write_bytes(whole[: 3 * 1024 * 1024 // 2])
    done = _run(
        stack, buyers.dana, "output", "fetch-e2e", "-o", str(resumed), "--progress", "always"
    )
    assert done.returncode == 0, done.stderr
    assert resumed.read_bytes() == whole
    # The bar counts from where it resumed to the whole archive.
    assert "100%" in done.stderr and f"/ {format_size(len(whole))}" in done.stderr
    ticket = _ticket(buyers, "fetch-e2e")
    part = _relay_get(stack, "fetch-e2e", ticket.ticket, Range="bytes=1000-1999")
    assert part.status_code == 206 and part.content == whole[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(whole)}"
    assert (
        _relay_get(stack, "fetch-e2e", ticket.ticket, Range=f"bytes={len(whole)}-").status_code
        == 416
    )

    # Refusals, each with a reason.
    other = _run(stack, buyers.eve, "output", "fetch-e2e", "-o", str(tmp_path / "eve.tar"))
    assert other.returncode == 1 and "NOT_FOUND" in other.stderr
    admin = _run(stack, stack.token, "output", "fetch-e2e", "-o", str(tmp_path / "adm.tar"))
    assert admin.returncode == 1 and "only the buyer of lease fetch-e2e" in admin.stderr
    assert not (tmp_path / "eve.tar").exists() and not (tmp_path / "adm.tar").exists()
    assert _relay_get(stack, "fetch-e2e").status_code == 401
    forged = ticket.ticket[:-4] + ("AAAA" if not ticket.ticket.endswith("AAAA") else "BBBB")
    assert _relay_get(stack, "fetch-e2e", forged).status_code == 401
    assert _relay_get(stack, "fetch-e2e", "gso_" + "A" * 5000).status_code in (401, 431)
    other_ticket = _ticket(buyers, "fetch-e2e-other").ticket
    assert _relay_get(stack, "fetch-e2e", other_ticket).status_code == 401
    endpoint_like = _relay_get(stack, "fetch-e2e", "gsp_" + "x" * 43)
    assert endpoint_like.status_code == 401 and "output ticket" in endpoint_like.text
    assert _relay_get(stack, "fetch-e2e", ticket.ticket, method="POST").status_code == 405
    assert _relay_get(stack, "../etc/passwd", ticket.ticket).status_code in (401, 404)
    # The relay is still serving after all that.
    assert _relay_get(stack, "fetch-e2e", ticket.ticket).content == whole


def test_expired_outputs_answer_not_found_with_the_reason(
    stack: Stack, buyers: Buyers, tmp_path: Path
) -> None:
    """output_retention over: the coordinator refuses a ticket (NOT_FOUND, when it was
    kept until), and a ticket taken before the end is refused by the agent itself."""
    _submit_for_dana(
        stack, "fetch-expiring", "mkdir -p /scratch/out && echo soon > /scratch/out/x", 4
    )
    lease = _ended_with_outputs(stack, "fetch-expiring")
    early = _ticket(buyers, "fetch-expiring")
    until = lease.outputs.retained_until_unix_nanos
    wait_until("for the retention to pass", lambda: time.time_ns() > until + 500_000_000, 30)
    late = _run(stack, buyers.dana, "output", "fetch-expiring", "-o", str(tmp_path / "x.tar"))
    assert late.returncode == 1
    assert "NOT_FOUND" in late.stderr and "are gone" in late.stderr and "UTC" in late.stderr
    answer = _relay_get(stack, "fetch-expiring", early.ticket)
    assert answer.status_code == 404 and "retention period has passed" in answer.text


def test_a_byte_flipped_on_the_providers_disk_is_caught_and_recorded(
    stack: Stack, buyers: Buyers, tmp_path: Path
) -> None:
    """After the commitment, one byte of the retained archive changes: the CLI names
    the digest that differed, keeps the bytes aside (no results.tar), exits 1, and the
    node shows the buyer's report, once however often the buyer retries."""
    _submit_for_dana(stack, "fetch-flip", FETCH_SCRIPT)
    lease = _ended_with_outputs(stack, "fetch-flip")
    archive = stack.workdir / "agent" / "outputs" / "fetch-flip.tar"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    target = tmp_path / "flip.tar"
    done = _run(stack, buyers.dana, "output", "fetch-flip", "-o", str(target))
    assert done.returncode == 1, done.stdout
    assert "do not match what node" in done.stderr and "digest: signed" in done.stderr
    assert lease.outputs.digest.hex() in done.stderr
    assert "mismatch recorded against the node" in done.stderr
    assert not target.exists() and (tmp_path / "flip.tar.mismatch").read_bytes() == bytes(data)
    again = _run(stack, buyers.dana, "output", "fetch-flip", "-o", str(target))
    assert again.returncode == 1 and "already recorded" in again.stderr
    node = nodes_pb2_grpc.NodesStub(stack.channel).Get(
        nodes_pb2.GetNodeRequest(node_id=stack.node_id), timeout=5
    )
    assert [(m.lease_id, m.reporter) for m in node.output_mismatches] == [("fetch-flip", "dana")]
    assert "fetch-flip" in _cli(stack, "nodes", "show", stack.node_id)
    # A "mismatch" report that matches the commitment is refused: no smearing a node.
    stub = leases_pb2_grpc.LeasesStub(buyers.dana_channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ReportOutputMismatch(
            leases_pb2.OutputMismatchReport(
                lease_id="fetch-e2e-other",
                fetched_digest=_ticket(buyers, "fetch-e2e-other").commitment.digest,
                fetched_size=_ticket(buyers, "fetch-e2e-other").commitment.size,
            ),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Oversized or out-of-range reports are refused and change nothing.
    for report in (
        leases_pb2.OutputMismatchReport(lease_id="fetch-flip", detail="x" * 513),
        leases_pb2.OutputMismatchReport(lease_id="fetch-flip", fetched_digest=b"d" * 33),
        leases_pb2.OutputMismatchReport(lease_id="x" * 10_000, fetched_digest=b"d" * 32),
    ):
        with pytest.raises(grpc.RpcError) as bad:
            stub.ReportOutputMismatch(report, timeout=10)
        assert bad.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        ), bad.value.details()
        assert bad.value.details(), "the refusal says what was wrong"
    after = nodes_pb2_grpc.NodesStub(stack.channel).Get(
        nodes_pb2.GetNodeRequest(node_id=stack.node_id), timeout=5
    )
    assert [(m.lease_id, m.reporter) for m in after.output_mismatches] == [("fetch-flip", "dana")]
