"""One simulated agent of the fleet benchmark: the real protocol, nothing else.

Its own Ed25519 key, the signed Hello over the coordinator's nonce, heartbeats at
the Welcome's interval (random phase), LeaseAssign answered with LeaseUpdate
running (then succeeded on ``finish``) and signed usage records; reconnects with
the agent's real Backoff (1 s, x1.6, +-20 %). Many share a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.link.backoff import Backoff
from benchmarks.node_fixtures import simulated_gpus
from gpuagent import PROTOCOL_VERSION, __version__
from gpuagent.signing import hello_signing_bytes, node_id_from_public_key
from gpuagent.usage import SignedUsageRecord, UsageRecord, sign_record
from gpuagent.usage_wire import record_to_pb
from gpuagent.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    inventory_pb2,
    leases_pb2,
    market_pb2,
    usage_pb2,
)

GPUS_PER_AGENT = 2
# The market the fleet offers (docs/market.md): three regions in two countries, asks
# spread over 1.0-2.0 units per GPU-hour, a provider label, a measured bandwidth, so
# the placement benchmark runs with the buyers' constraints in play.
REGIONS = (("eu-west", "DE"), ("eu-west", "FR"), ("us-east", "US"), ("eu-north", "SE"))


def fleet_offer(index: int, gpu_model: str) -> tuple[market_pb2.NodeOffer, dict[str, str]]:
    region, country = REGIONS[index % len(REGIONS)]
    offer = market_pb2.NodeOffer(
        pricing=[
            market_pb2.GpuPrice(
                gpu_model=gpu_model, micros_per_gpu_hour=1_000_000 + (index * 7919) % 1_000_001
            )
        ],
        location=market_pb2.Location(region=region, country=country),
        bandwidth=market_pb2.BandwidthMeasurement(
            bits_per_second=(1 + index % 10) * 10**9, measured_at_unix_nanos=time.time_ns()
        ),
    )
    return offer, {"tier": "gold" if index % 2 else "standard"}


State = common_pb2.LeaseState


@dataclass
class FleetStats:
    welcomed: int = 0
    target: int = 0
    all_welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    assigned_at: dict[str, float] = field(default_factory=dict)
    assign_waiters: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    usage_acked: int = 0
    usage_expected: int = 0
    usage_done: asyncio.Event = field(default_factory=asyncio.Event)
    errors: int = 0
    # Called on each Welcome and each LeaseAssign (lease id, node id, monotonic time):
    # the worker process forwards them to the orchestrator.
    on_welcome: Callable[[int], None] | None = None
    on_assign: Callable[[str, str, float], None] | None = None

    def welcome(self) -> None:
        self.welcomed += 1
        if self.target and self.welcomed >= self.target:
            self.all_welcomed.set()
        if self.on_welcome is not None:
            self.on_welcome(self.welcomed)


class SimAgent:
    def __init__(self, index: int, stats: FleetStats, host: inventory_pb2.HostInfo) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = node_id_from_public_key(self.public_key)
        self.name = f"sim-{index:05d}"
        self.stats = stats
        gpus = simulated_gpus("rtx-4090", GPUS_PER_AGENT, self.node_id)
        self.inventory = inventory_pb2.Inventory(host=host, gpus=gpus)
        self.health = [
            inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
            for g in gpus
        ]
        self.gpu_uuids = [g.uuid for g in gpus]
        self.offer, self.labels = fleet_offer(index, gpus[0].name)
        self.leases: dict[str, list[str]] = {}  # lease id -> GPUs it holds
        self.usage_seq = 0
        self.acked_usage_seq = 0
        self.call: Any = None
        self.lock = asyncio.Lock()
        self.interval = 10.0
        self.hb_seq = 0
        self.welcomed = False

    async def send(self, **body: Any) -> None:
        async with self.lock:
            await self.call.write(coordinator_pb2.AgentMessage(**body))

    def _heartbeat(self) -> coordinator_pb2.Heartbeat:
        held = {u for gpus in self.leases.values() for u in gpus}
        self.hb_seq += 1
        return coordinator_pb2.Heartbeat(
            seq=self.hb_seq,
            sent_at_unix_nanos=time.time_ns(),
            gpu_health=self.health,
            free_gpu_uuids=[u for u in self.gpu_uuids if u not in held],
            allocated_gpu_uuids=sorted(held),
            leases=[
                common_pb2.LeaseStatus(lease_id=lid, state=State.LEASE_STATE_RUNNING)
                for lid in self.leases
            ],
        )

    async def run(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, 120.0)
        while not stop.is_set():
            self.welcomed = False
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError):
                await self._session(channel, stop)
            if self.welcomed:  # a welcomed session was a healthy one: start at 1 s again
                backoff.reset()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next_delay())

    async def _session(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> None:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        self.call = stub.Connect()
        self.hb_seq = 0
        heartbeats: asyncio.Task[None] | None = None
        try:
            first = await self.call.read()
            if first is grpc.aio.EOF or first.WhichOneof("body") != "hello_challenge":
                return
            nonce = first.hello_challenge.nonce
            signed = hello_signing_bytes(nonce, self.node_id, self.public_key, PROTOCOL_VERSION)
            await self.send(
                hello=coordinator_pb2.Hello(
                    node_id=self.node_id,
                    public_key=self.public_key,
                    signature=self.key.sign(signed),
                    protocol_version=PROTOCOL_VERSION,
                    agent_version=__version__,
                    node_name=self.name,
                    labels=self.labels,
                    offer=self.offer,
                    inventory=self.inventory,
                    gpu_health=self.health,
                    last_acked_usage_seq=self.acked_usage_seq,
                )
            )
            while not stop.is_set():
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    interval_ms = message.welcome.params.heartbeat_interval_ms
                    self.interval = interval_ms / 1000 if interval_ms else 10.0
                    heartbeats = asyncio.create_task(self._heartbeats())
                    self.welcomed = True
                    self.stats.welcome()
                elif kind == "lease_assign":
                    await self._on_assign(message.lease_assign)
                elif kind == "usage_ack":
                    self._on_usage_ack(message.usage_ack.acked_through_seq)
                elif kind == "error":
                    self.stats.errors += 1
                    if message.error.fatal:
                        return
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            self.call.cancel()

    async def _heartbeats(self) -> None:
        # Random phase: a real fleet's heartbeats are spread over the interval.
        await asyncio.sleep(random.uniform(0, self.interval))  # noqa: S311 - not crypto
        while True:
            await self.send(heartbeat=self._heartbeat())
            await asyncio.sleep(self.interval)

    async def _on_assign(self, assign: leases_pb2.LeaseAssign) -> None:
        now = time.monotonic()
        self.stats.assigned_at[assign.lease_id] = now
        waiter = self.stats.assign_waiters.pop(assign.lease_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.node_id)
        if self.stats.on_assign is not None:
            self.stats.on_assign(assign.lease_id, self.node_id, now)
        self.leases[assign.lease_id] = list(assign.gpu_uuids)
        await self.send(
            lease_update=leases_pb2.LeaseUpdate(
                lease_id=assign.lease_id,
                update_seq=1,
                state=State.LEASE_STATE_RUNNING,
                gpu_uuids=assign.gpu_uuids,
                at_unix_nanos=time.time_ns(),
            )
        )

    def _on_usage_ack(self, acked: int) -> None:
        gained = max(0, acked - self.acked_usage_seq)
        self.acked_usage_seq = max(self.acked_usage_seq, acked)
        self.stats.usage_acked += gained
        if self.stats.usage_expected and self.stats.usage_acked >= self.stats.usage_expected:
            self.stats.usage_done.set()

    def usage_report(self, lease_id: str, count: int, final: bool) -> usage_pb2.UsageReport:
        """``count`` consecutive 1 s intervals ending now, signed; the last may be final."""
        gpus = len(self.leases.get(lease_id, [])) or 1
        end = time.time_ns()
        start = end - count * 1_000_000_000
        records = []
        for i in range(count):
            self.usage_seq += 1
            record = UsageRecord(
                node_id=self.node_id,
                seq=self.usage_seq,
                lease_id=lease_id,
                start_unix_ns=start + i * 1_000_000_000,
                end_unix_ns=start + (i + 1) * 1_000_000_000,
                duration_ns=1_000_000_000,
                gpu_count=gpus,
                gpu_ns=gpus * 1_000_000_000,
                final=final and i == count - 1,
            )
            signature = sign_record(record, self.key.sign)
            records.append(record_to_pb(SignedUsageRecord(record, signature)))
        return usage_pb2.UsageReport(records=records)

    async def finish(self, lease_id: str) -> None:
        gpus = self.leases.pop(lease_id, [])
        await self.send(
            lease_update=leases_pb2.LeaseUpdate(
                lease_id=lease_id,
                update_seq=2,
                state=State.LEASE_STATE_SUCCEEDED,
                exit_code=0,
                gpu_uuids=gpus,
                at_unix_nanos=time.time_ns(),
            )
        )
