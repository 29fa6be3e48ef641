"""Packing lease outputs: deterministic bytes, the signed commitment, limits, symlinks,
retention (agent/leases/output_pack.py, output_store.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.leases.output_pack import Commitment, PackFailed, PackRequest, pack
from agent.leases.output_store import TOMBSTONE_S, NotRetained, OutputStore
from gpuagent import leaserules
from gpuagent.outputs import CHUNK_BYTES, file_root, output_commitment_signing_bytes
from gpuagent.signing import verify_ed25519

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
NOW_NS = 1_800_000_000 * 10**9


def _request(scratch: Path, declared: list[str], **changes: object) -> PackRequest:
    values: dict[str, object] = {
        "lease_id": "lease-1",
        "node_id": "node-a",
        "scratch": scratch,
        "declared": declared,
        "patterns": leaserules.check_outputs(declared),
        "max_bytes": 10 * 1024**2,
        "retained_until_unix_nanos": NOW_NS + 3600 * 10**9,
        "required": False,
        "min_free_bytes": 0,
    }
    values.update(changes)
    return PackRequest(**values)  # type: ignore[arg-type]


def _tree(root: Path, mtime: int, mode: int) -> Path:
    (root / "results" / "deep").mkdir(parents=True)
    (root / "results" / "a.csv").write_text("x,y\n1,2\n")
    (root / "results" / "deep" / "b.bin").write_bytes(bytes(range(256)) * 4099)
    (root / "model.pt").write_bytes(b"\x00weights" * 1000)
    (root / "ignored.log").write_text("not declared")
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            path.chmod(mode)
        os.utime(path, (mtime, mtime))
    return root


def _expected_archive(files: dict[str, bytes], dirs: list[str]) -> bytes:
    """The archive the format promises, built here from the names and bytes alone."""
    out = io.BytesIO()
    with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted([*files, *dirs], key=str.encode):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if name in dirs:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def test_same_files_give_the_same_bytes_whatever_the_times_modes_and_owners(
    tmp_path: Path,
) -> None:
    """Two scratch dirs with the same content but different mtimes, modes and owners
    pack to byte-identical archives, equal to one built independently from the format."""
    one = _tree(tmp_path / "one", 1_000_000, 0o600)
    two = _tree(tmp_path / "two", 1_700_000_000, 0o664)
    if os.geteuid() == 0:
        for path in two.rglob("*"):
            os.lchown(path, 1234, 5678)
    declared = ["results", "/scratch/model.pt"]
    a = pack(_request(one, declared), OutputStore(tmp_path / "out-a"), KEY.sign)
    b = pack(_request(two, declared), OutputStore(tmp_path / "out-b"), KEY.sign)
    bytes_a = (tmp_path / "out-a" / "lease-1.tar").read_bytes()
    bytes_b = (tmp_path / "out-b" / "lease-1.tar").read_bytes()
    assert bytes_a == bytes_b
    assert a.digest_hex == b.digest_hex and a.size == b.size == len(bytes_a)
    expected = _expected_archive(
        {
            "model.pt": (one / "model.pt").read_bytes(),
            "results/a.csv": (one / "results/a.csv").read_bytes(),
            "results/deep/b.bin": (one / "results/deep/b.bin").read_bytes(),
        },
        ["results", "results/deep"],
    )
    assert bytes_a == expected
    assert a.file_count == 3 and a.missing == ()


def test_commitment_digest_is_the_archive_root_and_its_signature_verifies(
    tmp_path: Path,
) -> None:
    """The digest is archive_root of the retained tar; the node's signature covers
    (lease id, node id, digest, size, chunk) and the JSON carries every field."""
    scratch = _tree(tmp_path / "s", 5, 0o644)
    store = OutputStore(tmp_path / "out")
    commitment = pack(_request(scratch, ["results/*.csv", "model.pt"]), store, KEY.sign)
    root, size = file_root(store.archive_path("lease-1"))
    assert (root.hex(), size) == (commitment.digest_hex, commitment.size)
    message = output_commitment_signing_bytes("lease-1", "node-a", root, size, CHUNK_BYTES)
    assert verify_ed25519(PUBLIC, bytes.fromhex(commitment.signature_hex), message)
    other = output_commitment_signing_bytes("lease-2", "node-a", root, size, CHUNK_BYTES)
    assert not verify_ed25519(PUBLIC, bytes.fromhex(commitment.signature_hex), other)
    stored = json.loads(store.commitment_path("lease-1").read_text())
    assert set(stored) >= {"size", "digest", "retained_until_unix_nanos", "signature"}
    assert Commitment.from_json(stored) == commitment
    found = store.lookup("lease-1", NOW_NS)
    assert found.digest_hex == commitment.digest_hex and found.size == size
    with tarfile.open(store.archive_path("lease-1")) as tar:
        assert tar.getnames() == ["model.pt", "results/a.csv"]


def test_a_symlink_to_a_host_file_is_never_packed(tmp_path: Path) -> None:
    """A symlink to /etc/passwd, declared or inside a declared dir, is skipped with the
    reason; a directory symlink is not descended; the host file's bytes are nowhere."""
    scratch = tmp_path / "s"
    (scratch / "out").mkdir(parents=True)
    (scratch / "out" / "real.txt").write_text("mine")
    (scratch / "out" / "passwd").symlink_to("/etc/passwd")
    (scratch / "etc").symlink_to("/etc")
    (scratch / "top").symlink_to("/etc/passwd")
    store = OutputStore(tmp_path / "out")
    commitment = pack(_request(scratch, ["out", "top", "etc/*"]), store, KEY.sign)
    data = store.archive_path("lease-1").read_bytes()
    assert b"root:" not in data
    with tarfile.open(store.archive_path("lease-1")) as tar:
        assert tar.getnames() == ["out", "out/real.txt"]
    assert "top" in commitment.missing and "etc/*" in commitment.missing
    assert "out/passwd (symlink, not followed)" in commitment.missing
    assert "top (symlink, not followed)" in commitment.missing


