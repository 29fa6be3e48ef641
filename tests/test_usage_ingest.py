"""Usage ingest end to end: the real scheduler on loopback over real gRPC.

Each scripted agent is the real ``CoordinatorLink`` (signed Hello, heartbeats)
with its real Ed25519 node key; it accepts the leases it is offered and sends
UsageReports of records it signs itself, as the agent's outbox would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from agent.identity import NodeIdentity, load_or_create
from agent.link import Backoff, CoordinatorLink
from benchmarks.node_fixtures import StaticReporter, build_inventory, simulated_gpus
from gpuagent.usage import SignedUsageRecord, UsageRecord, sign_record
from gpuagent.usage_wire import record_to_pb
from gpuagent.v1 import (
    common_pb2,
    coordinator_pb2,
    leases_pb2,
    leases_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    usage_pb2,
)
from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    FakeClock,
    admin_token,
    agent_config,
    authed_channel,
    scheduler_config,
    start_server,
)

S = common_pb2.LeaseState
SEC = 1_000_000_000
# A day before the scheduler's (fake) clock: records describe the past, as real ones do.
T0 = (1_700_000_000 - 86_400) * SEC
HOUR_NS = 3600 * SEC


@dataclass
class ScriptedAgent:
    """A node that accepts every offer (straight to running) and reports usage."""

    link: CoordinatorLink
    identity: NodeIdentity
    acks: asyncio.Queue[usage_pb2.UsageAck] = field(default_factory=asyncio.Queue)
    welcomes: list[coordinator_pb2.Welcome] = field(default_factory=list)
    running: dict[str, asyncio.Event] = field(default_factory=dict)
    update_seq: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    clock: FakeClock | None = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    async def _on_assign(self, assign: leases_pb2.LeaseAssign) -> None:
        await self.update(assign.lease_id, S.LEASE_STATE_RUNNING, gpu_uuids=assign.gpu_uuids)
        self.running.setdefault(assign.lease_id, asyncio.Event()).set()

    async def _on_ack(self, ack: usage_pb2.UsageAck) -> None:
        await self.acks.put(ack)

    async def _on_update_ack(self, ack: leases_pb2.LeaseUpdateAck) -> None:
        return None

    async def _on_session(self, welcome: coordinator_pb2.Welcome) -> None:
        self.welcomes.append(welcome)

    async def update(self, lease_id: str, state: int, **fields: object) -> None:
        seq = self.update_seq.get(lease_id, 0) + 1
        self.update_seq[lease_id] = seq
        update = leases_pb2.LeaseUpdate(lease_id=lease_id, update_seq=seq, state=state, **fields)  # type: ignore[arg-type]
        await self.link.send(coordinator_pb2.AgentMessage(lease_update=update))

    async def wait_running(self, lease_id: str) -> None:
        await asyncio.wait_for(self.running.setdefault(lease_id, asyncio.Event()).wait(), 5)

    def record(
        self,
        lease_id: str,
        seq: int,
        start_s: float,
        end_s: float,
        *,
        gpus: int = 1,
        signer: NodeIdentity | None = None,
        **fields: object,
    ) -> SignedUsageRecord:
        """A record of [start_s, end_s) seconds after T0, signed by this node's key.

        The scheduler's clock moves on to the record's end: records describe the past.
        """
        duration = round((end_s - start_s) * SEC)
        if self.clock is not None:
            self.clock.now = max(self.clock.now, (T0 + end_s * SEC) / SEC + 1)
        values: dict[str, object] = {
            "node_id": self.node_id,
            "seq": seq,
            "lease_id": lease_id,
            "start_unix_ns": T0 + round(start_s * SEC),
            "end_unix_ns": T0 + round(end_s * SEC),
            "duration_ns": duration,
            "gpu_count": gpus,
            "gpu_ns": gpus * duration,
            "energy_mj": 1000,
            "cpu_usec": 500,
        }
        values.update(fields)
        record = UsageRecord(**values)  # type: ignore[arg-type]
        return SignedUsageRecord(record, sign_record(record, (signer or self.identity).sign))

    async def report(
        self, *records: SignedUsageRecord | usage_pb2.UsageRecord
    ) -> usage_pb2.UsageAck:
        """Send one UsageReport and return the coordinator's UsageAck for it."""
        pbs = [r if isinstance(r, usage_pb2.UsageRecord) else record_to_pb(r) for r in records]
        report = usage_pb2.UsageReport(records=pbs)
        await self.link.send(coordinator_pb2.AgentMessage(usage_report=report))
        return await asyncio.wait_for(self.acks.get(), 5)

    async def start(self) -> None:
        self.link.on("lease_assign", self._on_assign)
        self.link.on("usage_ack", self._on_ack)
        self.link.on("lease_update_ack", self._on_update_ack)
        self.link.on_session(self._on_session)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.link.run(self.stop))
        await asyncio.wait_for(self.link.wait_connected(), 5)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
            self.task = None


