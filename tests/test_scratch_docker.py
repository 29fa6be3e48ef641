"""Scratch space against the real engine: quotas hold, setuid files do nothing on the host."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.leases import LeaseManager, LeaseState
from agent.leases.scratch import loop_supported
from agent.leases.scratch import root_flags_missing as scratch_flags_missing
from tests.faults.harness import BIN
from tests.test_isolation_docker import running
from tests.test_lease_docker import LeaseEnv, lease_env_factory

__all__ = ["lease_env_factory"]  # fixture shared with the lifecycle tests

pytestmark = pytest.mark.docker
needs_loop = pytest.mark.skipif(
    loop_supported() is not None, reason=f"loop scratch unavailable: {loop_supported()}"
)
NOBODY = 65534
AGENT_BIN = BIN / "gpu-agent"


def _env(factory: Callable[..., LeaseEnv], **runtime: object) -> LeaseEnv:
    env = factory()
    env.config = env.config.model_copy(
        update={"runtime": env.config.runtime.model_copy(update=runtime)}
    )
    return env


async def _wait_for_file(path: Path, limit: float = 20.0) -> None:
    # The lease writes it; nothing on the host can be awaited for that but the file.
    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


def _effective_uid_of(executable: Path) -> str:
    """Run ``executable -u`` (coreutils id) as nobody; it prints its effective uid.

    Through /proc/self/fd, so nobody needs no way through the 0700 state dir: only the
    mount's flags decide whether the setuid bit takes effect.
    """
    fd = os.open(executable, os.O_RDONLY)
    try:
        argv = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            f"/proc/self/fd/{fd}",
            "-u",
        ]
        done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, check=True)
    finally:
        os.close(fd)
    return done.stdout.strip()


@needs_loop
@pytest.mark.asyncio
async def test_hard_quota_gives_enospc_and_the_mount_is_nosuid_nodev(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """Loop mode: writing 32 MiB into a 16 MiB scratch fails with ENOSPC inside the lease,
    and /scratch is mounted nosuid,nodev in the container."""
    env = _env(lease_env_factory, scratch_mode="loop")
    script = (
        "dd if=/dev/zero of=/scratch/fill bs=1M count=32 2>&1 | grep -o 'No space left';"
        "grep ' /scratch ' /proc/mounts"
    )
    async with running(env) as manager:
        await manager.assign("full", env.spec(script, scratch_bytes="16MiB"))
        update = await env.wait_state("full", LeaseState.SUCCEEDED)
    assert "No space left" in update.log_tail
    (options,) = [line.split()[3] for line in update.log_tail.splitlines() if "/scratch" in line]
    assert {"nosuid", "nodev"} <= set(options.split(","))
    assert not list(env.state_dir.joinpath("scratch").iterdir())  # unmounted and removed


PLANT = (
    "while [ ! -f /scratch/payload ]; do sleep 0.05; done;"
    "cp /scratch/payload /scratch/suid && chmod 4755 /scratch/suid && touch /scratch/ready;"
    "sleep 300"
)


async def _plant_setuid_id(env: LeaseEnv, manager: LeaseManager, lease_id: str) -> Path:
    """Hand the running lease (script ``PLANT``) a copy of id(1); it makes it setuid root
    in its scratch. Returns the planted file's host path."""
    id_binary = shutil.which("id")
    assert id_binary is not None
    await env.wait_state(lease_id, LeaseState.RUNNING)
    scratch = manager._runtime.scratch_dir(lease_id)
    shutil.copy(id_binary, scratch / "payload.tmp")
    (scratch / "payload.tmp").rename(scratch / "payload")
    await _wait_for_file(scratch / "ready")
    planted = scratch / "suid"
    assert planted.stat().st_mode & 0o4000 and planted.stat().st_uid == 0
    return planted


