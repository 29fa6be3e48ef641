"""A Debian system booted with systemd as PID 1 inside the local Docker Engine.

``make test-systemd`` (tests/test_systemd_install.py) installs the agent into it as
a provider would. This module builds what that needs, once per machine, under
``build/systemd-test`` (gitignored):

- a root filesystem from ``debootstrap --variant=minbase`` with systemd, python3,
  python3-venv and dbus, imported with ``docker import`` (no registry here), with
  the units that could touch the host (sysctl, binfmt, modules-load, getty,
  logind, timers) masked;
- a wheelhouse of the distribution's dependencies for the system's Python, so
  the install inside needs no network (the system runs with ``--network none``).

The mirror is the one the host's apt already uses (read from its sources at run
time, never written down here); ``GPU_AGENT_TEST_SUITE`` and
``GPU_AGENT_TEST_MIRROR`` choose another distribution (deploy/systemd/README.md).

Why the container is started the way it is (Docker 20.10, cgroup v1 hybrid here):
``--privileged`` asks for every capability, which an engine that itself lacks one
(CAP_SYS_RESOURCE on this host) cannot grant, so the system gets ``--cap-add ALL``
minus what the engine's own bounding set lacks. systemd needs the cgroup tree
writable at its own cgroup, which ``--cgroupns=host`` with ``/sys/fs/cgroup``
bound read-write gives: verified on a cgroup v1 hybrid host (Docker 20.10,
cgroupfs driver, systemd 252 in the image); a v2-only host should behave the
same way but has not been tried. Seccomp and AppArmor are unconfined
because systemd's sandboxing (the thing under test) sets up namespaces and
filters of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "systemd-test"
SCRATCH_ROOT = Path("/srv/gpu-agent-systemd-test")
PACKAGES = ("systemd", "systemd-sysv", "python3", "python3-venv", "dbus")
IMAGE_REPO = "gpu-agent-test/systemd"
LABEL = "io.gpuagent.test"

# Units that would reach out of the container into the host's kernel or
# terminals, or run on timers in the middle of a test.
MASKED_UNITS = (
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "getty.target",
    "console-getty.service",
    "getty@.service",
    "serial-getty@.service",
    "systemd-logind.service",
    "timers.target",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-firstboot.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
)
# The rootfs recipe: a change here builds a new rootfs instead of reusing a stale one.
RECIPE_VERSION = "1"

# Capability numbers -> the names Docker takes (capability(7) order).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ",
)  # fmt: skip


class Unavailable(Exception):
    """This machine cannot run the systemd test; the message says what is missing."""


def run(cmd: Sequence[str], *, timeout: float = 600, stdin: BinaryIO | None = None) -> str:
    """Run ``cmd`` and return its stdout; a failure raises with its output."""
    proc = subprocess.run(list(cmd), capture_output=True, timeout=timeout, check=False, stdin=stdin)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{out[-4000:]}{err[-4000:]}")
    return out


def log(text: str) -> None:
    print(f"[systemd-test {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the distribution -----------------------------------------------------------


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise Unavailable("no VERSION_CODENAME in /etc/os-release: set GPU_AGENT_TEST_SUITE")


def apt_mirror(suite: str) -> str:
    """The URI the host's apt fetches ``suite`` from (deb822 or one-line sources)."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in files:
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[key.strip().lower()] = value.strip()
            if (
                suite in fields.get("suites", "").split()
                and "main" in fields.get("components", "").split()
            ):
                return fields.get("uris", "").split()[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words:
                return words[1]
    raise Unavailable(f"no apt source for {suite!r} main: set GPU_AGENT_TEST_MIRROR")


@dataclass(frozen=True)
class Distribution:
    suite: str
    mirror: str

    @property
    def key(self) -> str:
        digest = hashlib.sha256(
            "\n".join([self.suite, *PACKAGES, *MASKED_UNITS, RECIPE_VERSION]).encode()
        )
        return f"{self.suite}-{digest.hexdigest()[:12]}"

    @property
    def image(self) -> str:
        return f"{IMAGE_REPO}:{self.key}"


def distribution() -> Distribution:
    suite = os.environ.get("GPU_AGENT_TEST_SUITE") or host_codename()
    mirror = os.environ.get("GPU_AGENT_TEST_MIRROR") or apt_mirror(suite)
    return Distribution(suite, mirror)


def _mask_units(rootfs: Path) -> None:
    system = rootfs / "etc/systemd/system"
    system.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = system / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # A new machine id per boot (systemd writes one on a tmpfs /etc/machine-id
    # overlay when the file is empty), not the build machine's.
    (rootfs / "etc/machine-id").write_text("")


def ensure_image(dist: Distribution) -> str:
    """The rootfs image: reused when present, imported from the cached tarball, or
    built with debootstrap (about a minute with a nearby mirror)."""
    with contextlib.suppress(RuntimeError):
        run(["docker", "image", "inspect", dist.image])
        return dist.image
    BUILD.mkdir(parents=True, exist_ok=True)
    tarball = BUILD / f"rootfs-{dist.key}.tar"
    if not tarball.exists():
        if shutil.which("debootstrap") is None:
            raise Unavailable("debootstrap not installed (apt-get install debootstrap)")
        if os.geteuid() != 0:
            raise Unavailable("building the root filesystem (debootstrap) needs root")
        rootfs = BUILD / f"rootfs-{dist.key}.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"debootstrap {dist.suite} (minbase + {','.join(PACKAGES)}) from the host's mirror")
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                dist.suite,
                str(rootfs),
                dist.mirror,
            ],
            timeout=1200,
        )
        _mask_units(rootfs)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
        partial.rename(tarball)
        shutil.rmtree(rootfs)
    log(f"docker import {tarball.name}")
    with tarball.open("rb") as stream:
        run(
            ["docker", "import", "-c", 'CMD ["/sbin/init"]', "-", dist.image],
            stdin=stream,
        )
    return dist.image