def test_outputs_over_output_max_fail_with_the_reason_and_leave_nothing(tmp_path: Path) -> None:
    """Passing output_max while writing stops the pack with outputs_over_limit; no
    archive, no commitment, no temporary file stays behind."""
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "big.bin").write_bytes(os.urandom(300_000))
    store = OutputStore(tmp_path / "out")
    # 200 000: the files alone are over it; 302 000: their headers and data fit, the
    # archive's end padding (to 10240 bytes: 307 200) does not, found while writing.
    for limit in (200_000, 302_000):
        with pytest.raises(PackFailed) as caught:
            pack(_request(scratch, ["big.bin"], max_bytes=limit), store, KEY.sign)
        assert caught.value.reason.startswith("outputs_over_limit:")
        assert not store.root.exists() or list(store.root.iterdir()) == []
    assert pack(_request(scratch, ["big.bin"], max_bytes=307_200), store, KEY.sign).size == 307_200


def test_missing_paths_are_listed_and_fatal_only_when_required(tmp_path: Path) -> None:
    """A declared path that matches nothing is in missing; with outputs_required the
    pack fails with outputs_missing naming it."""
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "here.txt").write_text("1")
    store = OutputStore(tmp_path / "out")
    commitment = pack(_request(scratch, ["here.txt", "nope/*.csv"]), store, KEY.sign)
    assert commitment.missing == ("nope/*.csv",) and commitment.file_count == 1
    with pytest.raises(PackFailed, match=r"^outputs_missing: .*nope/\*\.csv"):
        pack(
            _request(scratch, ["here.txt", "nope/*.csv"], lease_id="lease-2", required=True),
            store,
            KEY.sign,
        )


def test_the_disk_floor_is_never_crossed(tmp_path: Path) -> None:
    """A pack that would leave less than the floor free fails before writing."""
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "f").write_text("x")
    store = OutputStore(tmp_path / "out")
    with pytest.raises(PackFailed, match="floor"):
        pack(_request(scratch, ["f"], min_free_bytes=2**62), store, KEY.sign)
    assert not store.archive_path("lease-1").exists()


def test_pack_is_idempotent_after_a_crash_before_the_report(tmp_path: Path) -> None:
    """A second pack of the same lease (the agent died before reporting) returns the
    stored commitment unchanged, even though the scratch dir changed meanwhile."""
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "f").write_text("first")
    store = OutputStore(tmp_path / "out")
    first = pack(_request(scratch, ["f"]), store, KEY.sign)
    (scratch / "f").write_text("second, longer")
    assert pack(_request(scratch, ["f"]), store, KEY.sign) == first


def test_retention_gc_removes_the_archive_and_lookup_says_why(tmp_path: Path) -> None:
    """After retained_until the GC deletes the archive; lookup raises NotRetained saying
    the retention passed; the commitment itself goes TOMBSTONE_S later."""
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "f").write_text("x" * 1000)
    store = OutputStore(tmp_path / "out")
    until = NOW_NS + 10 * 10**9
    pack(_request(scratch, ["f"], retained_until_unix_nanos=until), store, KEY.sign)
    assert store.usage()[0] == 1
    assert store.collect_garbage(until - 1) == 0
    assert store.lookup("lease-1", until - 1).size > 0
    freed = store.collect_garbage(until)
    assert freed > 0 and not store.archive_path("lease-1").exists()
    assert store.usage() == (0, 0)
    with pytest.raises(NotRetained, match="retention period has passed"):
        store.lookup("lease-1", until)
    store.collect_garbage(until + TOMBSTONE_S * 10**9)
    assert not store.commitment_path("lease-1").exists()