def make_agent(port: int, state_dir: Path, ask: int) -> ScriptedAgent:
    config = agent_config(port, None)
    identity = load_or_create(state_dir)
    reporter = StaticReporter(build_inventory(simulated_gpus("rtx-4090", 2, identity.node_id)))
    backoff = Backoff(config.reconnect_initial, config.reconnect_max, uniform=lambda a, b: 0.0)
    link = CoordinatorLink(
        config,
        identity,
        reporter,
        node_name=state_dir.name,
        labels={"price_micros_per_gpu_hour": str(ask)},  # the node's ask: what leases pay
        backoff=backoff,
    )
    return ScriptedAgent(link, identity)


def config_for(tmp_path: Path, **ledger: object) -> SchedulerConfig:
    data = scheduler_config(tmp_path, None).model_dump()
    data["placement"] = {"assign_timeout": 2.0, "retry_interval": 0.1}
    # Scripted agents cannot pass attestation; placement on unattested GPUs is what we use.
    data["attestation"] = {"enabled": False, "required": False}
    data["ledger"] = ledger
    return SchedulerConfig.model_validate(data)


@dataclass
class Env:
    server: SchedulerServer
    tmp: Path
    channel: grpc.aio.Channel
    agents: list[ScriptedAgent] = field(default_factory=list)
    clock: FakeClock | None = None
    token: str = ""  # the admin token the channel sends

    @property
    def leases(self) -> leases_pb2_grpc.LeasesAsyncStub:
        return leases_pb2_grpc.LeasesStub(self.channel)

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerAsyncStub:
        return ledger_pb2_grpc.LedgerStub(self.channel)

    async def agent(self, name: str, ask: int = 1_000_000) -> ScriptedAgent:
        agent = make_agent(self.server.port, self.tmp / name, ask)
        agent.clock = self.clock
        await agent.start()
        self.agents.append(agent)
        return agent

    async def deposit(self, buyer: str, micros: int) -> ledger_pb2.Account:
        request = ledger_pb2.DepositRequest(buyer=buyer, amount_micros=micros)
        return await self.ledger.Deposit(request, timeout=5)

    async def run_lease(
        self,
        agent: ScriptedAgent,
        lease_id: str,
        *,
        buyer: str = "alice",
        price: int = 1_000_000,
        gpus: int = 1,
        max_s: int = 3600,
    ) -> None:
        """Submit a lease pinned to ``agent`` and wait until the agent runs it."""
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=gpus,
            price_micro_per_gpu_hour=price,
            max_duration_seconds=max_s,
        )
        request = leases_pb2.SubmitLeaseRequest(
            spec=spec, idempotency_key=lease_id, buyer=buyer, node_id=agent.node_id
        )
        await self.leases.Submit(request, timeout=5)
        await agent.wait_running(lease_id)

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.server.config.database.path) as conn:
            return conn.execute(sql, params).fetchall()

    def usage_rows(self, node_id: str) -> list[tuple[object, ...]]:
        return self.rows(
            "SELECT seq, lease_id, status FROM usage_records WHERE node_id = ? ORDER BY seq",
            node_id,
        )


