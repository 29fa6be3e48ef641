"""Scenarios 1 and 2: kill -9 of the agent, repeatedly, while leases run.

Real ``gpu-agent run`` and ``gpu-scheduler serve`` processes, real Docker, real
gRPC over TLS on loopback. What the coordinator stores is read from its SQLite
database; what really ran is read from Docker's event stream.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Cluster, DockerEvents, cluster, report, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.docker]

SAMPLE_NS = 500_000_000  # the harness's metering.sample_interval
TERMINAL = {"succeeded", "failed", "cancelled", "expired", "lost", "rejected"}


def records(c: Cluster) -> list[tuple[int, str, int, int, int, int]]:
    return [
        (int(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))
        for r in c.query(
            "SELECT seq, lease_id, start_ns, end_ns, duration_ns, final FROM usage_records "
            "WHERE status = 'accepted' ORDER BY seq"
        )
    ]


def assert_ledger_consistent(c: Cluster) -> dict[str, list[tuple[int, int]]]:
    """Every seq stored once with none missing; per lease, intervals abut with no
    gap over one sample interval and no overlap (a duplicate would overlap)."""
    rows = records(c)
    all_seqs = [int(r[0]) for r in c.query("SELECT seq FROM usage_records ORDER BY seq")]
    assert all_seqs == list(range(1, len(all_seqs) + 1)), (
        "a usage seq is missing at the coordinator"
    )
    refused = c.query("SELECT seq, lease_id, reason FROM usage_records WHERE status != 'accepted'")
    assert not refused, f"records an honest agent sent were refused: {refused}"
    by_lease: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _seq, lease, start, end, _dur, _final in rows:
        by_lease[lease].append((start, end))
    for lease, spans in by_lease.items():
        spans.sort()
        for (_s0, e0), (s1, _e1) in itertools.pairwise(spans):
            assert s1 >= e0, f"{lease}: overlapping usage intervals (double billing)"
            assert s1 - e0 <= SAMPLE_NS, f"{lease}: usage gap of {(s1 - e0) / 1e9:.3f}s"
    return dict(by_lease)


def test_kill9_agent_ten_times_keeps_containers_and_bills_exactly(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """kill -9 of the agent 10 times while 3 leases run: the same containers keep
    running (same ids, zero restarts), usage is continuous (no gap over one sample
    interval), no record is lost or duplicated, and the billed time equals the
    containers' run time as Docker measured it."""
    with cluster(tmp_path) as c:
        c.start()
        events = DockerEvents(c.node_id)
        try:
            leases = [c.submit("sleep 600") for _ in range(3)]
            for lease in leases:
                wait_for(
                    f"{lease} running", lambda lease=lease: c.lease_state(lease) == "running", 30
                )
            before = {k: v for k, v in c.containers().items() if k in leases}
            assert len(before) == 3
            restarts = []
            for _ in range(10):
                seen = len(records(c))
                # Let at least one record reach the coordinator in each life of the agent.
                wait_for("a new usage record", lambda seen=seen: len(records(c)) > seen, 20)
                time.sleep(random.uniform(0, 0.5))  # noqa: S311 - a kill point, not a secret
                c.kill_agent()
                t0 = time.monotonic()
                c.start_agent()
                c.wait_online()
                restarts.append(time.monotonic() - t0)
            after = c.containers()
            for lease in leases:
                assert after[lease]["Id"] == before[lease]["Id"]
                assert after[lease]["RestartCount"] == 0
                assert after[lease]["State"]["Running"]
                assert after[lease]["State"]["StartedAt"] == before[lease]["State"]["StartedAt"]
            for lease in leases:
                c.scheduler_cli("cancel", lease)
            for lease in leases:
                wait_for(
                    f"{lease} cancelled", lambda lease=lease: c.lease_state(lease) in TERMINAL, 30
                )
            wait_for(
                "final usage records",
                lambda: {r[1] for r in records(c) if r[5]} >= set(leases),
                30,
            )
            by_lease = assert_ledger_consistent(c)
            worst = 0.0
            for lease in leases:
                cid = before[lease]["Id"]
                wait_for("the die event", lambda cid=cid: cid in events.died, 10)
                billed = sum(e - s for s, e in by_lease[lease])
                real = events.run_ns(cid)
                diff = abs(billed - real) / 1e9
                worst = max(worst, diff)
                assert diff <= 2 * SAMPLE_NS / 1e9, f"{lease}: billed {billed} ns, ran {real} ns"
            report(
                record_property,
                "1-kill9-x10",
                restart_to_online_s_max=round(max(restarts), 2),
                billed_vs_docker_worst_s=round(worst, 3),
                records=len(records(c)),
            )
        finally:
            events.close()


