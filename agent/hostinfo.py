"""The host's inventory: CPU, memory, disks, network, OS, Docker and the NVIDIA toolkit.

Everything is best effort: a probe that fails leaves its field ``None`` and
says why in ``problems``, because an inventory with a gap is still worth
reporting. Blocking (subprocess, Docker API): call from a worker thread.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import docker
import psutil

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")
# Pseudo and container-internal filesystems: not where leases or data live.
_SKIP_FSTYPES = frozenset({"squashfs", "overlay", "tmpfs", "devtmpfs", "nsfs", "autofs"})


@dataclass(frozen=True)
class Disk:
    mountpoint: str
    device: str
    fstype: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class NetInterface:
    name: str
    up: bool
    speed_mbps: int | None
    mtu: int | None
    mac: str | None
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    arch: str
    cpu_model: str | None
    cpu_cores: int | None  # physical
    cpu_threads: int | None  # logical
    memory_bytes: int
    kernel: str
    os: str | None
    disks: tuple[Disk, ...]
    data_dir: str
    data_dir_free_bytes: int | None
    interfaces: tuple[NetInterface, ...]
    docker_version: str | None
    nvidia_container_toolkit_version: str | None
    problems: tuple[str, ...] = field(default=())


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = _VERSION_RE.search(text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            # x86 says "model name"; many ARM kernels only "Model" or "CPU part".
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def os_name() -> str | None:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        return None


def free_bytes_under(path: Path) -> int | None:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disks() -> tuple[Disk, ...]:
    found = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _SKIP_FSTYPES or part.device in seen:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # unreadable mount (permissions, stale NFS): skip it
        seen.add(part.device)
        found.append(Disk(part.mountpoint, part.device, part.fstype, usage.total, usage.free))
    return tuple(found)


def interfaces() -> tuple[NetInterface, ...]:
    stats = psutil.net_if_stats()
    result = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        st = stats.get(name)
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), None)
        ips = tuple(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
        result.append(
            NetInterface(
                name=name,
                up=bool(st and st.isup),
                speed_mbps=st.speed if st and st.speed > 0 else None,
                mtu=st.mtu if st else None,
                mac=mac,
                addresses=ips,
            )
        )
    return tuple(result)


def docker_version(docker_host: str, timeout: float = 3.0) -> str:
    """The Engine's version; raises ``docker.errors.DockerException`` when unreachable."""
    if docker_host.startswith("unix://"):
        socket_path = Path(docker_host.removeprefix("unix://"))
        if not socket_path.exists():
            # Checked here: the SDK leaks its socket when connect() finds no file.
            raise docker.errors.DockerException(f"no socket at {socket_path} (is dockerd running?)")
    # A pinned API version keeps the constructor off the network (version "auto"
    # connects there and leaks the socket when the engine is down); the
    # unversioned /version endpoint answers on every engine whatever its API range.
    client = docker.APIClient(base_url=docker_host, timeout=max(int(timeout), 1), version="1.24")
    try:
        return str(client.version(api_version=False).get("Version", "unknown"))
    finally:
        client.close()


def toolkit_version(timeout: float = 5.0) -> str | None:
    """NVIDIA Container Toolkit version from ``nvidia-ctk`` or ``nvidia-container-cli``."""
    for tool in ("nvidia-ctk", "nvidia-container-cli"):
        path = shutil.which(tool)
        if path is None:
            continue
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("toolkit version probe failed", extra={"tool": tool, "error": str(exc)})
            continue
        version = parse_version(out.stdout + out.stderr)
        if version is not None:
            return ".".join(map(str, version))
    return None


def collect_host_info(data_dir: Path, docker_host: str, timeout: float = 3.0) -> HostInfo:
    problems = []
    try:
        engine: str | None = docker_version(docker_host, timeout)
    except Exception as exc:  # the docker SDK raises several unrelated types here
        engine = None
        problems.append(f"Docker Engine unreachable at {docker_host}: {exc}")
    uname = platform.uname()
    return HostInfo(
        hostname=socket.gethostname(),
        arch=uname.machine,
        cpu_model=cpu_model(),
        cpu_cores=psutil.cpu_count(logical=False),
        cpu_threads=psutil.cpu_count(logical=True) or os.cpu_count(),
        memory_bytes=psutil.virtual_memory().total,
        kernel=uname.release,
        os=os_name(),
        disks=disks(),
        data_dir=str(data_dir),
        data_dir_free_bytes=free_bytes_under(data_dir),
        interfaces=interfaces(),
        docker_version=engine,
        nvidia_container_toolkit_version=toolkit_version(),
        problems=tuple(problems),
    )
