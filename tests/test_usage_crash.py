"""kill -9 at each step of the outbox's life: no record lost, no seq reused.

The child side of each test is this module run as a script
(``python -m tests.test_usage_crash MODE ...``): it stops at a chosen point,
says so on stdout and waits; the test then SIGKILLs it and inspects the
database as a restarted agent would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MeteringConfig
from agent.usage.cgroup import ContainerCounters
from agent.usage.outbox import LeaseCursor, Outbox
from agent.usage.sampler import Sampler
from agent.usage.sources import GpuUsage, StaticLease
from gpuagent.usage import SignedUsageRecord, UsageRecord, verify_record

S = 10**9
REPO = Path(__file__).resolve().parent.parent
# A fixed key so parent and child agree on the node's identity.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
POWER_W = 100


def _record(index: int) -> UsageRecord:
    start = 1_700_000_000 * S + index * 60 * S
    return UsageRecord(
        node_id="node-crash",
        seq=0,
        lease_id="lease-1",
        start_unix_ns=start,
        end_unix_ns=start + 60 * S,
        duration_ns=60 * S,
        gpu_count=1,
        gpu_ns=60 * S,
        cpu_usec=index + 1,
    )


def _stop_here(step: str) -> None:
    """Announce the step and block until killed."""
    print(f"AT {step}", flush=True)
    sys.stdin.read()


# ---- child side ------------------------------------------------------------


def _child_outbox(db: str, target: str) -> None:
    """Append 5 records, 'send' them, ack through 3: stopping at ``target``."""

    def failpoint(step: str) -> None:
        if step == target:
            _stop_here(step)

    box = Outbox(Path(db), failpoint=failpoint)
    box.append_many(
        [_record(i) for i in range(5)],
        KEY.sign,
        [LeaseCursor("lease-1", 5 * 60 * S, 1_700_000_300 * S, {"cpu_usec": 15})],
    )
    sent = box.pending(100)
    print("SENT " + ",".join(str(s.record.seq) for s in sent), flush=True)
    failpoint("sent")
    box.ack(3)
    print("DONE", flush=True)


class _BusyContainer:
    """One CPU fully busy since ``started``: cpu_usec is a pure function of the clock."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last = 0

    def read(self) -> ContainerCounters:
        self.last = int((time.monotonic() - self.started) * 1e6)
        return ContainerCounters(cpu_usec=self.last, memory_current_bytes=1 << 20)


class _PowerOnlyGpu:
    """A GPU without an energy counter, drawing a constant POWER_W."""

    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        return {u: GpuUsage(50.0, 1 << 30, None, float(POWER_W)) for u in uuids}


def _child_sampler(db: str, started: float, mode: str, fail_step: str, fail_at: int) -> None:
    """Run the real sampler on a fake lease; ``mode`` is 'run' or 'close'."""
    hits = 0

    def failpoint(step: str) -> None:
        nonlocal hits
        if step == fail_step:
            hits += 1
            if hits == fail_at:
                _stop_here(step)

    lease = StaticLease("lease-k", "", None, ("GPU-0",), started)
    container = _BusyContainer(started)
    box = Outbox(Path(db), failpoint=failpoint)

    def announce(records: Sequence[SignedUsageRecord]) -> None:
        print("RECORDS " + ",".join(str(r.record.seq) for r in records), flush=True)

    sampler = Sampler(
        box,
        lambda: [lease],
        _PowerOnlyGpu(),
        KEY.sign,
        "node-crash",
        MeteringConfig(sample_interval=0.01, record_interval=0.03),
        reader_factory=lambda _: container,
        on_records=announce,
    )

    async def main() -> None:
        if mode == "close":
            end = time.monotonic()
            await sampler.close_lease(lease, end)
            print(f"CLOSED {round(end * 1e9)} {container.last}", flush=True)
            return
        await sampler.run(asyncio.Event())  # runs until killed

    asyncio.run(main())


# ---- parent side -----------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_usage_crash", *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill_when(child: subprocess.Popen[str], predicate: str, count: int = 1) -> list[str]:
    """Read the child's lines until ``count`` start with ``predicate``; then kill -9."""
    assert child.stdout is not None
    lines: list[str] = []
    seen = 0
    deadline = time.monotonic() + 30
    while seen < count:
        assert time.monotonic() < deadline, f"child never reached {predicate}: {lines}"
        line = child.stdout.readline()
        assert line, f"child exited before {predicate}: {lines}"
        lines.append(line.strip())
        if line.startswith(predicate):
            seen += 1
    os.kill(child.pid, signal.SIGKILL)
    with child:  # closes the pipes and reaps the child
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return lines