# --- the wheelhouse -------------------------------------------------------------


def dependencies() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = meta["build-system"]["requires"]
    deps = meta["project"]["dependencies"]
    return [*build, *deps]


def ensure_wheelhouse(image: str) -> Path:
    """Wheels of every dependency (and the build backend) for the image's Python,
    downloaded with pip once per dependency set."""
    py = run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "python3",
            "-c",
            "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')",
        ]
    ).strip()
    deps = dependencies()
    digest = hashlib.sha256("\n".join([py, *deps]).encode()).hexdigest()[:12]
    wheelhouse = BUILD / f"wheelhouse-cp{py}-{digest}"
    if wheelhouse.is_dir():
        return wheelhouse
    partial = wheelhouse.with_name(wheelhouse.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"pip download {len(deps)} requirements for CPython {py} into {wheelhouse.name}")
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux2014_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux_2_28_x86_64",
            "linux_x86_64",
        )
    ]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            f"--python-version={py}",
            "--implementation=cp",
            *platforms,
            "--dest",
            str(partial),
            *deps,
        ],
        timeout=900,
    )
    partial.rename(wheelhouse)
    return wheelhouse


def source_tarball(dest: Path) -> Path:
    """A clean copy of the checkout: committed files plus tracked edits, nothing
    untracked or ignored (``git stash create`` is HEAD when the tree is clean)."""
    tree = run(["git", "-C", str(REPO), "stash", "create"]).strip() or "HEAD"
    run(["git", "-C", str(REPO), "archive", "--format=tar", f"--output={dest}", tree])
    return dest


# --- the running system ---------------------------------------------------------


