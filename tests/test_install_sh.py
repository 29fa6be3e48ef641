"""deploy/systemd/install.sh, run for real into a temporary root (``--root``).

The installer is exercised end to end: shadow tools writing the temp root's
/etc/passwd, a real venv, a real pip install, real ``config check``. The one
stand-in is what pip installs: a tiny wheel whose console scripts are the real
``agent.cli:main`` / ``scheduler.cli:main``, reached through a .pth file that
points at this checkout and the development venv. Building and installing the
real distribution would fetch every dependency from PyPI on each run, which
tests the network, not the installer.

The first install (the slow part: venv creation) happens once per module; tests
that change the tree work on a ``cp -a`` copy of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "systemd" / "install.sh"
IS_ROOT = os.geteuid() == 0


def require_tool(name: str) -> str:
    """Path of a host tool; missing fails under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt-get install {name}; `make test` does)"
        if IN_CI:
            pytest.fail(message + " (CI=true: this test must run)")
        pytest.skip(message)
    return path


def build_wheel(directory: Path, version: str) -> Path:
    """A wheel named gpu-provider-agent whose entry points run this checkout's code."""
    name = "gpu_provider_agent"
    info = f"{name}-{version}.dist-info"
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    files = {
        f"{name}_checkout.pth": "\n".join([str(REPO), *sorted(paths)]) + "\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-provider-agent\n"
        f"Version: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\ngpu-agent = agent.cli:main\n"
        "gpu-scheduler = scheduler.cli:main\n",
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={encoded},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def seed_root(root: Path) -> None:
    """The bits of a Debian /etc the shadow tools need, with Docker's group present."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\ndocker:x:999:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\ndocker:!::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def install(root: Path, wheel: Path, *args: str) -> Run:
    # The venv is built from the interpreter under the dev venv, so the .pth
    # paths hold packages for the same Python version.
    base = getattr(sys, "_base_executable", sys.executable)
    cmd = [
        str(SCRIPT),
        "--root",
        str(root),
        "--source",
        str(wheel),
        "--pip-arg=--no-index",
        "--python",
        base,
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every path under root with type, mode, owner, mtime and content hash or link target."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = str(path.readlink())
            out[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                content,
            )
    return out


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k)]


def passwd_field(root: Path, db: str, name: str, field: int) -> str | None:
    for line in (root / "etc" / db).read_text().splitlines():
        parts = line.split(":")
        if parts[0] == name:
            return parts[field]
    return None


@dataclass
class Installed:
    root: Path
    wheels: Path
    wheel: Path
    first: Run
    second: Run
    before_second: Snapshot
    after_second: Snapshot


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A root installed once with --with-scheduler, then installed again unchanged."""
    require_tool("systemctl")
    wheels = tmp_path_factory.mktemp("wheels")
    wheel = build_wheel(wheels, "0.1.0")
    root = tmp_path_factory.mktemp("root")
    seed_root(root)
    first = install(root, wheel, "--with-scheduler")
    assert first.returncode == 0, first.stderr
    before = snapshot(root)
    second = install(root, wheel, "--with-scheduler")
    return Installed(root, wheels, wheel, first, second, before, snapshot(root))


@pytest.fixture
def copy(installed: Installed, tmp_path: Path) -> Path:
    """A private copy of the installed root (ownership and mtimes kept) to change freely."""
    dest = tmp_path / "root"
    subprocess.run(["cp", "-a", str(installed.root), str(dest)], check=True)
    return dest


def test_install_sh_is_shellcheck_clean() -> None:
    """shellcheck finds nothing in the installer (all its checks, default severity)."""
    shellcheck = require_tool("shellcheck")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_second_run_changes_nothing(installed: Installed) -> None:
    """Re-running the installer leaves every file, mode, owner and mtime as it was."""
    assert installed.second.returncode == 0, installed.second.stderr
    assert diff(installed.before_second, installed.after_second) == []
    assert "already up to date" in installed.second.stdout
    assert "keeping existing /etc/gpu-agent/config.yaml" in installed.second.stdout


def test_first_run_lays_out_venv_config_state_and_units(installed: Installed) -> None:
    """The venv runs gpu-agent, config.yaml is the example, units match the repo's, enabled."""
    root = installed.root
    venv_bin = root / "opt/gpu-agent/venv/bin"
    version = subprocess.run(
        [str(venv_bin / "gpu-agent"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("gpu-agent ")
    config = root / "etc/gpu-agent/config.yaml"
    # With --with-scheduler the one change: verify the local scheduler with its CA.
    example = (REPO / "config.example.yaml").read_text()
    assert example.count("  ca_file: null\n") == 1
    ca_line = "  ca_file: /etc/gpu-agent/coordinator-ca.pem\n"
    expected = example.replace("  ca_file: null\n", ca_line)
    assert config.read_text() == expected
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    state = root / "var/lib/gpu-agent"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for unit in ("gpu-agent.service", "gpu-scheduler.service"):
        installed_unit = root / "etc/systemd/system" / unit
        assert installed_unit.read_text() == (REPO / "deploy/systemd" / unit).read_text()
        wants = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert wants.is_symlink(), f"{unit} not enabled"
    scheduler_config = root / "etc/gpu-scheduler/config.yaml"
    check = subprocess.run(
        [str(venv_bin / "gpu-scheduler"), "config", "check", str(scheduler_config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.skipif(not IS_ROOT, reason="users and ownership are only managed as root")
def test_service_users_are_unprivileged_and_in_docker_group(installed: Installed) -> None:
    """gpu-agent is a no-login system user in the docker group that owns its state dir."""
    root = installed.root
    assert passwd_field(root, "passwd", "gpu-agent", 6) == "/usr/sbin/nologin"
    assert passwd_field(root, "passwd", "gpu-agent", 5) == "/var/lib/gpu-agent"
    uid = int(passwd_field(root, "passwd", "gpu-agent", 2) or -1)
    assert 0 < uid < 1000
    docker_members = (passwd_field(root, "group", "docker", 3) or "").split(",")
    assert docker_members == ["gpu-agent"]
    assert (root / "var/lib/gpu-agent").stat().st_uid == uid
    gid = int(passwd_field(root, "group", "gpu-agent", 2) or -1)
    config = (root / "etc/gpu-agent/config.yaml").stat()
    assert (config.st_uid, config.st_gid) == (0, gid)
    scheduler_uid = int(passwd_field(root, "passwd", "gpu-scheduler", 2) or -1)
    assert (root / "var/lib/gpu-scheduler").stat().st_uid == scheduler_uid
    assert "gpu-scheduler" not in docker_members


def test_edited_config_is_never_overwritten(installed: Installed, copy: Path) -> None:
    """A provider's edits survive a re-run, byte for byte, and so do its mode and owner."""
    config = copy / "etc/gpu-agent/config.yaml"
    edited = config.read_text().replace("address: localhost:7443", "address: coord.example:7443")
    assert edited != config.read_text()
    config.write_text(edited)
    config.chmod(0o600)
    run = install(copy, installed.wheel, "--with-scheduler")
    assert run.returncode == 0, run.stderr
    assert config.read_text() == edited
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_invalid_config_fails_with_its_key_path(installed: Installed, copy: Path) -> None:
    """A typo in the config stops the install with exit 1 and names the bad key."""
    config = copy / "etc/gpu-agent/config.yaml"
    config.write_text(config.read_text().replace("coordinator:\n", "coordinater:\n", 1))
    run = install(copy, installed.wheel)
    assert run.returncode == 1
    assert "coordinater" in run.stderr
    assert "is not valid" in run.stderr


def test_changed_unit_is_replaced(installed: Installed, copy: Path) -> None:
    """A unit edited in place (instead of a drop-in) is put back to the shipped one."""
    unit = copy / "etc/systemd/system/gpu-agent.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=no"))
    run = install(copy, installed.wheel)
    assert run.returncode == 0, run.stderr
    assert "installed /etc/systemd/system/gpu-agent.service" in run.stdout
    assert unit.read_text() == (REPO / "deploy/systemd/gpu-agent.service").read_text()


def test_upgrade_installs_new_version_and_keeps_config(installed: Installed, copy: Path) -> None:
    """Installing a newer wheel upgrades the venv in place and reports the change."""
    config = copy / "etc/gpu-agent/config.yaml"
    config.write_text(config.read_text() + "# provider note\n")
    newer = build_wheel(installed.wheels, "0.1.1")
    run = install(copy, newer, "--with-scheduler")
    assert run.returncode == 0, run.stderr
    assert "into /opt/gpu-agent/venv" in run.stdout
    assert "already up to date" not in run.stdout
    site = next((copy / "opt/gpu-agent/venv/lib").glob("python3*/site-packages"))
    assert (site / "gpu_provider_agent-0.1.1.dist-info").is_dir()
    assert not (site / "gpu_provider_agent-0.1.0.dist-info").exists()
    assert config.read_text().endswith("# provider note\n")


def test_uninstall_keeps_data_and_purge_removes_it(installed: Installed, copy: Path) -> None:
    """--uninstall drops units and venv but keeps config, state and users; --purge drops all."""
    (copy / "var/lib/gpu-agent/node.key").write_text("identity")
    run = install(copy, installed.wheel, "--uninstall")
    assert run.returncode == 0, run.stderr
    assert not (copy / "opt/gpu-agent").exists()
    assert not (copy / "etc/systemd/system/gpu-agent.service").exists()
    assert not (copy / "etc/systemd/system/gpu-scheduler.service").exists()
    assert not (copy / "etc/systemd/system/multi-user.target.wants/gpu-agent.service").exists()
    assert (copy / "var/lib/gpu-agent/node.key").read_text() == "identity"
    assert (copy / "etc/gpu-agent/config.yaml").is_file()
    if IS_ROOT:
        assert passwd_field(copy, "passwd", "gpu-agent", 0) == "gpu-agent"

    again = install(copy, installed.wheel, "--uninstall")
    assert again.returncode == 0, again.stderr

    # `systemctl edit` drop-ins are the provider's, like the config: kept until --purge.
    for unit in ("gpu-agent", "gpu-scheduler"):
        dropin = copy / f"etc/systemd/system/{unit}.service.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "override.conf").write_text("[Service]\nReadWritePaths=/data\n")
    purge = install(copy, installed.wheel, "--uninstall", "--purge")
    assert purge.returncode == 0, purge.stderr
    for gone in (
        "etc/systemd/system/gpu-agent.service.d",
        "etc/systemd/system/gpu-scheduler.service.d",
        "etc/gpu-agent",
        "var/lib/gpu-agent",
        "etc/gpu-scheduler",
        "var/lib/gpu-scheduler",
    ):
        assert not (copy / gone).exists(), gone
    if IS_ROOT:
        assert passwd_field(copy, "passwd", "gpu-agent", 0) is None
        assert passwd_field(copy, "group", "gpu-agent", 0) is None
        assert passwd_field(copy, "group", "docker", 3) == ""


def test_uninstall_without_purge_keeps_drop_ins(installed: Installed, copy: Path) -> None:
    """A plain --uninstall keeps the provider's drop-ins, so a reinstall behaves as before."""
    dropin = copy / "etc/systemd/system/gpu-agent.service.d/override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nReadWritePaths=/data\n")
    run = install(copy, installed.wheel, "--uninstall")
    assert run.returncode == 0, run.stderr
    assert dropin.read_text() == "[Service]\nReadWritePaths=/data\n"


@pytest.mark.skipif(not IS_ROOT, reason="ownership is only managed as root")
def test_scheduler_ca_is_copied_for_the_agent(installed: Installed, copy: Path) -> None:
    """Once the scheduler has written its CA (in its 0700 state dir), the installer
    gives the agent a copy it can read: root:gpu-agent, 0640, where the config
    it wrote points; a changed CA is copied again."""
    ca = copy / "var/lib/gpu-scheduler/tls/ca.pem"
    ca.parent.mkdir(mode=0o700)
    ca.write_text("-----BEGIN CERTIFICATE-----\nfirst\n")
    run = install(copy, installed.wheel, "--with-scheduler")
    assert run.returncode == 0, run.stderr
    copied = copy / "etc/gpu-agent/coordinator-ca.pem"
    assert copied.read_text() == ca.read_text()
    st = copied.stat()
    gid = int(passwd_field(copy, "group", "gpu-agent", 2) or -1)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)
    assert (
        "ca_file: /etc/gpu-agent/coordinator-ca.pem"
        in (copy / "etc/gpu-agent/config.yaml").read_text()
    )
    ca.write_text("-----BEGIN CERTIFICATE-----\nrotated\n")
    again = install(copy, installed.wheel, "--with-scheduler")
    assert again.returncode == 0, again.stderr
    assert copied.read_text() == ca.read_text()


def test_no_systemctl_leaves_units_disabled(installed: Installed, copy: Path) -> None:
    """With --no-systemctl the installer never enables anything (here: after a disable)."""
    wants = copy / "etc/systemd/system/multi-user.target.wants/gpu-agent.service"
    wants.unlink()
    run = install(copy, installed.wheel, "--no-systemctl")
    assert run.returncode == 0, run.stderr
    assert not wants.exists()
    assert "enabled" not in run.stdout


@pytest.mark.skipif(not IS_ROOT, reason="the docker-group check runs only when managing users")
def test_missing_docker_group_is_a_clear_error(installed: Installed, tmp_path: Path) -> None:
    """Without Docker's group the installer stops before changing anything and says why."""
    root = tmp_path / "bare"
    seed_root(root)
    (root / "etc/group").write_text("root:x:0:\n")
    before = snapshot(root)
    run = install(root, installed.wheel)
    assert run.returncode == 1
    assert "no 'docker' group: install Docker Engine first" in run.stderr
    assert diff(before, snapshot(root)) == []


def test_unknown_option_is_rejected() -> None:
    """A mistyped option exits non-zero naming the option, rather than being ignored."""
    proc = subprocess.run(
        [str(SCRIPT), "--uninstal"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 1
    assert "unknown option '--uninstal'" in proc.stderr


def test_purge_without_uninstall_is_rejected(tmp_path: Path) -> None:
    """--purge alone is refused: deleting identity and outbox must be asked for explicitly."""
    proc = subprocess.run(
        [str(SCRIPT), "--purge", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert "--purge only goes with --uninstall" in proc.stderr
