"""An ended lease's final usage record has its network bytes, read before the lease's
network goes: real Docker, a real lease network and its bridge, the real sampler.

The sampler stops reading a lease when its container dies, and the manager removes
the container and the network (whose bridge holds the counters) before it publishes
the end. A lease that ended within a sample interval of its last closed record used
to get a final record with its network flagged unmeasured, although the counters
were readable until the cleanup (seen under systemd, tests/test_systemd_install.py,
whenever the re-adopted lease ended less than a second after the restarted agent's
first tick closed a record).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MeteringConfig
from agent.leases import LeaseState, LeaseUpdate, container_name
from agent.usage.docker_pids import DockerPidReader
from agent.usage.outbox import Outbox
from agent.usage.sampler import Sampler
from agent.usage.sources import GpuUsage, MeteredLease, StaticLease
from gpuagent.usage import Unmeasured, UsageRecord
from tests.test_lease_docker import LeaseEnv, lease_env_factory  # noqa: F401

pytestmark = pytest.mark.docker

KEY = Ed25519PrivateKey.generate()
RECORD_S = 5
# Waits for /scratch/finish, then sends to its network's gateway (the host side of this
# test's own bridge; nothing beyond it) and exits 0: bytes after the last tick.
SCRIPT = (
    "until [ -e /scratch/finish ]; do sleep 0.05; done;"
    " nc -w 1 $(ip route | awk '/^default/{print $3}') 9 </dev/null;"
    " exit 0"
)


class NoGpus:
    def read(self, uuids: Sequence[str]) -> Mapping[str, GpuUsage]:
        return {}


class SteppedClock:
    """The monotonic clock, stepped forward on demand: a record closes without waiting."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.monotonic_ns() + self.offset_ns


def _view(update: LeaseUpdate) -> MeteredLease:
    return StaticLease(update.lease_id, update.container_id, None, update.gpu_uuids)


def _records(outbox: Outbox) -> list[UsageRecord]:
    return [s.record for s in outbox.pending(1000)]


@pytest.mark.asyncio
async def test_a_lease_ending_right_after_a_record_has_its_last_bytes_measured(
    lease_env_factory: Callable[..., LeaseEnv],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The lease sends after the sampler's last tick and exits before the next one: its
    final record still has the network measured (the bit clear) and those bytes in it,
    read from the bridge before the manager removed the network."""
    env = lease_env_factory()
    clock = SteppedClock()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sampler: Sampler | None = None

    async def before_cleanup(update: LeaseUpdate) -> None:
        assert sampler is not None
        await sampler.last_reading(_view(update))

    recorded = env.on_update

    async def on_update(update: LeaseUpdate) -> None:
        # As the node does: the final record when the end is published.
        if update.state.terminal and sampler is not None:
            await sampler.close_lease(_view(update))
        await recorded(update)

    env.on_update = on_update  # type: ignore[method-assign]
    manager = env.manager(before_cleanup=before_cleanup)
    sampler = Sampler(
        outbox,
        lambda: [
            StaticLease(r.lease_id, r.container_id, None, r.gpu_uuids, r.started_monotonic)
            for r in manager.running_leases()
        ],
        NoGpus(),
        KEY.sign,
        env.node_id,
        MeteringConfig(sample_interval=1, record_interval=RECORD_S),
        clock_monotonic_ns=clock,
        reader_factory=lambda lease: DockerPidReader(
            env.client, lease.container_id, lease.lease_id
        ),
    )
    task = await env.start(manager)
    try:
        await manager.assign("net-end", env.spec(SCRIPT))
        await env.wait_state("net-end", LeaseState.RUNNING)
        await sampler.tick()
        clock.offset_ns += RECORD_S * 10**9
        closed = await sampler.tick()  # the last tick: it closes a record, measured
        assert closed and not closed[-1].record.unmeasured & Unmeasured.NETWORK, closed

        (env.state_dir / "scratch" / container_name("net-end") / "finish").touch()
        await env.wait_state("net-end", LeaseState.SUCCEEDED)
        records = _records(outbox)
        final = records[-1]
        assert final.final and final.seq == closed[-1].record.seq + 1, records
        assert not final.unmeasured & Unmeasured.NETWORK, final
        assert final.net_tx_bytes > 0, final  # what it sent after the last tick
    finally:
        for stop, run in env.runs:
            stop.set()
            await run
        env.runs.clear()
        outbox.close()
        assert task.done()
