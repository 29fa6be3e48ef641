"""A container's CPU, memory and network counters, read straight from the kernel.

``docker stats`` takes a second or more per call; the same numbers are a few
small file reads away. The container's cgroup is found from its init process
(``/proc/<pid>/cgroup``), which works for both Docker cgroup drivers and for
cgroup v2, v1 and the hybrid layout; without a pid, the usual paths for the
container id are tried.

Network bytes, from the first source that exists for the lease, chosen once so
one lease's counter never switches between sources mid-life:

1. the lease's own Docker network (a bridge network labelled
   ``io.gpuagent.lease-id=<lease>``): the Linux bridge's counters under
   ``/sys/class/net/<bridge>/statistics``. With one container per network all of
   the lease's traffic crosses the bridge, and sysfs stays readable under the
   unit's sandbox (``ProtectProc=invisible`` hides only /proc);
2. ``/proc/<pid>/net/dev`` of the container's init process, which shows its
   network namespace's counters (readable when the agent may see the process);
3. neither: unknown (``None``), never 0.

Every field is ``None`` when its file is missing or unreadable: the sampler
flags it as unmeasured instead of failing. Blocking: call from a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SYS_FS_CGROUP = Path("/sys/fs/cgroup")
SYS_CLASS_NET = Path("/sys/class/net")
PROC = Path("/proc")
# The label the lease's network carries (the container carries the same one).
LEASE_NETWORK_LABEL = "io.gpuagent.lease-id"
# Set on the container by the runtime: the (spare) network it took; isolation/networks.
CONTAINER_NETWORK_LABEL = "io.gpuagent.network"
MANAGED_LABEL = "io.gpuagent.managed"
# Set when a network was created with an explicit bridge name instead of br-<id[:12]>.
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


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


def lease_bridge(
    container: Mapping[str, Any],
    inspect_network: Callable[[str], Mapping[str, Any]],
    lease_id: str,
) -> str | None:
    """The Linux bridge of the container's per-lease network, or None.

    ``container`` is Docker's container inspect; ``inspect_network`` Docker's
    network inspect by id. Only a bridge network of this lease alone counts: one
    labelled with its id, or the agent's spare network that the container's
    ``io.gpuagent.network`` label names (a spare serves exactly one lease and
    cannot be relabelled). A shared network's counters would bill other leases'
    traffic.
    """
    own = ((container.get("Config") or {}).get("Labels") or {}).get(CONTAINER_NETWORK_LABEL)
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    for endpoint in networks.values():
        network_id = (endpoint or {}).get("NetworkID") or ""
        if not network_id:
            continue
        info = inspect_network(network_id)
        labels = info.get("Labels") or {}
        spare = bool(own) and info.get("Name") == own and labels.get(MANAGED_LABEL) == "true"
        if info.get("Driver") != "bridge" or not (
            labels.get(LEASE_NETWORK_LABEL) == lease_id or spare
        ):
            continue
        named = (info.get("Options") or {}).get(BRIDGE_NAME_OPTION)
        return str(named) if named else f"br-{str(info.get('Id') or network_id)[:12]}"
    return None


def read_bridge(sys_class_net: Path, bridge: str) -> tuple[int, int] | None:
    """(rx, tx) bytes of the lease behind ``bridge``, or None when unreadable.

    Seen from the bridge, what it receives is what the lease's container sent and
    what it transmits is what the container received, so the two are swapped.
    """
    stats = sys_class_net / bridge / "statistics"
    bridge_rx = _read_int(stats / "rx_bytes")
    bridge_tx = _read_int(stats / "tx_bytes")
    if bridge_rx is None or bridge_tx is None:
        return None
    return bridge_tx, bridge_rx


class CgroupReader:
    """Counters of one container, located by container id and/or init pid.

    ``bridge``: the Linux bridge of the lease's own network (``lease_bridge``);
    when given, network bytes come from it alone, else from ``/proc/<pid>``.
    """

    def __init__(
        self,
        container_id: str,
        pid: int | None,
        *,
        bridge: str | None = None,
        cgroup_root: Path = SYS_FS_CGROUP,
        proc: Path = PROC,
        sys_class_net: Path = SYS_CLASS_NET,
    ) -> None:
        self.container_id = container_id
        self.pid = pid
        self.bridge = bridge
        self._root = cgroup_root
        self._proc = proc
        self._sys_class_net = sys_class_net
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
        rx, tx = self._network()
        if cpu is None and current is None:
            # Gone or moved (container restarted): look it up again next time.
            self._dirs = None
        return ContainerCounters(cpu, current, peak, rx, tx)

    def _network(self) -> tuple[int | None, int | None]:
        if self.bridge is not None:
            # No fallback to /proc once the lease has a bridge: the two count
            # different things, and a switch would look like a counter reset.
            counters = read_bridge(self._sys_class_net, self.bridge)
            return counters if counters is not None else (None, None)
        if not self._pid_valid:
            return None, None
        try:
            return parse_net_dev((self._proc / str(self.pid) / "net" / "dev").read_text())
        except (OSError, ValueError):
            return None, None