def engine_capabilities() -> tuple[str, ...]:
    """Capabilities Docker cannot grant: those missing from the bounding set here
    (the engine runs on this host, so its set is no larger than ours)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
            return tuple(c for i, c in enumerate(CAPABILITIES) if not bounding & (1 << i))
    return ()


@dataclass
class BootedSystem:
    name: str
    scratch: Path

    def sh(self, script: str, *, timeout: float = 300, check: bool = True) -> Result:
        """A shell script as root inside the system."""
        proc = subprocess.run(
            ["docker", "exec", "-i", self.name, "bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the system: {script}\n{result}")
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *args: str) -> str:
        return self.sh(f"journalctl --no-pager -o cat -u {unit} " + " ".join(args)).stdout


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"exit {self.rc}\n--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"
        )


def wait_until(what: str, predicate: object, timeout: float, interval: float = 0.5) -> None:
    """Poll ``predicate`` (a callable returning truthy) until it holds; the state it
    waits for lives in another machine's systemd, which has no event we can await
    from here, so this polls with a deadline and says what it waited for."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def booted(image: str, wheelhouse: Path, source: Path) -> Iterator[BootedSystem]:
    """Boot ``image`` with systemd as PID 1; removed (with what it left in Docker)
    on exit."""
    run_id = uuid.uuid4().hex[:8]
    name = f"gpu-agent-systemd-{run_id}"
    # The agent's lease scratch dirs are bind-mounted by the host's Docker, so the
    # path must mean the same on both sides: one host dir, bound at its own path.
    # Never under /tmp or /var/tmp (a checkout may be there): the unit's PrivateTmp
    # hides both from the service, which then cannot even start (status 226/NAMESPACE).
    scratch = SCRATCH_ROOT / f"scratch-{run_id}"
    scratch.mkdir(parents=True)
    scratch.chmod(0o755)
    sock = Path("/var/run/docker.sock")
    cmd = [
        "docker", "run", "-d", "--name", name, "--hostname", "provider",
        "--label", f"{LABEL}=systemd",
        "--cap-add", "ALL",
        *[arg for cap in engine_capabilities() for arg in ("--cap-drop", cap)],
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--network", "none",
        "--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        # The host's network devices (a lease network's bridge lives there), read-only:
        # with --network none the system's own sysfs shows only its loopback.
        "-v", "/sys/class/net:/sys/class/net:ro",
        "-v", "/sys/devices/virtual/net:/sys/devices/virtual/net:ro",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
        "-v", f"{sock.resolve()}:/run/docker.sock",
        "-v", f"{wheelhouse}:/srv/wheels:ro",
        "-v", f"{source}:/srv/gpu-agent.tar:ro",
        "-v", f"{scratch}:{scratch}",
        "-e", "container=docker",
        "--stop-signal", "SIGRTMIN+3",
        image, "/sbin/init",
    ]  # fmt: skip
    run(cmd)
    system = BootedSystem(name, scratch)
    try:
        # PID 1's private bus socket appears once systemd is up; after that
        # `is-system-running --wait` returns when boot finished: running or degraded.
        wait_until(
            "systemd to start in the container",
            lambda: system.sh("test -S /run/systemd/private", check=False).rc == 0,
            60,
        )
        state = system.sh("systemctl is-system-running --wait || true", timeout=120).stdout
        if state.strip() not in ("running", "degraded"):
            failed = system.sh("systemctl --failed --no-pager", check=False).stdout
            raise AssertionError(f"boot ended {state.strip()!r}:\n{failed}")
        yield system
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def remove_lease_containers(node_id: str) -> None:
    """Lease containers and networks (spares included) live in the host's Docker,
    outside the system: remove them, or every run leaves its spare networks behind."""
    label = f"label=io.gpuagent.node-id={node_id}"
    ids = run(["docker", "ps", "-aq", "--filter", label]).split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
    networks = run(["docker", "network", "ls", "-q", "--filter", label]).split()
    if networks:
        subprocess.run(["docker", "network", "rm", *networks], capture_output=True, check=False)


def container_running(container_id: str) -> bool:
    out = run(["docker", "inspect", container_id])
    return bool(json.loads(out)[0]["State"]["Running"])


def exposure(analyze_output: str, unit: str) -> float:
    """The overall exposure from ``systemd-analyze security UNIT``."""
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", analyze_output)
    assert match, analyze_output[-2000:]
    return float(match.group(1))
