"""Scenario 7: the agent's state dir fills up (a small tmpfs mounted over it)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import cluster, report, wait_for
from .test_agent_kill import assert_ledger_consistent, records

pytestmark = pytest.mark.faults

# Just over the agent's preflight floor (1 GiB free, fatal below): the agent must
# start, then the test fills it. tmpfs uses RAM only for what is written.
TMPFS_SIZE = "1100m"


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        why = f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _ready(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, dict(json.load(r))
    except urllib.error.HTTPError as exc:
        return exc.code, dict(json.load(exc))


def _fill(path: Path) -> None:
    """Write until the filesystem refuses (ENOSPC)."""
    with path.open("wb", buffering=0) as f:
        for block in (b"\0" * 2**20, b"\0" * 4096, b"\0" * 64):
            with contextlib.suppress(OSError):
                while True:
                    f.write(block)


def test_full_state_disk_refuses_leases_reports_unready_and_recovers(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """With the state dir full, a new lease is refused with a reason naming the disk,
    /readyz fails its disk check, usage that cannot be stored is neither sent nor lost
    (the same span is written once space returns: no seq missing, no gap, no overlap)
    and the running lease keeps running; after space returns the node is ready and
    takes leases again."""
    root = tmp_path / "c"
    overrides = {"runtime": {"min_free_state_disk": "4MiB"}}
    with small_tmpfs(root / "agent"), cluster(root, agent_overrides=overrides) as c:
        c.start()
        steady = c.submit("sleep 600")
        wait_for("the first lease running", lambda: c.lease_state(steady) == "running", 30)
        wait_for("a usage record", lambda: any(r[1] == steady for r in records(c)), 15)
        assert _ready(c.status_port)[1]["checks"]["disk"]["ok"]

        filler = c.state_dir / "filler"
        _fill(filler)
        status, body = _ready(c.status_port)
        assert status == 503
        assert not body["checks"]["disk"]["ok"]
        assert "free under" in body["checks"]["disk"]["detail"]

        refused = c.submit("sleep 600")
        rejected = wait_for(
            "the lease refused",
            lambda: [e for e in c.log_events("lease rejected") if e.get("lease_id") == refused],
            30,
        )
        assert rejected[0]["code"] == "insufficient_disk"
        assert refused not in c.containers()
        wait_for(
            "a usage append to fail",
            lambda: c.log_events("appending usage records failed"),
            15,
        )
        stuck_at = max(r[0] for r in records(c))

        filler.unlink()
        wait_for("the node ready again", lambda: _ready(c.status_port)[0] == 200, 15)
        assert c.agent is not None and c.agent.poll() is None
        assert c.lease_state(steady) == "running"
        wait_for(
            "usage stored again",
            lambda: max(r[0] for r in records(c)) > stuck_at + 1,
            20,
        )
        healed = c.submit("sleep 600")
        wait_for("a lease after recovery", lambda: c.lease_state(healed) == "running", 30)
        assert_ledger_consistent(c)
        report(
            record_property,
            "7-disk-full",
            tmpfs=TMPFS_SIZE,
            refused_reason=str(rejected[0].get("reason", "")),
            failed_appends=len(c.log_events("appending usage records failed")),
        )