async def make_env(tmp_path: Path, **ledger: object) -> AsyncIterator[Env]:
    # The scheduler's clock starts just before T0 and follows the records' ends (see
    # ScriptedAgent.record): a lease cannot bill more time than has passed since it was
    # offered, on the scheduler's own clock.
    clock = FakeClock(T0 / SEC - 60)
    server = await start_server(config_for(tmp_path, **ledger), clock)
    token = await admin_token(server)
    channel = authed_channel(server, token)
    env = Env(server, tmp_path, channel, clock=clock, token=token)
    try:
        yield env
    finally:
        for agent in env.agents:
            await agent.close()
        await channel.close()
        await server.stop(grace=0)


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


def protocol_errors(caplog: pytest.LogCaptureFixture, code: str) -> list[str]:
    """ProtocolErrors of ``code`` the agent's link received (it logs each one)."""
    return [
        getattr(r, "detail", "")
        for r in caplog.records
        if r.getMessage() == "coordinator reported a protocol error"
        and getattr(r, "code", "") == code
    ]


@pytest.mark.asyncio
async def test_valid_records_are_stored_settled_and_acked(env: Env) -> None:
    """Signed records of a lease the node runs are stored, acked through the highest
    seq, and their cost moves from the buyer's escrow to the node's earnings."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a", ask=2_000_000)
    await env.run_lease(agent, "lease-1", price=2_000_000, gpus=2)
    ack = await agent.report(
        agent.record("lease-1", 1, 0, 900, gpus=2), agent.record("lease-1", 2, 900, 1800, gpus=2)
    )
    assert (ack.acked_through_seq, ack.rejected) == (2, 0)
    assert env.usage_rows(agent.node_id) == [(1, "lease-1", "accepted"), (2, "lease-1", "accepted")]
    usage = await env.ledger.Usage(ledger_pb2.UsageRequest(lease_id="lease-1"), timeout=5)
    [lease] = usage.leases
    # 2 GPUs x 30 min = 1 GPU-hour at 2.0 -> 2.0; 2 GPUs x 1 h x 2.0 = 4.0 reserved.
    assert (lease.records, lease.gpu_ns, lease.cost_micros) == (2, HOUR_NS, 2_000_000)
    assert (lease.reserved_micros, lease.escrow_state) == (4_000_000, "held")
    assert lease.energy_millijoules == 2000 and lease.cpu_usec == 1000
    [provider] = usage.providers
    assert (provider.node_id, provider.earnings_micros) == (agent.node_id, 2_000_000)
    balance = await env.ledger.Balance(ledger_pb2.BalanceRequest(buyer="alice"), timeout=5)
    assert balance.accounts[0] == ledger_pb2.Account(
        buyer="alice",
        balance_micros=6_000_000,
        escrow_micros=2_000_000,
        spent_micros=2_000_000,
        deposited_micros=10_000_000,
    )


@pytest.mark.asyncio
async def test_forged_record_is_not_stored_and_does_not_advance_the_ack(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A record signed with another key is refused with BAD_SIGNATURE: nothing stored,
    nothing charged, the ack stays put, and the seq stays free for the real record."""
    caplog.set_level(logging.WARNING)
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    mallory = load_or_create(env.tmp / "mallory")
    ack = await agent.report(agent.record("lease-1", 1, 0, 3600, signer=mallory))
    assert ack.acked_through_seq == 0
    assert env.usage_rows(agent.node_id) == []
    assert any("do not verify" in d for d in protocol_errors(caplog, "BAD_SIGNATURE"))
    balance = await env.ledger.Balance(ledger_pb2.BalanceRequest(buyer="alice"), timeout=5)
    assert balance.accounts[0].spent_micros == 0
    ack = await agent.report(agent.record("lease-1", 1, 0, 60))
    assert ack.acked_through_seq == 1
    assert env.usage_rows(agent.node_id) == [(1, "lease-1", "accepted")]


