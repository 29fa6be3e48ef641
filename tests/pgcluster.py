"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary directory.

PostgreSQL refuses to run as root, so as root the cluster belongs to an unprivileged
system user (``postgres`` from Debian's package, else one created here) and every
server command runs through ``runuser``. The server listens on a unix socket in the
cluster directory and on one loopback port (the fault suite's proxy needs TCP),
with fsync off: a test cluster is thrown away, so durability buys nothing.
Each test gets a database of its own (``new_database``), so tests never see each
other's rows. ``make test`` installs Debian's ``postgresql`` package when missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from scheduler.storage import postgres_url

USER = "postgres"
SUPERUSER = "postgres"


def find_bin_dir() -> Path | None:
    """The directory with initdb and pg_ctl (Debian keeps them out of PATH)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return Path(versions[0]).parent if versions else None


def dbname(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_user() -> str:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        return USER
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        check=True,
    )
    return USER


class Cluster:
    """One PostgreSQL server for a test session; ``stop`` removes everything."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        """``durable``: fsync and synchronous_commit on, as in production (benchmarks)."""
        self.bin_dir = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="gpu-sched-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.password = uuid.uuid4().hex  # for the password-auth tests, over TCP
        if self.as_root:
            user = _ensure_user()
            info = pwd.getpwnam(user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
        self.root.chmod(0o755)  # the socket must be reachable by the test process

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_root:
            command = ["runuser", "-u", USER, "--", *command]
        return subprocess.run(
            command, check=check, capture_output=True, text=True, cwd=self.root, timeout=120
        )

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            info = pwd.getpwnam(USER)
            os.chown(pwfile, info.pw_uid, info.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        self.pg_ctl_start()

    def pg_ctl_start(self) -> None:
        options = (
            f"-k {self.socket_dir} -c listen_addresses=127.0.0.1 -p {self.port}"
            " -c max_connections=400 -c shared_buffers=128MB"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        done = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            options,
            "start",
            check=False,
        )
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}{done.stdout}\n{log[-2000:]}")

    def pg_ctl_stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def stop(self) -> None:
        self.pg_ctl_stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_url(self, dbname: str = "postgres") -> str:
        return postgres_url(dbname, host=str(self.socket_dir), user=SUPERUSER, port=self.port)

    def tcp_url(self, dbname: str, port: int | None = None) -> str:
        """Over loopback TCP: needs the password (GPU_SCHEDULER_DB_PASSWORD or a file)."""
        return postgres_url(dbname, host="127.0.0.1", user=SUPERUSER, port=port or self.port)

    def new_database(self) -> str:
        """A fresh, empty database; returns its (unix socket) URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self._admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = dbname(url)
        with psycopg.connect(self._admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin_conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname=postgres"
