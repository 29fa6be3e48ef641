"""Packing a lease's declared outputs into its deterministic, signed archive.

At lease end the agent reads the host side of the lease's scratch dir (the container
has exited: nothing writes there any more) and writes ``<lease_id>.tar`` with the
files the spec's ``outputs`` name, then ``<lease_id>.json`` with the commitment the
node signs (PROTOCOL.md "Lease outputs"). The same files give the same bytes on any
host: entries sorted by name, every header field fixed (mtime 0, uid/gid 0, no user
or group names, mode 0644/0755), PAX format. Only regular files and directories go
in; a symlink is never followed (it could name a host file such as /etc/passwd), and
it, a device, a socket or an unreadable file is listed in ``missing`` with why.

Blocking (file walks and copies): run in a worker thread.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from gpuagent import leaserules
from gpuagent.outputs import CHUNK_BYTES, ArchiveDigest, output_commitment_signing_bytes
from gpuagent.units import format_size

from .output_store import OutputStore

Signer = Callable[[bytes], bytes]
# Recheck the disk floor this often while writing (a file system shared with others
# can fill while a large archive is written).
FLOOR_CHECK_BYTES = 64 * 1024 * 1024
# Deeper entries are skipped (the walk recurses: a tenant's 5000-level tree must not
# exhaust the stack); far deeper than any results directory.
MAX_DEPTH = 128
_COPY_BLOCK = 1 << 20


class PackFailed(Exception):
    """The outputs cannot be kept; ``reason`` is the lease's failure reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Commitment:
    """The signed commitment as the agent keeps it (the OutputCommitment's fields)."""

    lease_id: str
    node_id: str
    digest_hex: str
    size: int
    chunk_bytes: int
    signature_hex: str
    file_count: int
    missing: tuple[str, ...] = ()
    retained_until_unix_nanos: int = 0

    def to_json(self) -> dict[str, Any]:
        # The keys OutputStore.lookup reads (size, digest, retained_until_unix_nanos).
        return {
            "lease_id": self.lease_id,
            "node_id": self.node_id,
            "digest": self.digest_hex,
            "size": self.size,
            "chunk_bytes": self.chunk_bytes,
            "signature": self.signature_hex,
            "file_count": self.file_count,
            "missing": list(self.missing),
            "retained_until_unix_nanos": self.retained_until_unix_nanos,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commitment:
        return cls(
            lease_id=str(data["lease_id"]),
            node_id=str(data["node_id"]),
            digest_hex=str(data["digest"]),
            size=int(data["size"]),
            chunk_bytes=int(data["chunk_bytes"]),
            signature_hex=str(data["signature"]),
            file_count=int(data["file_count"]),
            missing=tuple(str(m) for m in data.get("missing", ())),
            retained_until_unix_nanos=int(data.get("retained_until_unix_nanos", 0)),
        )


@dataclass
class _Entry:
    name: str  # relative to the scratch dir, '/'-separated, UTF-8
    is_dir: bool
    size: int = 0
    executable: bool = False


@dataclass
class _Selection:
    limit: int  # output_max: the selection alone may show it is passed
    entries: dict[str, _Entry] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # declared patterns that matched nothing
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not packed
    # A lower bound of the archive's size (a header and the padded data per entry, the
    # end blocks): past the limit, the pack is over it whatever else happens, and
    # stopping here bounds the memory a tenant's million empty files could take.
    floor_bytes: int = 2 * tarfile.BLOCKSIZE

    def add(self, entry: _Entry) -> None:
        self.entries[entry.name] = entry
        self.floor_bytes += tarfile.BLOCKSIZE + -(-entry.size // tarfile.BLOCKSIZE) * (
            tarfile.BLOCKSIZE
        )
        if self.floor_bytes > self.limit:
            raise PackFailed(_over_limit(self.limit))


def _over_limit(limit: int) -> str:
    return (
        f"{leaserules.OUTPUTS_OVER_LIMIT}: the outputs archive passed the lease's "
        f"output_max of {format_size(limit)}"
    )


def select(
    scratch: Path, patterns: list[str], declared: list[str], limit: int = 2**63
) -> _Selection:
    """What ``patterns`` (relative to ``scratch``, from leaserules.check_outputs) name:
    matched files, matched directories with everything below them, and what is left out.
    PackFailed once the selection alone is over ``limit``."""
    selection = _Selection(limit)
    for pattern, shown in zip(patterns, declared, strict=True):
        before = len(selection.entries)
        parts = [] if pattern == "." else pattern.split("/")
        for name in _expand(scratch, "", parts, selection):
            _add(scratch, name, selection)
        if len(selection.entries) == before and not _matched_known(pattern, selection):
            selection.missing.append(shown)
    return selection


def _matched_known(pattern: str, selection: _Selection) -> bool:
    # Two patterns naming the same file: the second matched too, even though it added
    # nothing new.
    return any(_glob_match(pattern, name) for name in selection.entries)


def _glob_match(pattern: str, name: str) -> bool:
    if pattern == ".":
        return True
    return _match_parts(pattern.split("/"), name.split("/"))


def _match_parts(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return True  # a matched directory holds everything below it
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], name[i:]) for i in range(len(name) + 1))
    return (
        bool(name)
        and fnmatch.fnmatchcase(name[0], pattern[0])
        and _match_parts(pattern[1:], name[1:])
    )


