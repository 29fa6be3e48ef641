"""Scenarios 3, 4 and 5: coordinator crash, network partitions, a silent blackhole.

The agent reaches the scheduler through a loopback TCP proxy the test controls
(``TcpProxy``: pass, reset, or blackhole).
"""

from __future__ import annotations

import datetime
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Cluster, cluster, report, wait_for
from tests.faults.test_agent_kill import assert_ledger_consistent, records

pytestmark = [pytest.mark.faults, pytest.mark.docker]

BACKOFF_INITIAL, BACKOFF_MAX, MULTIPLIER, JITTER = 0.5, 4.0, 1.6, 0.2


def _ts(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(str(event["ts"])).timestamp()


def scheduler_events(c: Cluster, message: str) -> list[dict[str, Any]]:
    import json

    found = []
    for line in c.sched_log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg") == message:
            found.append(event)
    return found


def pending(c: Cluster) -> int:
    return int(c.agent_status()["usage"]["records_pending"])


def agent_last_seq(c: Cluster) -> int:
    """The highest usage seq the agent has written to its outbox (read-only peek)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{c.state_dir / 'usage.db'}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT max(last_seq) FROM lease_totals").fetchone()[0] or 0)
    finally:
        conn.close()


def stored_through(c: Cluster, seq: int) -> bool:
    """Whether the coordinator holds every seq up to ``seq``."""
    return c.query("SELECT count(*) FROM usage_records WHERE seq <= ?", seq)[0][0] == seq


def test_coordinator_killed_with_1000_pending_records_all_stored_once(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """kill -9 of the scheduler while 1,000+ usage records pile up: the agent's
    reconnect attempts follow the backoff schedule (0.5 s initial, x1.6, +-20 %,
    4 s cap here), the restarted scheduler marks no node offline within its restart
    grace even though the node's last heartbeat is older than the offline grace,
    and after it reconnects every pending record is stored exactly once."""
    fast = {"metering": {"sample_interval": "0.1s", "record_interval": "0.1s"}}
    # Restart grace 14 s, not the harness's 8 s: the heal comes after 6 s of watching
    # (plus one CLI call), and the agent's next attempt can be up to 4 s x 1.2 later.
    # With 8 s, a loaded host sometimes saw the grace run out before that attempt.
    grace = {"liveness": {"restart_grace": "14s"}}
    with cluster(
        tmp_path, via_proxy=True, gpus=8, agent_overrides=fast, scheduler_overrides=grace
    ) as c:
        c.start()
        leases = [c.submit("sleep 600") for _ in range(8)]
        for lease in leases:
            wait_for(f"{lease} running", lambda lease=lease: c.lease_state(lease) == "running", 30)
        wait_for("records flowing", lambda: len(records(c)) > 10, 20)
        c.kill_scheduler()
        killed_at = time.time()
        wait_for("1,000 records pending at the agent", lambda: pending(c) >= 1000, 60, 0.5)
        assert c.proxy is not None
        # The node's last heartbeat is now far older than offline_grace (6 s): only the
        # restart grace (14 s) stands between it and "offline" while it cannot reconnect.
        c.proxy.set_mode("reset")
        c.start_scheduler()
        restarted = time.monotonic()
        seen = set()
        while time.monotonic() - restarted < 6.0:
            seen.add(c.liveness())
        assert "LIVENESS_OFFLINE" not in seen, seen
        assert not scheduler_events(c, "node offline")
        pending_at_heal = pending(c)
        stored_before = len(records(c))
        last = agent_last_seq(c)
        c.proxy.set_mode("pass")
        c.wait_online(30)
        wait_for("the backlog stored", lambda: stored_through(c, last), 60, 0.5)
        # Exactly once: seqs 1..last are all stored, each once (stored_through). The
        # backlog is not compared with stored_before: records the killed scheduler
        # stored but never acked are pending at the agent and in the database both.
        stored = last - stored_before
        assert pending_at_heal >= 1000 and stored > 0
        assert_ledger_consistent(c)
        assert not scheduler_events(c, "node offline")

        attempts = [
            e for e in c.log_events("reconnecting to coordinator") if _ts(e) >= killed_at - 1
        ]
        delays = [float(e["delay_s"]) for e in attempts]
        assert delays[0] == pytest.approx(BACKOFF_INITIAL)
        for k, delay in enumerate(delays[1:], start=1):
            nominal = min(BACKOFF_INITIAL * MULTIPLIER**k, BACKOFF_MAX)
            assert nominal * (1 - JITTER) - 1e-3 <= delay <= nominal * (1 + JITTER) + 1e-3, (
                k,
                delay,
            )
        gaps = [_ts(b) - _ts(a) for a, b in itertools.pairwise(attempts)]
        for gap, delay in zip(gaps, delays, strict=False):
            assert gap >= delay - 0.01, "an attempt came before its backoff delay"
        report(
            record_property,
            "3-coordinator-kill",
            pending_at_heal=pending_at_heal,
            stored_after_heal=stored,
            reconnect_delays_s=[round(d, 2) for d in delays[:10]],
            liveness_seen_in_restart_grace=sorted(seen),
        )


def test_short_partition_changes_nothing_long_one_marks_offline_once(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """A partition shorter than the offline grace leaves the node online-or-suspect
    and its lease running; a longer one marks it offline exactly once, the container
    keeps running through it, and after healing the usage accrued meanwhile is
    delivered once (no seq missing, no interval billed twice). The lease the
    coordinator declared lost is then cancelled on the agent: its container stops
    and its usage gets a final record."""
    sched = {"log": {"level": "debug"}}
    with cluster(tmp_path, via_proxy=True, scheduler_overrides=sched) as c:
        c.start()
        assert c.proxy is not None
        lease = c.submit("sleep 600")
        wait_for("lease running", lambda: c.lease_state(lease) == "running", 30)
        cid = c.containers()[lease]["Id"]

        c.proxy.set_mode("reset")
        # The partition's length is the thing under test: 2 s keeps the agent's
        # reconnect (backoff 0.5, 0.8, 1.28 s, +-20 %) well inside the 6 s grace.
        time.sleep(2.0)
        assert c.liveness() != "LIVENESS_OFFLINE"
        c.proxy.set_mode("pass")
        c.wait_online(30)
        assert not scheduler_events(c, "node offline")
        assert c.lease_state(lease) == "running"

        c.proxy.set_mode("reset")
        cut = time.monotonic()
        wait_for("the node marked offline", lambda: scheduler_events(c, "node offline"), 30)
        offline_after = time.monotonic() - cut
        seq_at_cut = max(r[0] for r in records(c))
        time.sleep(2.0)  # keep the partition up a while past the verdict
        assert c.containers()[lease]["Id"] == cid
        assert c.containers()[lease]["State"]["Running"], "a partition must not stop the lease"
        last = agent_last_seq(c)
        c.proxy.set_mode("pass")
        c.wait_online(30)
        wait_for("usage from the partition delivered", lambda: stored_through(c, last), 30, 0.3)
        assert max(r[0] for r in records(c)) > seq_at_cut
        # The coordinator declared the lease lost; the agent still runs it. The Hello
        # after healing lists it, so the coordinator cancels it (PROTOCOL.md), the
        # container stops and the lease's usage is closed with a final record.
        wait_for("the lost lease's container stopped", lambda: lease not in c.containers(), 30)
        cancels = [e for e in scheduler_events(c, "LeaseCancel sent") if e["lease_id"] == lease]
        assert len(cancels) == 1, cancels
        assert "lost" in cancels[0]["reason"]
        assert c.lease_state(lease) == "lost"
        wait_for(
            "the lost lease's final usage record",
            lambda: any(r[1] == lease and r[5] for r in records(c)),
            30,
        )
        ended = [e for e in c.log_events("lease ended") if e.get("lease_id") == lease]
        assert [e["state"] for e in ended] == ["cancelled"]
        assert_ledger_consistent(c)
        assert len(scheduler_events(c, "node offline")) == 1
        duplicates = sum(
            int(e.get("duplicates", 0)) for e in scheduler_events(c, "usage report stored")
        )
        report(
            record_property,
            "4-partition",
            offline_detected_after_s=round(offline_after, 2),
            offline_transitions=1,
            lease_state_after_heal=c.lease_state(lease),
            lost_lease_container_stopped=True,
            duplicates_acked_not_stored=duplicates,
        )


def test_silent_blackhole_detected_by_keepalive_within_bound(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """A proxy that silently stops forwarding (no RST, no FIN) is noticed by the
    agent's gRPC keepalive within keepalive_time + keepalive_timeout (5 s + 2 s
    here) plus one second of scheduling slack, and the agent reconnects after."""
    with cluster(tmp_path, via_proxy=True) as c:
        c.start()
        assert c.proxy is not None
        c.proxy.set_mode("blackhole")
        cut = time.monotonic()
        wait_for("the agent to notice", lambda: not c.connected(), 20, 0.1)
        detected = time.monotonic() - cut
        assert detected <= 5.0 + 2.0 + 1.0, f"blackhole noticed after {detected:.1f}s"
        c.proxy.set_mode("pass")
        c.wait_online(30)
        report(record_property, "5-blackhole", detected_after_s=round(detected, 2), bound_s=7.0)
