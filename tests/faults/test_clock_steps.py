"""Scenario 8: the agent's wall clock steps +-5 min, and backwards, during a lease.

libfaketime (``apt-get install faketime``) is preloaded into the real agent process
only, in FAKETIME_TIMESTAMP_FILE mode with caching off, so rewriting the file steps
the running process's wall clock; the monotonic clock is left alone
(FAKETIME_DONT_FAKE_MONOTONIC), as it is in a real step (NTP, an operator's `date`).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from .harness import DockerEvents, cluster, report, wait_for
from .test_agent_kill import SAMPLE_NS, TERMINAL, records

pytestmark = pytest.mark.faults

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
# Offsets in turn: +5 min (a forward step), back to 0 and on to -5 min (backward
# steps), then 0 again, so the lease ends with the agent's and Docker's clocks agreeing.
STEPS = ["+300", "+0", "-300", "+0"]


def test_wall_clock_steps_leave_intervals_sane_and_billing_unchanged(
    tmp_path: Path, busybox_image: Any, record_property: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a lease runs, the agent's wall clock jumps forward 5 min, back 5 min,
    back 5 more and forward again: every usage record is accepted, none has a
    negative length or overlaps another, seqs stay contiguous, and the billed time
    (monotonic durations) equals the container's run time from Docker's events."""
    if not LIBFAKETIME.exists():
        why = f"{LIBFAKETIME} missing (apt-get install faketime)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    with cluster(tmp_path / "c") as c:
        c.start_scheduler()
        monkeypatch.setenv("LD_PRELOAD", str(LIBFAKETIME))
        monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset_file))
        monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
        monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        c.start_agent()
        monkeypatch.delenv("LD_PRELOAD")  # the CLI calls below run on the real clock
        c.wait_online()
        events = DockerEvents(c.node_id)
        try:
            lease = c.submit("sleep 600")
            wait_for("lease running", lambda: c.lease_state(lease) == "running", 30)
            for step in STEPS:
                seen = len(records(c))
                offset_file.write_text(step + "\n")
                wait_for(
                    f"two records after the step to {step} s",
                    lambda seen=seen: len(records(c)) >= seen + 2,
                    30,
                )
            c.scheduler_cli("cancel", lease)
            wait_for("lease cancelled", lambda: c.lease_state(lease) in TERMINAL, 30)
            wait_for(
                "the final record (stored or refused)",
                lambda: c.query(
                    "SELECT 1 FROM usage_records WHERE lease_id = ? AND final = 1", lease
                ),
                30,
            )
            cid = next(iter(events.lease_of))
            wait_for("the die event", lambda: cid in events.died, 10)

            rows = [r for r in records(c) if r[1] == lease]
            rejected = c.query("SELECT seq, reason FROM usage_records WHERE status != 'accepted'")
            billed = sum(r[4] for r in rows)
            diff = abs(billed - events.run_ns(cid)) / 1e9
            wall_span = (max(r[3] for r in rows) - min(r[2] for r in rows)) / 1e9
            report(
                record_property,
                "8-clock-steps",
                steps=STEPS,
                records=len(rows),
                refused=len(rejected),
                billed_vs_docker_s=round(diff, 3),
                wall_span_of_records_s=round(wall_span, 2),
            )
            seqs = [int(s[0]) for s in c.query("SELECT seq FROM usage_records ORDER BY seq")]
            assert seqs == list(range(1, len(seqs) + 1))
            for _seq, _lease, start, end, duration, _final in rows:
                assert end >= start, "a record with negative wall length"
                assert duration >= 0
            spans = sorted((r[2], r[3]) for r in rows)
            for (_s0, e0), (s1, _e1) in itertools.pairwise(spans):
                assert s1 >= e0, "overlapping usage intervals"
            assert not rejected, rejected
            assert diff <= 2 * SAMPLE_NS / 1e9, f"billed {billed} ns vs ran {events.run_ns(cid)}"
        finally:
            events.close()
