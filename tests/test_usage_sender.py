"""The usage sender against the real scheduler over real gRPC: coordinator-set
parameters change what it sends without a restart, and an ack past what was sent
is refused (issue #19).

Records are for leases the scheduler never placed: it stores each as rejected and
answers a ``UsageAck`` per report whose ``rejected`` count is that report's size,
which is what these tests read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from agent.identity import NodeIdentity
from agent.link import CoordinatorLink
from agent.link.session import HEARTBEAT_INTERVAL_RANGE, USAGE_BATCH_MAX_RANGE
from agent.usage.outbox import Outbox
from agent.usage.sender import UsageSender
from gpuagent.usage import UsageRecord
from gpuagent.v1 import common_pb2, usage_pb2
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    agent_config,
    make_link,
    scheduler_config,
    start_server,
    until,
)

SEC = 1_000_000_000


@dataclass
class Node:
    server: SchedulerServer
    link: CoordinatorLink
    identity: NodeIdentity
    outbox: Outbox
    sender: UsageSender
    acks: asyncio.Queue[usage_pb2.UsageAck]
    sender_task: asyncio.Task[None] | None = None
    sender_stop: asyncio.Event | None = None

    def start_sender(self) -> None:
        self.sender_stop = asyncio.Event()
        self.sender_task = asyncio.create_task(self.sender.run(self.sender_stop))

    async def stop_sender(self) -> None:
        assert self.sender_stop is not None and self.sender_task is not None
        self.sender_stop.set()
        await self.sender_task

    def append(self, count: int) -> None:
        start = (1_700_000_000 - 86_400) * SEC
        drafts = [
            UsageRecord(
                node_id=self.identity.node_id,
                seq=0,
                lease_id="never-placed",
                start_unix_ns=start + i * SEC,
                end_unix_ns=start + (i + 1) * SEC,
                duration_ns=SEC,
                gpu_count=1,
                gpu_ns=SEC,
            )
            for i in range(count)
        ]
        self.outbox.append_many(drafts, self.identity.sign)
        self.sender.wake()

    async def report_sizes(self, total: int) -> list[int]:
        """The sizes of the reports the coordinator acked until ``total`` records."""
        sizes: list[int] = []
        while sum(sizes) < total:
            ack = await asyncio.wait_for(self.acks.get(), 5)
            sizes.append(ack.rejected)
        return sizes


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    server = await start_server(scheduler_config(tmp_path, None))
    link, identity = make_link(agent_config(server.port, None), tmp_path / "agent")
    outbox = Outbox(tmp_path / "agent" / "usage.db")
    sender = UsageSender(outbox, link, batch_size=500)
    acks: asyncio.Queue[usage_pb2.UsageAck] = asyncio.Queue()

    async def on_ack(msg: usage_pb2.UsageAck) -> None:
        await sender.on_ack(msg)
        await acks.put(msg)

    async def on_session(welcome: object) -> None:
        await sender.on_session(welcome.acked_usage_seq)  # type: ignore[attr-defined]

    link.on("usage_ack", on_ack)
    link.on_session(on_session)
    link.on_params(lambda p: setattr(sender, "batch_max", p.usage_batch_max))
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await asyncio.wait_for(link.wait_connected(), 5)
    node = Node(server, link, identity, outbox, sender, acks)
    node.start_sender()
    try:
        yield node
    finally:
        await node.stop_sender()
        stop.set()
        await task
        outbox.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_usage_batch_max_from_the_coordinator_applies_without_a_restart(node: Node) -> None:
    node.append(6)
    assert await node.report_sizes(6) == [6]  # the agent's own batch_size (500)
    await node.server.coordinator.update_params(common_pb2.NodeParams(usage_batch_max=2))
    await until(lambda: node.sender.batch == 2, what="batch max applied")
    node.append(5)
    assert await node.report_sizes(5) == [2, 2, 1]
    assert node.outbox.stats().pending == 0


@pytest.mark.asyncio
async def test_usage_ack_past_the_last_record_sent_is_refused(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the outbox pruned records up to any acked seq, delivered or not."""
    node.append(3)
    assert await node.report_sizes(3) == [3]
    caplog.set_level(logging.ERROR, logger="agent.usage.sender")
    # Records 4..6 exist but were not sent: the sender is stopped.
    await node.stop_sender()
    assert node.outbox.pending(10, 0) == []
    node.outbox.append_many(
        [
            UsageRecord(
                node_id=node.identity.node_id,
                seq=0,
                lease_id="never-placed",
                start_unix_ns=i * SEC,
                end_unix_ns=(i + 1) * SEC,
                duration_ns=SEC,
                gpu_count=1,
                gpu_ns=SEC,
            )
            for i in range(1, 4)
        ],
        node.identity.sign,
    )
    await node.sender.on_ack(usage_pb2.UsageAck(acked_through_seq=6))
    assert node.sender.refused_acks == 1
    assert node.outbox.stats().pending == 3  # nothing pruned
    assert any("usage ack past the last record sent" in r.getMessage() for r in caplog.records)
    node.start_sender()
    assert await node.report_sizes(3) == [3]  # delivered after all, then acked for real
    assert node.outbox.stats().pending == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sent_ms", "applied"),
    [(1, HEARTBEAT_INTERVAL_RANGE[0]), (2**32 - 1, HEARTBEAT_INTERVAL_RANGE[1]), (500, 0.5)],
)
async def test_heartbeat_interval_from_the_coordinator_is_clamped(
    node: Node, sent_ms: int, applied: float, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1 ms heartbeat would spin every agent; 49 days would mark them all offline."""
    caplog.set_level(logging.WARNING, logger="agent.link.session")
    await node.server.coordinator.update_params(
        common_pb2.NodeParams(heartbeat_interval_ms=sent_ms, usage_batch_max=2**32 - 1)
    )
    await until(lambda: node.link.params.heartbeat_interval == applied, what="interval")
    assert node.link.params.usage_batch_max == USAGE_BATCH_MAX_RANGE[1]
    clamped = {r.param for r in caplog.records if "clamped" in r.getMessage()}  # type: ignore[attr-defined]
    assert clamped == (
        {"usage_batch_max"} if applied == 0.5 else {"heartbeat_interval", "usage_batch_max"}
    )
