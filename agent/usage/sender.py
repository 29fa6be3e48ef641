"""The usage sender: outbox records up the link in seq order, acks back into the outbox.

Records flow one way: sampler -> outbox -> ``UsageReport`` -> ``UsageAck`` -> prune.
The sender owns the only cursor on that path (the highest seq sent this session),
so it is also the part that knows an ack is impossible: a ``UsageAck`` past what
was sent would settle records the coordinator never received, and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from gpuagent.aio import wait_any
from gpuagent.usage import SignedUsageRecord
from gpuagent.usage_wire import record_to_pb
from gpuagent.v1 import coordinator_pb2, usage_pb2

from ..link.session import NotConnected
from .outbox import Outbox

log = logging.getLogger(__name__)


class Uplink(Protocol):
    """What the sender needs of the coordinator link."""

    @property
    def connected(self) -> bool: ...

    async def send(self, message: coordinator_pb2.AgentMessage) -> None: ...


class UsageSender:
    def __init__(self, outbox: Outbox, link: Uplink, batch_size: int) -> None:
        self._outbox = outbox
        self._link = link
        self._batch_size = batch_size  # the agent's metering.batch_size
        self.batch_max = 0  # coordinator-set (NodeParams.usage_batch_max); 0: batch_size
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._sent_through = 0
        self.refused_acks = 0

    @property
    def batch(self) -> int:
        return self.batch_max or self._batch_size

    def wake(self, _records: Sequence[SignedUsageRecord] = ()) -> None:
        """New records are in the outbox (the sampler's ``on_records``)."""
        self._wake.set()

    async def on_session(self, acked_usage_seq: int) -> None:
        """After Welcome: prune what the coordinator stored, re-send everything after it."""
        if acked_usage_seq:
            # Past every seq this outbox assigned means a restored state dir: new
            # records then continue above it (Outbox.ack), never taken for duplicates.
            await asyncio.to_thread(self._outbox.ack, acked_usage_seq)
        stats = await asyncio.to_thread(self._outbox.stats)
        self._sent_through = stats.acked_seq
        self._wake.set()

    async def on_ack(self, msg: usage_pb2.UsageAck) -> None:
        through = msg.acked_through_seq
        if through > self._sent_through:
            self.refused_acks += 1
            log.error(
                "usage ack past the last record sent refused; nothing pruned",
                extra={"acked_through_seq": through, "sent_through_seq": self._sent_through},
            )
            return
        pruned = await asyncio.to_thread(self._outbox.ack, through)
        self._acked.set()
        log.debug("usage acked", extra={"through_seq": through, "pruned": pruned})

    async def run(self, stop: asyncio.Event) -> None:
        """Send outbox records in seq order whenever there are some and a session is open."""
        while not stop.is_set():
            # Cleared before the outbox is read, not after: a record appended while
            # the read runs sets it again, so it is never slept through.
            self._wake.clear()
            if self._link.connected:
                batch: list[SignedUsageRecord] = await asyncio.to_thread(
                    self._outbox.pending, self.batch, self._sent_through
                )
                if batch:
                    report = usage_pb2.UsageReport(records=[record_to_pb(r) for r in batch])
                    try:
                        await self._link.send(coordinator_pb2.AgentMessage(usage_report=report))
                    except NotConnected:
                        continue
                    self._sent_through = batch[-1].record.seq
                    continue
            await wait_any(self._wake, stop)

    async def flush(self) -> None:
        """At shutdown: deliver what is pending while connected (the agent's drain timeout
        bounds it). Nothing is lost without this (the outbox is durable and replayed after
        the restart); it only spares the coordinator a backlog after routine restarts."""
        target = (await asyncio.to_thread(self._outbox.stats)).last_seq
        while self._link.connected:
            stats = await asyncio.to_thread(self._outbox.stats)
            if stats.acked_seq >= target:
                log.info("usage flushed", extra={"acked_through_seq": stats.acked_seq})
                return
            self._acked.clear()
            self._wake.set()
            # Re-checked on every ack.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), 1.0)
