"""Leases end to end: the real scheduler on loopback, real gRPC, scripted agents.

Each fake agent is the real ``CoordinatorLink`` (signed Hello, heartbeats)
with handlers that answer LeaseAssign/LeaseCancel as the test scripts them;
the real agent's LeaseManager is wired by the lead separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from agent.identity import load_or_create
from agent.link import Backoff, CoordinatorLink
from agent.link.reporter import HeartbeatState, HelloState
from benchmarks.node_fixtures import build_inventory, simulated_gpus
from gpuagent.v1 import common_pb2, coordinator_pb2, inventory_pb2, leases_pb2, leases_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.leases_store import LeaseRow
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    FakeClock,
    admin_token,
    agent_config,
    authed_channel,
    db_rows,
    scheduler_config,
    start_server,
    until,
)

S = common_pb2.LeaseState
Behaviour = Callable[["FakeAgent", leases_pb2.LeaseAssign], Awaitable[None]]


class ScriptedReporter:
    """Hello/Heartbeat state from the fake agent's lease table."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    def _leases(self) -> list[common_pb2.LeaseStatus]:
        return [
            common_pb2.LeaseStatus(lease_id=k, state=v, gpu_uuids=self.agent.gpus_of.get(k, []))
            for k, v in self.agent.leases.items()
        ]

    async def hello_state(self) -> HelloState:
        return HelloState(
            inventory=self.agent.inventory, gpu_health=self.agent.health, leases=self._leases()
        )

    async def heartbeat_state(self) -> HeartbeatState:
        held = {u for k, us in self.agent.gpus_of.items() if k in self.agent.leases for u in us}
        free = [g.uuid for g in self.agent.inventory.gpus if g.uuid not in held]
        return HeartbeatState(
            gpu_health=self.agent.health,
            free_gpu_uuids=free,
            allocated_gpu_uuids=sorted(held),
            leases=self._leases(),
        )


async def accept(agent: FakeAgent, assign: leases_pb2.LeaseAssign) -> None:
    agent.leases[assign.lease_id] = S.LEASE_STATE_ASSIGNED
    agent.gpus_of[assign.lease_id] = list(assign.gpu_uuids)
    await agent.update(assign.lease_id, S.LEASE_STATE_ASSIGNED)


async def run_to_success(agent: FakeAgent, assign: leases_pb2.LeaseAssign) -> None:
    await accept(agent, assign)
    await agent.update(assign.lease_id, S.LEASE_STATE_RUNNING)
    await agent.update(
        assign.lease_id, S.LEASE_STATE_SUCCEEDED, exit_code=0, log_tail="working\ndone\n"
    )


async def reject(agent: FakeAgent, assign: leases_pb2.LeaseAssign) -> None:
    await agent.update(assign.lease_id, S.LEASE_STATE_REJECTED, reason="image not allowed here")


async def silent(agent: FakeAgent, assign: leases_pb2.LeaseAssign) -> None:
    return None


@dataclass
class FakeAgent:
    link: CoordinatorLink
    inventory: inventory_pb2.Inventory
    behaviour: Behaviour
    health: list[inventory_pb2.GpuHealth] = field(default_factory=list)
    leases: dict[str, int] = field(default_factory=dict)
    gpus_of: dict[str, list[str]] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    assigns: list[leases_pb2.LeaseAssign] = field(default_factory=list)
    cancels: list[leases_pb2.LeaseCancel] = field(default_factory=list)
    acks: list[tuple[str, int]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def node_id(self) -> str:
        return self.link.identity.node_id

    async def update(self, lease_id: str, state: int, **fields: object) -> int:
        seq = self.seq.get(lease_id, 0) + 1
        self.seq[lease_id] = seq
        if state != S.LEASE_STATE_REJECTED:
            self.leases[lease_id] = state
        update = leases_pb2.LeaseUpdate(lease_id=lease_id, update_seq=seq, state=state, **fields)  # type: ignore[arg-type]
        await self.link.send(coordinator_pb2.AgentMessage(lease_update=update))
        return seq

    async def send_raw(self, update: leases_pb2.LeaseUpdate) -> None:
        await self.link.send(coordinator_pb2.AgentMessage(lease_update=update))

    async def _on_assign(self, assign: leases_pb2.LeaseAssign) -> None:
        self.assigns.append(assign)
        await self.behaviour(self, assign)

    async def _on_cancel(self, cancel: leases_pb2.LeaseCancel) -> None:
        self.cancels.append(cancel)

    async def _on_ack(self, ack: leases_pb2.LeaseUpdateAck) -> None:
        self.acks.append((ack.lease_id, ack.update_seq))

    async def start(self) -> None:
        self.link.on("lease_assign", self._on_assign)
        self.link.on("lease_cancel", self._on_cancel)
        self.link.on("lease_update_ack", self._on_ack)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.link.run(self.stop))
        await asyncio.wait_for(self.link.wait_connected(), 5)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
            self.task = None