def _expand(scratch: Path, prefix: str, parts: list[str], selection: _Selection) -> Iterator[str]:
    """Names under ``prefix`` that match ``parts``; descends into real directories only."""
    if not parts:
        yield prefix
        return
    if prefix.count("/") >= MAX_DEPTH:
        selection.skipped[prefix] = f"deeper than {MAX_DEPTH} directories"
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _expand(scratch, prefix, rest, selection)
        for name, is_dir in _listdir(scratch, prefix, selection):
            if is_dir:
                yield from _expand(scratch, name, parts, selection)
        return
    if not any(c in head for c in "*?["):
        name = f"{prefix}/{head}" if prefix else head
        kind = _kind(scratch, name, selection)
        if kind == "dir" and rest:
            yield from _expand(scratch, name, rest, selection)
        elif kind is not None and not rest:
            yield name
        return
    for name, is_dir in _listdir(scratch, prefix, selection):
        if not fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], head):
            continue
        if rest:
            if is_dir:
                yield from _expand(scratch, name, rest, selection)
        elif _kind(scratch, name, selection) is not None:
            yield name


def _listdir(scratch: Path, prefix: str, selection: _Selection) -> list[tuple[str, bool]]:
    """(name, is a real directory) of each entry of ``prefix``, sorted; symlinks are
    entries, never directories."""
    try:
        with os.scandir(scratch / prefix if prefix else scratch) as it:
            found = sorted(
                (f"{prefix}/{e.name}" if prefix else e.name, e.is_dir(follow_symlinks=False))
                for e in it
            )
    except OSError as exc:
        selection.skipped[prefix or "."] = f"unreadable directory: {exc.strerror}"
        return []
    return found


def _kind(scratch: Path, name: str, selection: _Selection) -> str | None:
    """ "file" or "dir" for what may be packed; None (noted in ``skipped``) otherwise."""
    try:
        mode = os.lstat(scratch / name).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        selection.skipped[name] = f"unreadable: {exc.strerror}"
        return None
    if stat.S_ISLNK(mode):
        selection.skipped[name] = "symlink, not followed"
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    selection.skipped[name] = "not a regular file or directory"
    return None


def _add(scratch: Path, name: str, selection: _Selection) -> None:
    """Add ``name`` (a file or a directory with its whole tree) to the selection."""
    if name in selection.entries:
        return
    if name.count("/") >= MAX_DEPTH:
        selection.skipped[name] = f"deeper than {MAX_DEPTH} directories"
        return
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        selection.skipped[name.encode("utf-8", "replace").decode()] = "name is not UTF-8"
        return
    path = scratch / name if name else scratch
    try:
        info = os.lstat(path)
    except OSError as exc:
        selection.skipped[name] = f"unreadable: {exc.strerror}"
        return
    if stat.S_ISREG(info.st_mode):
        try:  # an agent without root may not read what the container's root wrote
            os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK))
        except OSError as exc:
            selection.skipped[name] = f"unreadable: {exc.strerror}"
            return
        selection.add(_Entry(name, False, info.st_size, bool(info.st_mode & stat.S_IXUSR)))
        return
    if not stat.S_ISDIR(info.st_mode):
        return  # _kind noted why
    if name:
        selection.add(_Entry(name, True))
    for child, _is_dir in _listdir(scratch, name, selection):
        if _kind(scratch, child, selection) is not None:
            _add(scratch, child, selection)


