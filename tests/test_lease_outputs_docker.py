"""Lease outputs with the real lease manager and the real Docker Engine: what a
container writes to /scratch becomes a signed archive in the terminal update."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.leases import LeaseState
from agent.leases.output_keeper import OutputKeeper
from agent.leases.output_pack import Commitment
from agent.leases.spec import LeaseRejected, parse_spec
from agent.wire import lease_update
from gpuagent.outputs import CHUNK_BYTES, archive_root, file_root, output_commitment_signing_bytes
from gpuagent.signing import verify_ed25519
from scheduler import outputs_store
from tests.test_lease_docker import LeaseEnv, lease_env_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.docker

KEY_SEED = b"k" * 32


def _identity() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(KEY_SEED)
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


KEY, PUBLIC = _identity()


@pytest_asyncio.fixture
async def env(lease_env_factory: Callable[..., LeaseEnv]) -> AsyncIterator[LeaseEnv]:  # noqa: F811
    lease_env = lease_env_factory()
    yield lease_env
    for stop, task in lease_env.runs:
        stop.set()
        await asyncio.wait_for(task, 10)


def _keeper(env: LeaseEnv, **outputs: Any) -> OutputKeeper:
    config = env.config.model_copy(
        update={"outputs": env.config.outputs.model_copy(update=outputs)}
    )
    return OutputKeeper(config, env.node_id, KEY.sign)


WRITE = (
    "mkdir -p /scratch/results/deep && printf 'a,b\\n1,2\\n' > /scratch/results/a.csv && "
    "printf 'deep' > /scratch/results/deep/x.txt && echo junk > /scratch/ignored.log && "
    "ln -s /etc/passwd /scratch/results/passwd && ln -s /etc/passwd /scratch/stolen"
)


def _expected(files: dict[str, bytes], dirs: list[str]) -> bytes:
    """The archive the documented format gives for these names and bytes, built here."""
    out = io.BytesIO()
    with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted([*files, *dirs]):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if name in dirs:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


@pytest.mark.asyncio
async def test_a_lease_writing_known_files_ends_with_their_signed_archive(env: LeaseEnv) -> None:
    """The terminal update carries the commitment: its digest is archive_root of the
    retained tar and of the archive built independently from the known files; the node's
    signature verifies (and the coordinator's check accepts it); symlinks to host files
    are not packed; the scratch dir is gone, the archive stays."""
    manager = env.manager()
    keeper = _keeper(env)
    manager.outputs = keeper
    await env.start(manager)
    spec = env.spec(WRITE, outputs=["results", "/scratch/stolen", "none/*.bin"])
    await manager.assign("out-1", spec)
    done = await env.wait_state("out-1", LeaseState.SUCCEEDED)
    assert done.outputs is not None
    commitment = Commitment.from_json(done.outputs)
    archive = keeper.store.archive_path("out-1")
    root, size = file_root(archive)
    assert (commitment.digest_hex, commitment.size) == (root.hex(), size)
    expected = _expected(
        {"results/a.csv": b"a,b\n1,2\n", "results/deep/x.txt": b"deep"},
        ["results", "results/deep"],
    )
    assert archive.read_bytes() == expected
    assert archive_root(io.BytesIO(expected))[0] == root
    assert b"root:x:0:0" not in archive.read_bytes()
    assert commitment.file_count == 2
    assert "none/*.bin" in commitment.missing and "/scratch/stolen" in commitment.missing
    assert "results/passwd (symlink, not followed)" in commitment.missing
    signed = output_commitment_signing_bytes("out-1", env.node_id, root, size, CHUNK_BYTES)
    assert verify_ed25519(PUBLIC, bytes.fromhex(commitment.signature_hex), signed)
    wire = lease_update(done).outputs
    outputs_store.check(wire, lease_id="out-1", node_id=env.node_id, public_key=PUBLIC)
    assert not (env.state_dir / "scratch" / "gpuagent-out-1").exists()
    assert keeper.store.lookup("out-1").digest_hex == root.hex()


@pytest.mark.asyncio
async def test_outputs_over_output_max_fail_the_lease_with_the_reason(env: LeaseEnv) -> None:
    """A lease that exits 0 but leaves more than output_max fails with
    outputs_over_limit; nothing is retained for it."""
    manager = env.manager()
    manager.outputs = keeper = _keeper(env)
    await env.start(manager)
    spec = env.spec(
        "dd if=/dev/zero of=/scratch/big bs=1024 count=600 2>/dev/null",
        outputs=["big"],
        output_max_bytes=256 * 1024,
    )
    await manager.assign("big-1", spec)
    done = await env.wait_state("big-1", LeaseState.FAILED)
    assert done.reason.startswith("outputs_over_limit:"), done.reason
    assert done.outputs is None
    assert list(keeper.store.root.glob("big-1*")) == []


@pytest.mark.asyncio
async def test_required_outputs_missing_fail_the_lease_else_are_reported(env: LeaseEnv) -> None:
    """A declared path that matches nothing fails the lease only with outputs_required."""
    manager = env.manager()
    manager.outputs = _keeper(env)
    await env.start(manager)
    await manager.assign("miss-1", env.spec("true", outputs=["result.txt"]))
    await manager.assign("miss-2", env.spec("true", outputs=["result.txt"], outputs_required=True))
    ok = await env.wait_state("miss-1", LeaseState.SUCCEEDED)
    assert ok.outputs is not None and ok.outputs["missing"] == ["result.txt"]
    failed = await env.wait_state("miss-2", LeaseState.FAILED)
    assert failed.reason.startswith("outputs_missing:") and "result.txt" in failed.reason


@pytest.mark.asyncio
async def test_a_crash_between_pack_and_report_re_sends_the_same_commitment(
    env: LeaseEnv,
) -> None:
    """The agent dies after packing, before recording the end: the restarted agent ends
    the lease with the very commitment packed before (same digest and signature), and
    the stored terminal update carries it until the coordinator acks it."""
    first = env.manager()
    keeper = _keeper(env)
    packed: list[Commitment] = []
    was_packed = asyncio.Event()

    async def keep_then_die(lease_id: str, spec: Any, scratch: Path) -> Commitment:
        packed.append(await OutputKeeper.keep(keeper, lease_id, spec, scratch))
        was_packed.set()
        raise asyncio.CancelledError  # the process is gone before _end records anything

    keeper.keep = keep_then_die  # type: ignore[method-assign]
    first.outputs = keeper
    await env.start(first)
    await first.assign("crash-1", env.spec("echo once > /scratch/r.txt", outputs=["r.txt"]))
    await asyncio.wait_for(was_packed.wait(), 20)
    stop, task = env.runs.pop()
    stop.set()
    await asyncio.wait_for(task, 10)
    assert LeaseState.SUCCEEDED not in env.states("crash-1")

    second = env.manager()
    second.outputs = _keeper(env)
    await env.start(second)
    done = await env.wait_state("crash-1", LeaseState.SUCCEEDED)
    assert done.outputs == packed[0].to_json()
    pending = [u for u in await second.pending_updates() if u.lease_id == "crash-1"]
    assert pending[-1].state is LeaseState.SUCCEEDED and pending[-1].outputs == done.outputs


@pytest.mark.asyncio
async def test_specs_asking_more_than_the_host_keeps_are_refused(env: LeaseEnv) -> None:
    """output_max over outputs.max_bytes is refused at assign (exceeds_host_limit); an
    agent without an output keeper refuses any outputs; a hostile path names its key."""
    manager = env.manager()
    manager.outputs = _keeper(env, max_bytes=1024**2)
    await env.start(manager)
    await manager.assign("big-ask", env.spec("true", outputs=["a"], output_max_bytes=2 * 1024**2))
    update = await env.wait_state("big-ask", LeaseState.REJECTED)
    assert "exceeds_host_limit" in update.reason and "output_max_bytes" in update.reason
    with pytest.raises(LeaseRejected, match=r"outputs\[1\]: .*'\.\.'"):
        parse_spec({"image": "busybox", "outputs": ["ok", "../../etc/shadow"]})
    with pytest.raises(LeaseRejected, match="outside /scratch"):
        parse_spec({"image": "busybox", "outputs": ["/etc/shadow"]})