def make_agent(
    port: int,
    state_dir: Path,
    behaviour: Behaviour = accept,
    *,
    gpus: int = 2,
    price: int | None = None,
) -> FakeAgent:
    config = agent_config(port, None)
    identity = load_or_create(state_dir)
    inventory = build_inventory(simulated_gpus("rtx-4090", gpus, identity.node_id))
    labels = {"price_micros_per_gpu_hour": str(price)} if price is not None else {}
    backoff = Backoff(config.reconnect_initial, config.reconnect_max, uniform=lambda a, b: 0.0)
    agent = FakeAgent(None, inventory, behaviour)  # type: ignore[arg-type]
    agent.health = [
        inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
        for g in inventory.gpus
    ]
    agent.link = CoordinatorLink(
        config,
        identity,
        ScriptedReporter(agent),
        node_name=state_dir.name,
        labels=labels,
        backoff=backoff,
    )
    return agent


def config_for(tmp_path: Path, **placement: object) -> SchedulerConfig:
    base = scheduler_config(tmp_path, None)
    settings = {"assign_timeout": 2.0, "retry_interval": 0.2, **placement}
    data = base.model_dump()
    data["placement"] = settings
    # Fake agents cannot pass attestation; placement on unattested GPUs is what we test.
    data["attestation"] = {"enabled": False, "required": False}
    # Escrow is the ledger's to test; here leases need no funds.
    data["ledger"] = {"escrow": False}
    return SchedulerConfig.model_validate(data)


@dataclass
class Env:
    server: SchedulerServer
    clock: FakeClock
    stub: leases_pb2_grpc.LeasesStub
    tmp: Path
    agents: list[FakeAgent]
    token: str = ""  # the admin token the stub sends

    async def agent(self, name: str, behaviour: Behaviour = accept, **kw: object) -> FakeAgent:
        agent = make_agent(self.server.port, self.tmp / name, behaviour, **kw)  # type: ignore[arg-type]
        await agent.start()
        self.agents.append(agent)
        return agent

    async def submit(self, **spec: object) -> leases_pb2.Lease:
        extra = {
            k: spec.pop(k)
            for k in ("idempotency_key", "buyer", "replace_on_lost", "node_id")
            if k in spec
        }
        fields: dict[str, object] = {
            "image": "busybox",
            "gpu_count": 1,
            "price_micro_per_gpu_hour": 1000,
        }
        fields.update(spec)
        request = leases_pb2.SubmitLeaseRequest(spec=leases_pb2.LeaseSpec(**fields), **extra)  # type: ignore[arg-type]
        return await self.stub.Submit(request, timeout=5)

    async def get(self, lease_id: str) -> leases_pb2.Lease:
        return await self.stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)

    async def wait_state(self, lease_id: str, state: int, within: float = 5.0) -> leases_pb2.Lease:
        """Poll Get until the lease is in ``state`` (the buyer's API has no push)."""
        last: list[leases_pb2.Lease] = []

        async def check() -> bool:
            last[:] = [await self.get(lease_id)]
            return last[0].state == state

        deadline = asyncio.get_running_loop().time() + within
        while not await check():
            if asyncio.get_running_loop().time() > deadline:
                got = S.Name(last[0].state)
                raise AssertionError(
                    f"{lease_id}: wanted {S.Name(state)}, still {got}: {last[0].reason}"
                )  # type: ignore[arg-type]
            await asyncio.sleep(0.02)
        return last[0]

    def attempts(self, lease_id: str) -> list[tuple[str, str]]:
        return db_rows(  # type: ignore[return-value]
            self.server.config,
            "SELECT node_id, outcome FROM placement_attempts WHERE lease_id = ? ORDER BY rowid",
            lease_id,
        )