class _Sink:
    """The archive file: every byte written is hashed, counted and held to the limit."""

    def __init__(
        self, file: Any, limit: int, floor_check: Callable[[], None], chunk_bytes: int
    ) -> None:
        self._file = file
        self._limit = limit
        self._floor_check = floor_check
        self._since_check = 0
        self.digest = ArchiveDigest(chunk_bytes)

    def write(self, data: bytes) -> int:
        if self.digest.size + len(data) > self._limit:
            raise PackFailed(_over_limit(self._limit))
        self._since_check += len(data)
        if self._since_check >= FLOOR_CHECK_BYTES:
            self._since_check = 0
            self._floor_check()
        self._file.write(data)
        self.digest.update(data)
        return len(data)

    def tell(self) -> int:
        return self.digest.size


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    # Every field fixed: what varies between hosts (times, owners, umask) is left out.
    info = tarfile.TarInfo(entry.name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.size = 0
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if entry.executable else 0o644
        info.size = entry.size
    return info


def write_archive(
    scratch: Path,
    entries: list[_Entry],
    out: Any,
    limit: int,
    floor_check: Callable[[], None] = lambda: None,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[bytes, int]:
    """Write the deterministic tar of ``entries`` to ``out``; (Merkle root, size)."""
    sink = _Sink(out, limit, floor_check, chunk_bytes)
    # write + tell is all TarFile uses of its file in "w" mode.
    with tarfile.TarFile(
        fileobj=cast(IO[bytes], sink), mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8"
    ) as tar:
        for entry in sorted(entries, key=lambda e: e.name.encode("utf-8")):
            info = _tarinfo(entry)
            if entry.is_dir:
                tar.addfile(info)
                continue
            fd = os.open(scratch / entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as source:
                now = os.fstat(source.fileno())
                if not stat.S_ISREG(now.st_mode) or now.st_size != entry.size:
                    raise PackFailed(
                        f"{leaserules.OUTPUTS_FAILED}: {entry.name} changed while it was packed"
                    )
                tar.addfile(info, source)
    return sink.digest.root(), sink.digest.size


def estimate_size(entries: list[_Entry]) -> int:
    """An upper bound of the archive's size (headers, data, padding), for the disk floor."""
    total = 2 * tarfile.RECORDSIZE
    for entry in entries:
        # One header, a PAX header (with its own header) for a long or non-ASCII name.
        total += 3 * tarfile.BLOCKSIZE + len(entry.name.encode()) * 2
        total += -(-entry.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


@dataclass(frozen=True)
class PackRequest:
    lease_id: str
    node_id: str
    scratch: Path
    declared: list[str]  # as the spec says them (shown in ``missing``)
    patterns: list[str]  # relative to /scratch (leaserules.check_outputs)
    max_bytes: int
    retained_until_unix_nanos: int
    required: bool
    min_free_bytes: int  # the disk floor under the outputs directory


def pack(request: PackRequest, store: OutputStore, sign: Signer) -> Commitment:
    """Pack, sign and store the outputs of a lease; PackFailed says why it cannot.

    Idempotent: a commitment already stored for the lease (the agent died between
    packing and reporting) is returned as it is.
    """
    existing = _stored(store, request.lease_id)
    if existing is not None:
        return existing
    selection = select(request.scratch, request.patterns, request.declared, request.max_bytes)
    if request.required and selection.missing:
        raise PackFailed(
            f"{leaserules.OUTPUTS_MISSING}: declared outputs matched nothing: "
            + ", ".join(selection.missing[:8])
        )
    entries = list(selection.entries.values())
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def floor_check(extra: int = 0) -> None:
        free = shutil.disk_usage(store.root).free
        if free - extra < request.min_free_bytes:
            raise PackFailed(
                f"{leaserules.OUTPUTS_FAILED}: keeping the outputs would leave "
                f"{format_size(max(free - extra, 0))} free on the provider's disk, under its "
                f"floor of {format_size(request.min_free_bytes)}"
            )

    floor_check(min(estimate_size(entries), request.max_bytes))
    archive = store.archive_path(request.lease_id)
    tmp = archive.with_name(archive.name + ".tmp")
    try:
        with tmp.open("wb") as out:
            root, size = write_archive(
                request.scratch, entries, out, request.max_bytes, floor_check
            )
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    skipped = sorted(selection.skipped.items())
    missing = [*selection.missing, *(f"{name} ({why})" for name, why in skipped)]
    signature = sign(
        output_commitment_signing_bytes(request.lease_id, request.node_id, root, size, CHUNK_BYTES)
    )
    commitment = Commitment(
        lease_id=request.lease_id,
        node_id=request.node_id,
        digest_hex=root.hex(),
        size=size,
        chunk_bytes=CHUNK_BYTES,
        signature_hex=signature.hex(),
        file_count=sum(1 for e in entries if not e.is_dir),
        # Bounded as the wire bounds it (leaserules.MAX_OUTPUTS patterns + skipped names).
        missing=tuple(leaserules.clip(m, 512) for m in missing[:256]),
        retained_until_unix_nanos=request.retained_until_unix_nanos,
    )
    _write_json(store.commitment_path(request.lease_id), commitment.to_json())
    _fsync_dir(store.root)
    return commitment


def _stored(store: OutputStore, lease_id: str) -> Commitment | None:
    path = store.commitment_path(lease_id)
    if not path.is_file() or not store.archive_path(lease_id).is_file():
        return None
    try:
        return Commitment.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None  # a torn or foreign file: pack again over it


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as out:
        json.dump(data, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
