"""A container's CPU, memory and network counters, read straight from the kernel.

``docker stats`` takes a second or more per call; the same numbers are a few
small file reads away. The container's cgroup is found from its init process
(``/proc/<pid>/cgroup``), which works for both Docker cgroup drivers and for
cgroup v2, v1 and the hybrid layout; without a pid, the usual paths for the
container id are tried. Network bytes come from ``/proc/<pid>/net/dev``, which
shows the counters of the process's network namespace (the container's).

Every field is ``None`` when its file is missing or unreadable: the sampler
flags it as unmeasured instead of failing. Blocking: call from a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYS_FS_CGROUP = Path("/sys/fs/cgroup")
PROC = Path("/proc")


@dataclass(frozen=True)
class ContainerCounters:
    """One reading. ``memory_peak_bytes`` is the kernel's high-water mark since the
    cgroup was created (v2 ``memory.peak``, v1 ``memory.max_usage_in_bytes``)."""

    cpu_usec: int | None = None
    memory_current_bytes: int | None = None
    memory_peak_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


@dataclass(frozen=True)
class CgroupDirs:
    unified: Path | None  # cgroup v2 directory (pure v2, or the hybrid "unified" tree)
    cpuacct: Path | None  # cgroup v1 controllers, when the host still mounts them
    memory: Path | None


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    # "max" appears in limit files; peak/current files are plain integers.
    return int(text) if text.isdigit() else None


def _read_keyed(path: Path | None, key: str) -> int | None:
    """A value from a flat keyed file such as cpu.stat (``usage_usec 1234``)."""
    if path is None:
        return None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as controller -> path; ``""`` is the v2 hierarchy."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def parse_net_dev(text: str) -> tuple[int, int]:
    """Total (rx, tx) bytes over every interface but loopback, from /proc/*/net/dev."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() == "lo":
            continue
        fields = rest.split()
        if len(fields) >= 9:
            rx += int(fields[0])
            tx += int(fields[8])
    return rx, tx


class CgroupReader:
    """Counters of one container, located by container id and/or init pid."""

    def __init__(
        self,
        container_id: str,
        pid: int | None,
        *,
        cgroup_root: Path = SYS_FS_CGROUP,
        proc: Path = PROC,
    ) -> None:
        self.container_id = container_id
        self.pid = pid
        self._root = cgroup_root
        self._proc = proc
        self._dirs: CgroupDirs | None = None
        self._pid_valid = False

    def _v2_root(self) -> Path | None:
        for candidate in (self._root, self._root / "unified"):
            if (candidate / "cgroup.controllers").exists():
                return candidate
        return None

    def _v1_root(self, controller: str) -> Path | None:
        for name in (controller, "cpu,cpuacct", "cpuacct,cpu"):
            if controller in name.split(",") and (self._root / name).is_dir():
                return self._root / name
        return None

    def _from_pid(self) -> dict[str, str] | None:
        if self.pid is None:
            return None
        try:
            paths = parse_proc_cgroup((self._proc / str(self.pid) / "cgroup").read_text())
        except OSError:
            return None
        # A pid outlives nothing: once the container is gone the number may belong
        # to another process, whose counters must not be billed to this lease.
        if self.container_id and not any(self.container_id in p for p in paths.values()):
            return None
        return paths

    def _candidates(self, base: Path) -> list[Path]:
        cid = self.container_id
        return [base / "system.slice" / f"docker-{cid}.scope", base / "docker" / cid]

    def _locate(self, base: Path | None, relative: str | None) -> Path | None:
        if base is None:
            return None
        if relative is not None:
            path = base / relative.lstrip("/")
            return path if path.is_dir() else None
        if not self.container_id:
            return None
        return next((p for p in self._candidates(base) if p.is_dir()), None)

    def resolve(self) -> CgroupDirs:
        by_pid = self._from_pid()
        self._pid_valid = by_pid is not None
        rel = by_pid or {}
        dirs = CgroupDirs(
            unified=self._locate(self._v2_root(), rel.get("") if by_pid else None),
            cpuacct=self._locate(self._v1_root("cpuacct"), rel.get("cpuacct") if by_pid else None),
            memory=self._locate(self._v1_root("memory"), rel.get("memory") if by_pid else None),
        )
        if dirs == CgroupDirs(None, None, None):
            log.debug(
                "container cgroup not found",
                extra={"container_id": self.container_id, "pid": self.pid},
            )
        return dirs

    def read(self) -> ContainerCounters:
        if self._dirs is None:
            self._dirs = self.resolve()
        dirs = self._dirs
        unified = dirs.unified
        cpu = _read_keyed(unified / "cpu.stat" if unified else None, "usage_usec")
        if cpu is None and dirs.cpuacct is not None:
            nanos = _read_int(dirs.cpuacct / "cpuacct.usage")
            cpu = None if nanos is None else nanos // 1000
        current = _read_int(unified / "memory.current" if unified else None)
        peak = _read_int(unified / "memory.peak" if unified else None)
        if current is None and dirs.memory is not None:
            current = _read_int(dirs.memory / "memory.usage_in_bytes")
            peak = _read_int(dirs.memory / "memory.max_usage_in_bytes")
        rx = tx = None
        if self._pid_valid:
            try:
                rx, tx = parse_net_dev((self._proc / str(self.pid) / "net" / "dev").read_text())
            except (OSError, ValueError):
                rx = tx = None
        if cpu is None and current is None:
            # Gone or moved (container restarted): look it up again next time.
            self._dirs = None
        return ContainerCounters(cpu, current, peak, rx, tx)