@contextlib.asynccontextmanager
async def make_env(tmp_path: Path, **placement: object) -> AsyncIterator[Env]:
    clock = FakeClock()
    server = await start_server(config_for(tmp_path, **placement), clock)
    token = await admin_token(server)
    channel = authed_channel(server, token)
    env = Env(server, clock, leases_pb2_grpc.LeasesStub(channel), tmp_path, [], token)
    try:
        yield env
    finally:
        for agent in env.agents:
            await agent.close()
        await channel.close()
        await server.stop(grace=0)


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


@pytest.mark.asyncio
async def test_submit_assign_run_succeed(env: Env) -> None:
    """A submitted lease is assigned to the node with the node's GPUs, follows the agent's
    updates to succeeded, records its history, exit code and log tail, and every update
    is acked."""
    agent = await env.agent("a", run_to_success)
    lease = await env.submit(buyer="alice", max_duration_seconds=60)
    assert lease.state == S.LEASE_STATE_PENDING
    assert lease.buyer == "alice"
    done = await env.wait_state(lease.lease_id, S.LEASE_STATE_SUCCEEDED)
    assign = agent.assigns[0]
    assert assign.lease_id == lease.lease_id
    assert len(assign.gpu_uuids) == 1
    assert assign.gpu_uuids[0] in {g.uuid for g in agent.inventory.gpus}
    assert done.node_id == agent.node_id
    assert done.exit_code == 0
    assert done.started_at_unix_nanos > 0 and done.ended_at_unix_nanos > 0
    assert done.expires_at_unix_nanos == done.started_at_unix_nanos + 60 * 10**9
    assert [S.Name(e.state) for e in done.events] == [
        "LEASE_STATE_PENDING",
        "LEASE_STATE_ASSIGNED",
        "LEASE_STATE_RUNNING",
        "LEASE_STATE_SUCCEEDED",
    ]
    logs = await env.stub.Logs(leases_pb2.LeaseLogsRequest(lease_id=lease.lease_id, tail_lines=1))
    assert logs.log_tail == "done\n"
    await until(lambda: len(agent.acks) == 3, what="three acks")
    assert agent.acks == [(lease.lease_id, 1), (lease.lease_id, 2), (lease.lease_id, 3)]
    assert env.attempts(lease.lease_id) == [(agent.node_id, "offered"), (agent.node_id, "accepted")]


@pytest.mark.asyncio
async def test_rejected_offer_goes_to_the_next_node(env: Env) -> None:
    """The cheapest node is offered first; when it rejects, the lease goes to the next
    candidate and the history shows why."""
    cheap = await env.agent("cheap", reject, price=100)
    other = await env.agent("other", accept, price=200)
    lease = await env.submit(price_micro_per_gpu_hour=500)
    got = await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    assert got.node_id == other.node_id
    assert got.accepted_price_micro_per_gpu_hour == 200
    assert got.attempts == 2
    assert env.attempts(lease.lease_id) == [
        (cheap.node_id, "offered"),
        (cheap.node_id, "rejected"),
        (other.node_id, "offered"),
        (other.node_id, "accepted"),
    ]
    assert any("image not allowed here" in e.reason for e in got.events)