def test_random_kill9_under_lease_churn_ledger_matches_docker(
    tmp_path: Path, busybox_image: Any, record_property: Any
) -> None:
    """Random kill -9 of the agent every few seconds while short leases come and go:
    afterwards every lease is terminal at the coordinator and gone from Docker, no
    record is lost or duplicated, and each lease's billed time equals its container's
    run time. FAULTS_CHURN_SECONDS sets the length (default 45 s)."""
    duration = float(os.environ.get("FAULTS_CHURN_SECONDS", "45"))
    rng = random.Random(int(os.environ.get("FAULTS_SEED", "7")))  # noqa: S311 - reproducible schedule
    with cluster(tmp_path) as c:
        c.start()
        events = DockerEvents(c.node_id)
        try:
            leases: list[str] = []
            kills = 0
            end = time.monotonic() + duration
            next_kill = time.monotonic() + rng.uniform(2, 5)
            while time.monotonic() < end:
                if len([x for x in leases if c.lease_state(x) not in TERMINAL]) < 3:
                    leases.append(c.submit(f"sleep {rng.randint(1, 6)}"))
                if time.monotonic() >= next_kill:
                    c.kill_agent()
                    kills += 1
                    c.start_agent()
                    c.wait_online()
                    next_kill = time.monotonic() + rng.uniform(2, 5)
                time.sleep(0.3)  # pacing of the churn driver, not synchronisation
            for lease in leases:
                wait_for(
                    f"{lease} to end", lambda lease=lease: c.lease_state(lease) in TERMINAL, 60
                )
            states = {x: c.lease_state(x) for x in leases}
            placed = [
                x for x in leases if c.query("SELECT 1 FROM usage_records WHERE lease_id=?", x)
            ]
            wait_for(
                "final usage records",
                lambda: {r[1] for r in records(c) if r[5]} >= set(placed),
                30,
            )
            wait_for("Docker to have no container left", lambda: not c.containers(), 30)
            by_lease = assert_ledger_consistent(c)
            worst = 0.0
            for cid, lease in list(events.lease_of.items()):
                if cid not in events.started:
                    continue
                wait_for("the die event", lambda cid=cid: cid in events.died, 10)
                billed = sum(e - s for s, e in by_lease.get(lease, []))
                diff = abs(billed - events.run_ns(cid)) / 1e9
                worst = max(worst, diff)
                assert diff <= 2 * SAMPLE_NS / 1e9, (
                    f"{lease} ({states.get(lease)}): off by {diff:.3f}s: billed "
                    f"{billed / 1e9:.3f}s in {by_lease.get(lease)}, Docker ran "
                    f"{events.run_ns(cid) / 1e9:.3f}s"
                )
            # Kills come every 2-5 s plus the restart; a loaded host restarts slower, so
            # the floor only guards against a run that barely killed anything.
            assert kills >= duration / 10, f"only {kills} kills in {duration:.0f}s"
            report(
                record_property,
                "2-random-kill9-churn",
                seconds=duration,
                leases=len(leases),
                states=sorted(set(states.values())),
                kills=kills,
                records=len(records(c)),
                billed_vs_docker_worst_s=round(worst, 3),
            )
        finally:
            events.close()