@pytest.mark.parametrize("step", ["appended", "committed", "sent", "acked"])
def test_kill_at_each_outbox_step_loses_nothing(tmp_path: Path, step: str) -> None:
    """Killed mid-transaction, nothing (records or cursor) is stored; killed after
    commit, send or ack, every unacked record is still there to replay, and the
    next record gets a seq no earlier record ever had."""
    db = tmp_path / "outbox.sqlite3"
    lines = _kill_when(_spawn("outbox", str(db), step), f"AT {step}")
    with Outbox(db) as box:
        pending = box.pending(100)
        seqs = [p.record.seq for p in pending]
        cursor = box.cursor("lease-1")
        stats = box.stats()
        if step == "appended":
            assert seqs == [] and cursor is None and stats.last_seq == 0
        else:
            assert cursor is not None and cursor.counters == {"cpu_usec": 15}
            assert stats.last_seq == 5
            assert [p.record.cpu_usec for p in pending] == [s for s in range(1, 6) if s in seqs]
            assert all(verify_record(p.record, p.signature, KEY.public_key()) for p in pending)
        if step in ("committed", "sent"):
            assert seqs == [1, 2, 3, 4, 5]  # sent but unacked: all kept for replay
        if step == "sent":
            assert "SENT 1,2,3,4,5" in lines
        if step == "acked":
            assert seqs == [4, 5] and stats.acked_seq == 3
        [new] = box.append_many([_record(9)], KEY.sign)
        assert new.record.seq == stats.last_seq + 1


def test_sampler_killed_repeatedly_bills_every_microsecond_once(tmp_path: Path) -> None:
    """The real sampler, kill -9'd mid-transaction, right after a commit and at a
    random tick, then closed: its records chain without gaps or overlaps, seqs run
    1..N with no reuse, CPU time sums exactly to the container's counter and
    durations to the lease's monotonic lifetime."""
    db = tmp_path / "outbox.sqlite3"
    started = time.monotonic()
    stored: dict[int, SignedUsageRecord] = {}  # what a coordinator would hold

    def deliver_and_ack(ack_all: bool) -> None:
        with Outbox(db) as box:
            pending = box.pending(10_000)
            for signed in pending:
                # A replayed seq must carry exactly what was sent before.
                assert stored.setdefault(signed.record.seq, signed) == signed
            if pending and ack_all:
                box.ack(pending[-1].record.seq)

    runs = [("appended", 2, "AT appended", 1), ("committed", 1, "AT committed", 1)]
    runs.append(("none", 0, "RECORDS", 3))
    for fail_step, fail_at, predicate, count in runs:
        child = _spawn("sampler", str(db), repr(started), "run", fail_step, str(fail_at))
        _kill_when(child, predicate, count)
        deliver_and_ack(ack_all=fail_step == "committed")

    closer = _spawn("sampler", str(db), repr(started), "close", "none", "0")
    out, _ = closer.communicate(timeout=30)
    assert closer.returncode == 0, out
    closed = next(line for line in out.splitlines() if line.startswith("CLOSED"))
    end_ns, final_cpu = (int(x) for x in closed.split()[1:])
    deliver_and_ack(ack_all=False)

    records = [stored[seq].record for seq in sorted(stored)]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert len(records) >= 4
    assert all(verify_record(s.record, s.signature, KEY.public_key()) for s in stored.values())
    for before, after in itertools.pairwise(records):
        assert after.start_unix_ns == before.end_unix_ns
    assert [r.final for r in records] == [False] * (len(records) - 1) + [True]
    assert sum(r.duration_ns for r in records) == end_ns - round(started * 1e9)
    assert sum(r.cpu_usec for r in records) == final_cpu
    # Energy: integrated power, so estimated, and 100 W x lifetime within rounding.
    assert all(r.energy_estimated for r in records)
    expected_mj = POWER_W * (end_ns - round(started * 1e9)) / 1e6
    assert abs(sum(r.energy_mj for r in records) - expected_mj) <= len(records) * 2 + 1


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "outbox":
        _child_outbox(*rest)
    elif mode == "sampler":
        db_arg, started_arg, sampler_mode, step_arg, at_arg = rest
        _child_sampler(db_arg, float(started_arg), sampler_mode, step_arg, int(at_arg))
    else:
        sys.exit(f"unknown mode {mode}")