@pytest.mark.asyncio
async def test_unanswered_offer_times_out_and_is_cancelled(tmp_path: Path) -> None:
    """A node that does not answer within assign_timeout loses the offer (and is told to
    cancel, in case it acts late); the next node gets the lease."""
    async with make_env(tmp_path, assign_timeout=0.3) as env:
        mute = await env.agent("mute", silent, price=100)
        other = await env.agent("other", accept, price=200)
        lease = await env.submit()
        got = await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
        assert got.node_id == other.node_id
        assert (mute.node_id, "timeout") in env.attempts(lease.lease_id)
        await until(lambda: len(mute.cancels) == 1, what="LeaseCancel to the mute node")
        assert mute.cancels[0].lease_id == lease.lease_id
        assert "offer expired" in mute.cancels[0].reason


@pytest.mark.asyncio
async def test_pinned_lease_rejected_by_its_node_ends_rejected(env: Env) -> None:
    """A lease pinned to a node that rejects it has nowhere else to go: it ends rejected
    with the node's reason."""
    node = await env.agent("only", reject)
    lease = await env.submit(node_id=node.node_id[:12])
    got = await env.wait_state(lease.lease_id, S.LEASE_STATE_REJECTED)
    assert "image not allowed here" in got.reason
    assert got.node_id == ""


@pytest.mark.asyncio
async def test_node_offline_loses_leases_and_replaces_when_asked(env: Env) -> None:
    """When a node goes offline (injectable clock + sweep), its running leases are lost;
    a lease submitted with replace_on_lost goes back to pending and runs elsewhere."""
    doomed = await env.agent("doomed", accept, price=100)
    plain = await env.submit()
    keep = await env.submit(replace_on_lost=True)
    for lease in (plain, keep):
        got = await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
        assert got.node_id == doomed.node_id
    await doomed.close()
    rescuer = await env.agent("rescuer", accept, price=200)
    env.clock.advance(env.server.config.liveness.offline_grace + 1)
    # The rescuer keeps heartbeating; bring it back to "just seen" before the sweep.
    await until(
        lambda: env.server.registry.nodes[rescuer.node_id].last_seen == env.clock.now,
        what="rescuer heartbeat",
    )
    await env.server.sweep()
    lost = await env.wait_state(plain.lease_id, S.LEASE_STATE_LOST)
    assert "went offline" in lost.reason
    moved = await env.wait_state(keep.lease_id, S.LEASE_STATE_ASSIGNED)
    assert moved.node_id == rescuer.node_id
    states = [S.Name(e.state) for e in moved.events]
    assert states[-3:] == ["LEASE_STATE_LOST", "LEASE_STATE_PENDING", "LEASE_STATE_ASSIGNED"]


@pytest.mark.asyncio
async def test_cancel_pending_lease_ends_it_at_once(env: Env) -> None:
    """With no node able to take it a lease waits with the reason; Cancel ends it directly."""
    lease = await env.submit()
    await until_reason(env, lease.lease_id, "no nodes registered")
    assert (await env.get(lease.lease_id)).state == S.LEASE_STATE_PENDING
    cancelled = await env.stub.Cancel(
        leases_pb2.CancelLeaseRequest(lease_id=lease.lease_id, reason="changed my mind"), timeout=5
    )
    assert cancelled.state == S.LEASE_STATE_CANCELLED
    assert cancelled.reason == "changed my mind"
    again = await env.stub.Cancel(leases_pb2.CancelLeaseRequest(lease_id=lease.lease_id), timeout=5)
    assert again.state == S.LEASE_STATE_CANCELLED  # idempotent


@pytest.mark.asyncio
async def test_pending_lease_shows_why_it_waits(env: Env) -> None:
    """A lease no node can take says why in its reason (here: every node asks too much)."""
    await env.agent("pricey", accept, price=10_000)
    lease = await env.submit(price_micro_per_gpu_hour=100)
    await until_reason(env, lease.lease_id, "too expensive")