def test_startup_gc_removes_what_an_interrupted_pack_left(tmp_path: Path) -> None:
    """An archive without its commitment (or a .tmp) is an interrupted pack: removed
    at start, never served."""
    root = tmp_path / "out"
    root.mkdir()
    (root / "lease-9.tar").write_bytes(b"partial")
    (root / "lease-8.tar.tmp").write_bytes(b"partial")
    store = OutputStore(root)
    with pytest.raises(NotRetained):
        store.lookup("lease-9")
    assert store.collect_garbage(startup=True) == 14
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("outputs", "key", "words"),
    [
        (["../etc/passwd"], "outputs[0]", "'..'"),
        (["a", "/scratch/../../etc"], "outputs[1]", "'..'"),
        (["/etc/passwd"], "outputs[0]", "outside /scratch"),
        (["/scratchy/x"], "outputs[0]", "outside /scratch"),
        ([""], "outputs[0]", "empty"),
        (["  "], "outputs[0]", "empty"),
        (["a\nb"], "outputs[0]", "control character"),
        (["x" * 1025], "outputs[0]", "at most 1024"),
        (["f"] * 65, "outputs", "at most 64"),
        (["a**b/c"], "outputs[0]", "'**'"),
    ],
)
def test_hostile_output_paths_are_refused_naming_the_entry(
    outputs: list[str], key: str, words: str
) -> None:
    """leaserules.check_outputs: no way out of /scratch, named by index."""
    with pytest.raises(leaserules.RuleError) as caught:
        leaserules.check_outputs(outputs)
    assert caught.value.key == key and words in caught.value.message


def test_output_settings_without_outputs_are_refused() -> None:
    """output_max, output_retention or outputs_required alone is a mistake, said so."""
    with pytest.raises(leaserules.RuleError, match="output_max_bytes: set, but no outputs"):
        leaserules.check_outputs([], max_bytes=5)
    with pytest.raises(leaserules.RuleError, match="outputs_required: set"):
        leaserules.check_outputs([], required=True)
    with pytest.raises(leaserules.RuleError, match="output_retention_seconds: must be"):
        leaserules.check_outputs(["a"], retention_seconds=10**12)
    assert leaserules.check_outputs(["/scratch", "/scratch/a/./b", "c/"]) == [".", "a/b", "c"]


@pytest.mark.asyncio
async def test_keeper_caps_retention_and_reports_what_is_kept(tmp_path: Path) -> None:
    """The retention asked is cut to outputs.max_retention (0 = the default); each pack
    and each sweep tells the node (the inventory's retained_outputs)."""
    from agent.config import AgentConfig
    from agent.leases.output_keeper import OutputKeeper
    from agent.leases.spec import parse_spec

    config = AgentConfig.model_validate(
        {
            "node": {"state_dir": str(tmp_path / "state")},
            "outputs": {"default_retention": "1h", "max_retention": "2h"},
        }
    )
    changes: list[tuple[int, int]] = []
    now = [1_800_000_000.0]
    keeper = OutputKeeper(config, "node-a", KEY.sign, clock=lambda: now[0])
    keeper.on_change = lambda count, size: changes.append((count, size))
    asks_long = parse_spec({"image": "b", "outputs": ["f"], "output_retention_seconds": 86400})
    assert keeper.retention_seconds(asks_long) == 7200
    assert keeper.retention_seconds(parse_spec({"image": "b", "outputs": ["f"]})) == 3600
    scratch = tmp_path / "s"
    scratch.mkdir()
    (scratch / "f").write_text("x")
    kept = await keeper.keep("l-1", asks_long, scratch)
    assert kept.retained_until_unix_nanos == round((now[0] + 7200) * 1e9)
    assert config.outputs_dir() == tmp_path / "state" / "outputs"
    assert changes == [(1, kept.size)]
    now[0] += 7200
    assert await keeper.collect() == kept.size
    assert changes[-1] == (0, 0)


def test_a_hostile_tree_cannot_exhaust_the_stack_or_memory(tmp_path: Path) -> None:
    """A 300-level directory tree is cut at MAX_DEPTH with the reason (no RecursionError);
    thousands of empty files stop the selection with outputs_over_limit before any
    byte is written (each costs a 512-byte header)."""
    from agent.leases.output_pack import MAX_DEPTH

    scratch = tmp_path / "s"
    deep = scratch / "d"
    for _ in range(300):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("x")
    store = OutputStore(tmp_path / "out")
    commitment = pack(_request(scratch, ["**"]), store, KEY.sign)
    assert commitment.file_count == 0
    assert any(f"deeper than {MAX_DEPTH} directories" in m for m in commitment.missing)
    many = tmp_path / "many"
    many.mkdir()
    for index in range(3000):
        (many / f"f{index}").touch()
    with pytest.raises(PackFailed, match=r"^outputs_over_limit"):
        pack(_request(many, ["."], lease_id="l-2", max_bytes=1024 * 1024), store, KEY.sign)
    assert not store.archive_path("l-2").exists()