@needs_loop
@pytest.mark.asyncio
async def test_setuid_file_in_scratch_does_not_run_setuid_on_the_host(
    lease_env_factory: Callable[..., LeaseEnv], tmp_path: Path
) -> None:
    """A lease makes a setuid-root copy of id(1) in its scratch: run on the host by
    nobody it has nobody's uid. The same file outside scratch runs as root (the check
    can fail)."""
    env = _env(lease_env_factory, scratch_mode="loop")
    async with running(env) as manager:
        await manager.assign("suid", env.spec(PLANT))
        planted = await _plant_setuid_id(env, manager, "suid")
        flags = os.statvfs(planted.parent).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        assert _effective_uid_of(planted) == str(NOBODY)
        control = tmp_path / "suid-control"
        shutil.copy(planted, control)
        control.chmod(0o4755)
        assert _effective_uid_of(control) == "0"
        await manager.cancel("suid")
        await env.wait_state("suid", LeaseState.CANCELLED)


def _scratch_mount(env: LeaseEnv, *extra: str) -> subprocess.CompletedProcess[str]:
    """`gpu-agent scratch-mount` as the systemd unit's pre-start runs it (root)."""
    config = env.state_dir.parent / "scratch-mount.yaml"
    config.write_text(f"node:\n  state_dir: {env.state_dir}\n")
    argv = [str(AGENT_BIN), "-c", str(config), "scratch-mount", *extra]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.asyncio
async def test_measured_scratch_under_scratch_mount_is_nosuid_nodev(
    lease_env_factory: Callable[..., LeaseEnv], tmp_path: Path
) -> None:
    """Measured mode (the systemd unit's): without `scratch-mount` the lease's /scratch is
    not nosuid (so the test can fail); after it, the root is a nosuid,nodev mount, the
    lease's /scratch inherits both, and a setuid-root file planted there runs with
    nobody's uid on the host. Running it again changes nothing."""
    env = _env(lease_env_factory, scratch_mode="measured")
    mounts = "grep ' /scratch ' /proc/mounts"
    async with running(env) as manager:
        await manager.assign("plain", env.spec(mounts))
        plain = await env.wait_state("plain", LeaseState.SUCCEEDED)
    assert "nosuid" not in plain.log_tail.split()[3].split(","), plain.log_tail

    done = _scratch_mount(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("mounted nosuid,nodev")
    again = _scratch_mount(env)
    assert again.returncode == 0 and again.stdout.strip().endswith("already nosuid,nodev")
    async with running(env) as manager:
        await manager.assign("suid", env.spec(f"{mounts};{PLANT}"))
        planted = await _plant_setuid_id(env, manager, "suid")
        assert _effective_uid_of(planted) == str(NOBODY)
        await manager.cancel("suid")
        update = await env.wait_state("suid", LeaseState.CANCELLED)
    (options,) = [line.split()[3] for line in update.log_tail.splitlines() if "/scratch" in line]
    assert {"nosuid", "nodev"} <= set(options.split(","))
    removed = _scratch_mount(env, "--remove")  # what install.sh --uninstall runs
    assert removed.returncode == 0 and removed.stdout.strip().endswith("unmounted")
    assert "nosuid" in scratch_flags_missing(env.state_dir / "scratch")


@pytest.mark.asyncio
async def test_measured_quota_stops_the_lease_with_scratch_quota_exceeded(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """Measured mode: a lease that writes 8 MiB into a 4 MiB quota is stopped and
    reported failed with reason scratch_quota_exceeded; its scratch is removed."""
    env = _env(lease_env_factory, scratch_mode="measured", scratch_check_interval=0.2)
    script = "dd if=/dev/zero of=/scratch/fill bs=1M count=8 2>/dev/null; sleep 300"
    async with running(env) as manager:
        await manager.assign("over", env.spec(script, scratch_bytes="4MiB"))
        update = await env.wait_state("over", LeaseState.FAILED)
    assert update.reason.startswith("scratch_quota_exceeded: ")
    assert "4 MiB" in update.reason or "4MiB" in update.reason
    assert not env.state_dir.joinpath("scratch", "gpuagent-over").exists()


@pytest.mark.asyncio
async def test_scratch_quota_that_does_not_fit_the_disk_is_rejected(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """A scratch quota larger than the free disk (less the floor) is refused up front."""
    env = _env(lease_env_factory, max_scratch=2**60)
    async with running(env) as manager:
        await manager.assign("huge", env.spec("true", scratch_bytes=2**59))
        update = await env.wait_state("huge", LeaseState.REJECTED)
    assert update.reason.startswith("insufficient_disk: scratch quota")