async def until_reason(env: Env, lease_id: str, text: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while text not in (await env.get(lease_id)).reason:
        assert asyncio.get_running_loop().time() < deadline, f"reason never mentioned {text!r}"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_cancel_running_lease_goes_through_the_agent(env: Env) -> None:
    """Cancelling a running lease sends LeaseCancel; it ends when the agent reports it."""
    agent = await env.agent("a", accept)
    lease = await env.submit()
    await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING)
    await env.wait_state(lease.lease_id, S.LEASE_STATE_RUNNING)
    reply = await env.stub.Cancel(leases_pb2.CancelLeaseRequest(lease_id=lease.lease_id), timeout=5)
    assert reply.state == S.LEASE_STATE_RUNNING
    await until(lambda: len(agent.cancels) == 1, what="LeaseCancel")
    assert agent.cancels[0].lease_id == lease.lease_id
    await agent.update(lease.lease_id, S.LEASE_STATE_CANCELLED, exit_code=143)
    done = await env.wait_state(lease.lease_id, S.LEASE_STATE_CANCELLED)
    assert done.exit_code == 143


@pytest.mark.asyncio
async def test_submit_is_idempotent_by_key(env: Env) -> None:
    """The same key and spec returns the same lease (one row); the same key with a
    different spec is ALREADY_EXISTS."""
    first = await env.submit(idempotency_key="job-42")
    second = await env.submit(idempotency_key="job-42")
    assert first.lease_id == second.lease_id == "job-42"
    listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
    assert [x.lease_id for x in listed.leases] == ["job-42"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.submit(idempotency_key="job-42", image="other")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.asyncio
async def test_duplicate_update_is_acked_and_ignored(env: Env) -> None:
    """A re-sent LeaseUpdate (same lease, same seq) changes nothing and is acked again."""
    agent = await env.agent("a", accept)
    lease = await env.submit()
    await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    seq = await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING)
    await env.wait_state(lease.lease_id, S.LEASE_STATE_RUNNING)
    await agent.send_raw(
        leases_pb2.LeaseUpdate(lease_id=lease.lease_id, update_seq=seq, state=S.LEASE_STATE_FAILED)
    )
    await until(lambda: agent.acks.count((lease.lease_id, seq)) == 2, what="second ack")
    assert (await env.get(lease.lease_id)).state == S.LEASE_STATE_RUNNING


@pytest.mark.asyncio
async def test_bad_specs_are_refused_with_the_field(env: Env) -> None:
    """Hostile fields, zero GPUs and bad idempotency keys fail Submit with INVALID_ARGUMENT
    naming the field; nothing is stored."""
    cases = [
        ({"privileged": True}, "spec.privileged"),
        ({"gpu_count": 0}, "spec.gpu_count"),
        ({"image": ""}, "spec.image"),
        ({"idempotency_key": "../etc"}, "idempotency_key"),
        ({"network_mode": "host"}, "spec.network_mode"),
        ({"network_mode": "container:other-lease"}, "spec.network_mode"),
        (
            {"network_mode": "none", "ports": [leases_pb2.PortSpec(container_port=80)]},
            "spec.network_mode",
        ),
    ]
    for spec, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.submit(**spec)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in (info.value.details() or "")
    listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
    assert list(listed.leases) == []


@pytest.mark.asyncio
async def test_reconnect_reconciles_with_the_agents_lease_list(env: Env) -> None:
    """After an agent reconnects: a lease it no longer lists is lost (after its first
    heartbeat) and a lease it runs that the scheduler does not know gets LeaseCancel."""
    agent = await env.agent("a", accept)
    lease = await env.submit()
    await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING)
    await env.wait_state(lease.lease_id, S.LEASE_STATE_RUNNING)
    await agent.close()
    # The restarted agent lost the lease but runs something the scheduler never placed.
    agent.leases = {"ghost-1": S.LEASE_STATE_RUNNING}
    await agent.start()
    await until(lambda: any(c.lease_id == "ghost-1" for c in agent.cancels), what="ghost cancel")
    lost = await env.wait_state(lease.lease_id, S.LEASE_STATE_LOST)
    assert "missing after reconnect" in lost.reason
    # Told, in case it runs it after all: the coordinator bills it no more.
    await until(
        lambda: any(c.lease_id == lease.lease_id for c in agent.cancels), what="lost cancel"
    )
    told = next(c for c in agent.cancels if c.lease_id == lease.lease_id)
    assert "ended it (lost) as missing after your reconnect" in told.reason