@pytest.mark.asyncio
async def test_altered_record_fails_verification(env: Env) -> None:
    """Changing any signed field after signing (here: ten times the GPU time) breaks
    the signature; the altered record is not stored."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    pb = record_to_pb(agent.record("lease-1", 1, 0, 60))
    pb.duration_ns *= 10
    pb.gpu_ns *= 10
    ack = await agent.report(pb)
    assert ack.acked_through_seq == 0
    assert env.usage_rows(agent.node_id) == []


@pytest.mark.asyncio
async def test_duplicates_are_stored_and_charged_once(env: Env) -> None:
    """A record re-sent (in the same report and in a later one) is stored once and
    charged once; every copy is acked."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    first = agent.record("lease-1", 1, 0, 1800)
    assert (await agent.report(first, first)).acked_through_seq == 1
    assert (await agent.report(first)).acked_through_seq == 1
    assert env.usage_rows(agent.node_id) == [(1, "lease-1", "accepted")]
    settles = env.rows("SELECT amount_micros FROM ledger_entries WHERE kind = 'settle'")
    assert settles == [(500_000,)]


@pytest.mark.asyncio
async def test_ack_is_the_highest_contiguous_seq_and_a_gap_holds_it_back(env: Env) -> None:
    """Seqs 1, 2 and 4 stored: the ack is 2 until 3 arrives, then jumps to 4."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    r = [agent.record("lease-1", i, (i - 1) * 60, i * 60) for i in range(1, 5)]
    assert (await agent.report(r[0], r[1], r[3])).acked_through_seq == 2
    assert (await agent.report(r[3])).acked_through_seq == 2
    assert (await agent.report(r[2])).acked_through_seq == 4
    node = env.server.registry.nodes[agent.node_id]
    assert node.acked_usage_seq == 4
    assert env.rows("SELECT acked_usage_seq FROM nodes WHERE node_id = ?", agent.node_id) == [(4,)]


@pytest.mark.asyncio
async def test_record_for_a_lease_the_node_does_not_hold_is_rejected(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A node billing another node's lease (or an unknown one) gets the record stored
    as rejected, with the reason: acked so it stops re-sending, never charged."""
    caplog.set_level(logging.WARNING)
    await env.deposit("alice", 10_000_000)
    holder = await env.agent("holder")
    other = await env.agent("other")
    await env.run_lease(holder, "lease-1")
    ack = await other.report(other.record("lease-1", 1, 0, 60), other.record("nope", 2, 0, 60))
    assert (ack.acked_through_seq, ack.rejected) == (2, 2)
    rows = env.rows(
        "SELECT seq, status, reason, cost_micros FROM usage_records WHERE node_id = ? ORDER BY seq",
        other.node_id,
    )
    assert [(s, st, c) for s, st, _, c in rows] == [(1, "rejected", 0), (2, "rejected", 0)]
    assert "not held by this node" in str(rows[0][2]) and holder.node_id in str(rows[0][2])
    assert "unknown" in str(rows[1][2])
    assert env.rows("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'settle'") == [(0,)]
    assert any("refused for good" in d for d in protocol_errors(caplog, "REJECTED"))


