"""Usage metering costs: outbox append throughput, recovery time, sampler cost.

- append: records/s appended with real Ed25519 signing and ``synchronous=FULL``
  (an fsync per transaction), 100 records per transaction as the sampler
  batches a tick's records; one record per transaction shown for contrast.
  Target (issue 6): >= 2,000 records/s with batching.
- recovery: with 100,000 pending records, the time a restarted agent needs to
  open the outbox, read its stats and lease cursors and have the first batch
  ready to send; and the time to page through (and decode) every pending
  record, as a full replay does. Target: < 2 s.
- sampler: CPU time per lease per tick for 16 leases, reading real cgroup and
  /proc files (this process's own) and a fake GPU source, records included.

Run alone with ``python -m benchmarks.outbox_bench [--smoke] [--dir DIR]``; the
directory should be on the disk the agent's state_dir uses (fsync cost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MeteringConfig
from agent.usage.cgroup import CgroupReader
from agent.usage.outbox import LeaseCursor, Outbox
from agent.usage.sampler import Sampler
from agent.usage.sources import GpuUsage, StaticLease
from gpuagent.usage import UsageRecord

from .registry import Figure, register

S = 10**9
APPEND_TARGET = 2000.0
RECOVERY_TARGET_S = 2.0
LEASES = 16


def _draft(index: int) -> UsageRecord:
    start = 1_700_000_000 * S + index * 60 * S
    return UsageRecord(
        node_id="node-bench",
        seq=0,
        lease_id=f"lease-{index % 64}",
        start_unix_ns=start,
        end_unix_ns=start + 60 * S,
        duration_ns=60 * S,
        gpu_count=8,
        gpu_ns=480 * S,
        gpu_util_permille=930,
        peak_gpu_memory_bytes=70 << 30,
        energy_mj=42_000_000,
        cpu_usec=59_000_000,
        peak_memory_bytes=12 << 30,
        net_rx_bytes=123_456_789,
        net_tx_bytes=9_876_543,
    )


def _append_rate(path: Path, total: int, batch: int) -> float:
    key = Ed25519PrivateKey.generate()
    with Outbox(path) as box:
        started = time.perf_counter()
        for first in range(0, total, batch):
            drafts = [_draft(i) for i in range(first, min(total, first + batch))]
            cursor = LeaseCursor(drafts[-1].lease_id, first, drafts[-1].end_unix_ns, {})
            box.append_many(drafts, key.sign, [cursor])
        return total / (time.perf_counter() - started)


def _recovery_s(path: Path, pending: int) -> tuple[float, float]:
    """(seconds until a restarted agent can send, seconds to read and decode every
    pending record as a full replay does)."""
    key = Ed25519PrivateKey.generate()
    with Outbox(path) as box:
        for first in range(0, pending, 1000):
            box.append_many([_draft(i) for i in range(first, first + 1000)], key.sign)
    started = time.perf_counter()
    with Outbox(path) as box:
        stats = box.stats()
        box.open_cursors()
        batch = box.pending(500)
        ready = time.perf_counter() - started
        seen = 0
        while batch:
            seen += len(batch)
            batch = box.pending(500, batch[-1].record.seq)
    replay = time.perf_counter() - started
    assert seen == stats.pending == pending, (seen, stats.pending, pending)
    return ready, replay


class _Gpus:
    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        return {u: GpuUsage(90.0, 70 << 30, 1_000_000, 650.0) for u in uuids}


def _sampler_cost_us(path: Path, ticks: int) -> float:
    clock = {"mono": 10_000 * S, "wall": 1_700_000_000 * S}
    leases = [
        StaticLease(f"lease-{n}", "", os.getpid(), (f"GPU-{n}",), started_monotonic=10_000.0)
        for n in range(LEASES)
    ]
    key = Ed25519PrivateKey.generate()

    async def main() -> float:
        with Outbox(path) as box:
            sampler = Sampler(
                box,
                lambda: leases,
                _Gpus(),
                key.sign,
                "node-bench",
                MeteringConfig(sample_interval=5, record_interval=60),
                clock_monotonic_ns=lambda: clock["mono"],
                clock_wall_ns=lambda: clock["wall"],
                reader_factory=lambda lease: CgroupReader("", lease.pid),
            )
            cpu = 0.0
            for _ in range(ticks):
                clock["mono"] += 5 * S
                clock["wall"] += 5 * S
                started = time.process_time()
                await sampler.tick()
                cpu += time.process_time() - started
            return cpu

    cpu_s = asyncio.run(main())
    return cpu_s / ticks / LEASES * 1e6


@register("usage-outbox")
def run(smoke: bool) -> list[Figure]:
    return _run(smoke, None)


def _run(smoke: bool, directory: Path | None) -> list[Figure]:
    appends = 2_000 if smoke else 20_000
    pending = 10_000 if smoke else 100_000
    ticks = 48 if smoke else 240
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        root = Path(tmp)
        batched = _append_rate(root / "append.db", appends, 100)
        single = _append_rate(root / "single.db", min(appends, 500), 1)
        ready, replay = _recovery_s(root / "recovery.db", pending)
        sampler = _sampler_cost_us(root / "sampler.db", ticks)
    return [
        Figure("append, 100/txn, fsync", batched, "rec/s", ">= 2000", batched >= APPEND_TARGET),
        Figure("append, 1/txn, fsync", single, "rec/s"),
        Figure(
            f"recovery, {pending} pending: ready to send",
            ready,
            "s",
            "< 2 s",
            ready < RECOVERY_TARGET_S,
        ),
        Figure(
            f"recovery, {pending} pending: read+decode all",
            replay,
            "s",
            "< 2 s",
            replay < RECOVERY_TARGET_S if not smoke else None,
        ),
        Figure(f"sampler CPU per lease per tick ({LEASES} leases)", sampler, "us"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox_bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CI-sized inputs")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    for figure in _run(args.smoke, args.dir):
        mark = "" if figure.ok is None else ("ok" if figure.ok else "MISSED")
        print(f"{figure.name:<48} {figure.value:>12.4g} {figure.unit:<6} {figure.target:<8} {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