@pytest.mark.asyncio
async def test_an_assignment_during_reconnect_survives_a_heartbeat_older_than_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass may offer to a node whose session is registered while its on_connect still
    runs; the agent accepts, and its first heartbeat is a snapshot from before that.
    The lease was assigned on this very session: it is not "missing" (it used to end
    lost while the agent ran it to the end, unbilled: the fault suite's churn test)."""
    stale: dict[str, int] = {}

    async def accept_behind_the_snapshot(agent: FakeAgent, assign: leases_pb2.LeaseAssign) -> None:
        await accept(agent, assign)
        # The heartbeat being built was read before this accept.
        stale[assign.lease_id] = agent.leases.pop(assign.lease_id)

    agent = await env.agent("a", accept_behind_the_snapshot)
    await agent.close()
    store = env.server.leases_store
    real_get_many = store.get_many
    in_on_connect, offered = asyncio.Event(), asyncio.Event()

    async def slow_get_many(ids: list[str]) -> dict[str, LeaseRow]:
        if not in_on_connect.is_set():  # on_connect's read, once
            in_on_connect.set()
            await offered.wait()
        return await real_get_many(ids)

    monkeypatch.setattr(store, "get_many", slow_get_many)
    await agent.start()
    await asyncio.wait_for(in_on_connect.wait(), 5)
    lease = await env.submit()
    await until(lambda: lease.lease_id in stale, what="the accept")
    offered.set()
    record = env.server.registry.nodes[agent.node_id]
    # Heartbeat 2 is handled only after heartbeat 1's reconciliation has finished.
    await until(
        lambda: record.last_heartbeat is not None and record.last_heartbeat.seq >= 2,
        what="two heartbeats",
    )
    got = await env.get(lease.lease_id)
    assert got.state == S.LEASE_STATE_ASSIGNED, got.reason
    assert not any(c.lease_id == lease.lease_id for c in agent.cancels)


@pytest.mark.asyncio
async def test_ledger_hooks_run_in_the_lease_transactions(env: Env) -> None:
    """on_submitted may refuse a lease (FAILED_PRECONDITION with its message, nothing
    stored); on_terminal runs once with the ended row."""

    class Broke(Exception):
        pass

    ended: list[LeaseRow] = []

    def on_submitted(conn: sqlite3.Connection, row: LeaseRow) -> None:
        if row.buyer == "broke":
            raise Broke("insufficient balance: need 1000, have 0")

    env.server.leases_store.add_hooks(
        on_submitted=on_submitted,
        on_terminal=lambda conn, row: ended.append(row),
        refusals=(Broke,),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.submit(buyer="broke", idempotency_key="refused-1")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient balance" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await env.get("refused-1")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    await env.agent("a", run_to_success)
    lease = await env.submit(buyer="alice")
    await env.wait_state(lease.lease_id, S.LEASE_STATE_SUCCEEDED)
    assert [(r.lease_id, r.state) for r in ended] == [(lease.lease_id, "succeeded")]


@pytest.mark.asyncio
async def test_restart_keeps_leases_and_requeues_inflight_offers(tmp_path: Path) -> None:
    """Leases survive a scheduler restart; an offer that was in flight goes back to
    pending (nobody waits for its answer any more)."""
    async with make_env(tmp_path) as env:
        await env.agent("mute", silent)
        lease = await env.submit()
        await until(lambda: env.attempts(lease.lease_id) != [], what="offer")
    server = SchedulerServer(config_for(tmp_path), clock=FakeClock())
    await server.start()
    try:
        row = await server.leases_store.get(lease.lease_id)
        assert row is not None and row.state == "pending" and row.node_id is None
        assert server.leases_store.counts == {"pending": 1}
    finally:
        await server.stop(grace=0)
    rows = db_rows(server.config, "SELECT outcome FROM placement_attempts ORDER BY rowid")
    outcomes = [r[0] for r in rows]
    assert outcomes == ["offered", "interrupted"]