@pytest.mark.asyncio
async def test_overlapping_interval_is_rejected(env: Env) -> None:
    """A record whose interval overlaps one already billed for the lease is rejected;
    the next, adjoining record is accepted."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    ack = await agent.report(
        agent.record("lease-1", 1, 0, 60),
        agent.record("lease-1", 2, 30, 90),
        agent.record("lease-1", 3, 60, 120),
    )
    assert (ack.acked_through_seq, ack.rejected) == (3, 1)
    assert env.usage_rows(agent.node_id) == [
        (1, "lease-1", "accepted"),
        (2, "lease-1", "rejected"),
        (3, "lease-1", "accepted"),
    ]
    [(reason,)] = env.rows("SELECT reason FROM usage_records WHERE status = 'rejected'")
    assert "overlaps seq 1" in str(reason)


@pytest.mark.asyncio
async def test_invalid_values_are_rejected(env: Env) -> None:
    """A negative start, an end before the start, GPU time that is not count x duration,
    and more GPUs than the lease holds are all rejected with the field named."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    bad = [
        agent.record("lease-1", 1, 0, 60, start_unix_ns=-5),
        agent.record("lease-1", 2, 0, 60, end_unix_ns=T0 - 1),
        agent.record("lease-1", 3, 0, 60, gpu_ns=1),
        agent.record("lease-1", 4, 0, 60, gpus=2),
    ]
    ack = await agent.report(*bad)
    assert (ack.acked_through_seq, ack.rejected) == (4, 4)
    reasons = [str(r) for (r,) in env.rows("SELECT reason FROM usage_records ORDER BY seq")]
    assert "start_unix_ns" in reasons[0]
    assert "end_unix_ns" in reasons[1]
    assert "gpu_ns" in reasons[2]
    assert "gpu_count 2 exceeds" in reasons[3]


@pytest.mark.asyncio
async def test_final_record_after_the_end_releases_the_escrow(env: Env) -> None:
    """Escrow stays held after the lease ends until its final record arrives; then the
    rest returns to the buyer and balance + spent equals the deposit, to the micro."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a", ask=3_000_000)
    await env.run_lease(agent, "lease-1", price=3_000_000)
    await agent.report(agent.record("lease-1", 1, 0, 600))
    await agent.update("lease-1", S.LEASE_STATE_SUCCEEDED, exit_code=0)
    query = ledger_pb2.UsageRequest(lease_id="lease-1")

    async def lease_state() -> str:
        return (await env.ledger.Usage(query, timeout=5)).leases[0].state

    deadline = asyncio.get_running_loop().time() + 5
    while await lease_state() != "succeeded":
        assert asyncio.get_running_loop().time() < deadline, "lease never succeeded"
        await asyncio.sleep(0.02)
    assert (await env.ledger.Usage(query, timeout=5)).leases[0].escrow_state == "held"
    await agent.report(agent.record("lease-1", 2, 600, 700, final=True))
    [lease] = (await env.ledger.Usage(query, timeout=5)).leases
    assert (lease.escrow_state, lease.final_seen) == ("released", True)
    assert lease.cost_micros == 3_000_000 * 700 // 3600
    assert lease.released_micros == 3_000_000 - lease.cost_micros
    account = (
        await env.ledger.Balance(ledger_pb2.BalanceRequest(buyer="alice"), timeout=5)
    ).accounts[0]
    assert account.escrow_micros == 0
    assert account.balance_micros + account.spent_micros == 10_000_000


@pytest.mark.asyncio
async def test_submit_without_funds_is_refused(env: Env) -> None:
    """Submit reserves price x GPUs x max duration; a buyer who cannot cover it gets
    FAILED_PRECONDITION naming the shortfall, and no lease is stored."""
    await env.deposit("carol", 1_000_000)
    spec = leases_pb2.LeaseSpec(
        image="busybox", gpu_count=2, price_micro_per_gpu_hour=1_000_000, max_duration_seconds=3600
    )
    request = leases_pb2.SubmitLeaseRequest(spec=spec, idempotency_key="big", buyer="carol")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.leases.Submit(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient balance" in (info.value.details() or "")
    assert env.rows("SELECT COUNT(*) FROM leases") == [(0,)]


@pytest.mark.asyncio
async def test_welcome_carries_the_acked_seq_after_a_scheduler_restart(tmp_path: Path) -> None:
    """The contiguous ack is stored with the node, so after a restart Welcome tells
    the agent what it may prune and what to re-send."""
    async for env in make_env(tmp_path):
        await env.deposit("alice", 10_000_000)
        agent = await env.agent("a")
        await env.run_lease(agent, "lease-1")
        assert (await agent.report(agent.record("lease-1", 1, 0, 60))).acked_through_seq == 1
    async for env in make_env(tmp_path):
        again = await env.agent("a")  # same state dir: same key, same node
        assert again.welcomes[-1].acked_usage_seq == 1


@pytest.mark.asyncio
async def test_collateral_gates_placement_until_the_node_stakes(tmp_path: Path) -> None:
    """With ledger.min_collateral set, a lease waits while the only node has no stake;
    the Stake RPC makes the node eligible and the lease is placed there."""
    async for env in make_env(tmp_path, min_collateral_micros=100_000_000):
        await env.deposit("alice", 10_000_000)
        agent = await env.agent("a")
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=1,
            price_micro_per_gpu_hour=1_000_000,
            max_duration_seconds=60,
        )
        request = leases_pb2.SubmitLeaseRequest(spec=spec, idempotency_key="l1", buyer="alice")
        await env.leases.Submit(request, timeout=5)
        await env.server.dispatcher.place_pending()
        assert not agent.running, "placed on a node without collateral"
        got = await env.leases.Get(leases_pb2.GetLeaseRequest(lease_id="l1"), timeout=5)
        assert got.state == S.LEASE_STATE_PENDING
        short = ledger_pb2.StakeRequest(node_id=agent.node_id[:12], amount_micros=99_999_999)
        assert not (await env.ledger.Stake(short, timeout=5)).eligible
        more = ledger_pb2.StakeRequest(
            node_id=agent.node_id, amount_micros=1, uptime_commitment_ratio=0.9
        )
        provider = await env.ledger.Stake(more, timeout=5)
        assert provider.eligible and provider.staked_micros == 100_000_000
        await agent.wait_running("l1")


@pytest.mark.asyncio
async def test_records_survive_as_evidence_byte_for_byte(env: Env) -> None:
    """What is stored is the signed canonical bytes and the signature: the record can
    be re-verified later by anyone holding the node's public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gpuagent.usage import decode_canonical, verify_record

    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a")
    await env.run_lease(agent, "lease-1")
    sent = agent.record("lease-1", 1, 0, 60, net_rx_bytes=2**40)
    await agent.report(sent)
    [(body, signature)] = env.rows("SELECT canonical, signature FROM usage_records")
    assert isinstance(body, bytes) and isinstance(signature, bytes)
    stored = decode_canonical(body)
    assert stored == sent.record
    key = Ed25519PublicKey.from_public_bytes(env.server.registry.nodes[agent.node_id].public_key)
    assert verify_record(stored, signature, key)
    assert not verify_record(dataclasses.replace(stored, net_rx_bytes=0), signature, key)


