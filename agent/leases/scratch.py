"""Per-lease scratch space: bounded, and never a way to plant setuid files or devices.

Two modes (``runtime.scratch_mode``; ``auto`` picks the first that works here):

- ``loop``: each lease's scratch is an ext4 filesystem image of exactly its quota
  (sparse, so it takes host disk only as it fills), loop-mounted ``nosuid,nodev``
  on the host and bind-mounted into the container. The quota is a hard limit:
  a write past it fails with ENOSPC inside the lease, nothing else notices. A bind
  mount cannot take ``nosuid`` itself (the kernel ignores it on the first bind),
  but it inherits the flags of the mount it binds, which is why the filesystem is
  mounted by the agent rather than handed to Docker as a plain directory. Needs
  mount rights (root or CAP_SYS_ADMIN), ``mkfs.ext4`` and loop devices.
- ``measured``: a plain directory under the state dir (0700, so no host user but
  the agent's reaches a file in it), its size measured every
  ``runtime.scratch_check_interval``; a lease over its quota is stopped with
  ``scratch_quota_exceeded``. What the agent runs as under the shipped systemd
  unit (no CAP_SYS_ADMIN). The agent cannot mount then, so the unit's privileged
  pre-start (``gpu-agent scratch-mount``, run as root) makes the scratch root a
  ``nosuid,nodev`` bind mount of itself: every lease dir below it, on the host and
  in Docker's bind into the container, inherits the flags. Without that mount,
  ``nosuid`` rests on the leases' ``no-new-privileges`` inside and the 0700 state
  dir outside, and ``doctor`` says so.

Blocking (subprocess, file walks): call from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Literal

from ..hosttools import run_tool

log = logging.getLogger(__name__)

ScratchMode = Literal["loop", "measured"]
LOOP_CONTROL = Path("/dev/loop-control")
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"


class ScratchError(Exception):
    """Scratch space could not be made; the message fits a lease's reason."""


def loop_supported() -> str | None:
    """Why loop-mounted scratch cannot work here, or None when it can."""
    if os.geteuid() != 0:
        return "the agent is not root (mounting needs CAP_SYS_ADMIN)"
    if not LOOP_CONTROL.exists():
        return f"no loop devices ({LOOP_CONTROL} missing)"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
    return None


def resolve_mode(setting: Literal["auto", "loop", "measured"]) -> tuple[ScratchMode, str]:
    """The mode this host gets, and why (for logs and ``doctor``)."""
    if setting == "measured":
        return "measured", "runtime.scratch_mode is measured"
    problem = loop_supported()
    if problem is None:
        return "loop", "loop-mounted ext4 image per lease: hard quota, nosuid,nodev"
    if setting == "loop":
        raise ScratchError(f"runtime.scratch_mode is loop but {problem}")
    return "measured", f"quota measured, not enforced by the filesystem: {problem}"


def root_flags_missing(root: Path) -> list[str]:
    """Which of nosuid, nodev the file system holding ``root`` lacks."""
    try:
        flags = os.statvfs(root).f_flag
    except OSError:
        return ["nosuid", "nodev"]
    return [
        name for name, bit in (("nosuid", os.ST_NOSUID), ("nodev", os.ST_NODEV)) if not flags & bit
    ]


def is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point, bind mounts of a directory onto itself included
    (``os.path.ismount`` compares devices, so it misses those)."""
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(path)
    for line in lines:
        fields = line.split(" ")
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        if len(fields) > 4 and _unescape(fields[4]) == target:
            return True
    return False


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_root_nosuid(root: Path) -> bool:
    """Make ``root`` a nosuid,nodev bind mount of itself; False if it already was.

    Root's job (the systemd unit's ``+`` pre-start), in the host's mount namespace so
    Docker's binds of the lease dirs below inherit the flags. Idempotent. A fresh
    ``root`` gets the owner and mode of its parent (the state dir: the agent's user,
    0700), so the unprivileged agent can make its lease dirs in it.
    """
    if not root.exists():
        parent = root.parent.stat()
        root.mkdir(mode=0o700, parents=True)
        os.chown(root, parent.st_uid, parent.st_gid)
    if not root_flags_missing(root):
        return False
    if not is_mount_point(root):
        _run("mount", "--bind", str(root), str(root))
    # The kernel ignores nosuid/nodev on the first bind: a remount applies them.
    _run("mount", "-o", "remount,bind,nosuid,nodev", str(root))
    return True


def unmount_root(root: Path) -> bool:
    """Undo ``mount_root_nosuid``; False if ``root`` was not a mount point."""
    if not is_mount_point(root):
        return False
    try:
        _run("umount", str(root))
    except ScratchError:
        _run("umount", "-l", str(root))  # a lease's bind still holds it: detach now
    return True


def _run(*argv: str) -> None:
    try:
        done = run_tool(argv, timeout=60)
    except OSError as exc:
        raise ScratchError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise ScratchError(f"{argv[0]} failed: {done.stderr.strip()[:300]}")


def directory_bytes(path: Path) -> int:
    """Disk space the files under ``path`` take (allocated blocks; hard links once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path, onerror=lambda _e: None):
        for name in [*files, *dirs]:
            with contextlib.suppress(OSError):
                st = (Path(root) / name).lstat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class ScratchSpace:
    def __init__(self, root: Path, mode: ScratchMode) -> None:
        self.root = root
        self.mode = mode

    def _image(self, directory: Path) -> Path:
        return directory.with_name(directory.name + ".img")

    def prepare(self, directory: Path, quota_bytes: int) -> None:
        """Make ``directory`` the lease's scratch; idempotent (a retry, a restart)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.mode == "loop" and not os.path.ismount(directory):
            image = self._image(directory)
            # Sparse: the image takes host disk only as the lease writes.
            with image.open("wb") as handle:
                handle.truncate(quota_bytes)
            # No journal (scratch does not outlive a crash that matters), no reserved
            # blocks (the quota is the lease's), lazy init (mkfs in milliseconds).
            _run(
                "mkfs.ext4",
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,nodiscard",
                str(image),
            )
            _run("mount", "-o", MOUNT_OPTIONS, str(image), str(directory))
        # World-writable (sticky) so images running as a non-root user can use it;
        # the state dir above it (0700) keeps host users out.
        directory.chmod(0o1777)

    def used_bytes(self, directory: Path) -> int:
        if self.mode == "loop" and os.path.ismount(directory):
            stats = os.statvfs(directory)
            return (stats.f_blocks - stats.f_bfree) * stats.f_frsize
        return directory_bytes(directory)

    def remove(self, directory: Path) -> None:
        """Unmount (loop mode) and delete; a missing one is fine. Containers go first."""
        if os.path.ismount(directory):
            try:
                _run("umount", str(directory))
            except ScratchError:
                # Still busy (a container being torn down): detach now, freed when idle.
                if os.path.ismount(directory):
                    _run("umount", "-l", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
        self._image(directory).unlink(missing_ok=True)