@pytest.mark.asyncio
async def test_wall_clock_step_is_billed_and_overbilling_is_refused(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Billing is judged on monotonic durations against the scheduler's own clock: a
    node whose wall clock ran 5 minutes ahead is still billed its records, while a
    record claiming more time than has passed since the offer is refused."""
    await env.deposit("alice", 10_000_000)
    agent = await env.agent("a", ask=1_000_000)
    await env.run_lease(agent, "lease-1", price=1_000_000)
    await agent.report(agent.record("lease-1", 1, 0, 60))
    await agent.update("lease-1", S.LEASE_STATE_SUCCEEDED, exit_code=0)
    assert env.clock is not None
    env.clock.advance(1)
    # The final record's wall times are 300 s in the future (a stepped clock); its
    # 30 s duration fits the time the lease had, so it is billed.
    stepped = agent.record("lease-1", 2, 360, 390, final=True)
    ack = await agent.report(stepped)
    assert ack.acked_through_seq == 2
    assert env.usage_rows(agent.node_id)[-1] == (2, "lease-1", "accepted")
    # A lease that ran about a minute cannot bill an hour.
    await env.run_lease(agent, "lease-2", price=1_000_000)
    offered_at = env.clock.now
    greedy = agent.record("lease-2", 3, 400, 4000)
    env.clock.now = offered_at + 60  # the scheduler has seen one minute since the offer
    await agent.report(greedy)
    assert env.usage_rows(agent.node_id)[-1] == (3, "lease-2", "rejected")
    assert any("more than the" in d for d in protocol_errors(caplog, "REJECTED"))
