"""Redundant runs (``verify: {replicas: N}``) against the real scheduler over gRPC.

Simulated agents (the real ``CoordinatorLink``, scripted lease handling) enrolled
under distinct provider accounts report their copies' results with output
commitments signed by their node keys; one of them can "cheat" (report another
digest). Usage is settled through the ledger's own ``settle`` (what usage ingest
calls), so payouts are real money moves in the scheduler's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.identity import load_or_create
from agent.link import Backoff, CoordinatorLink
from benchmarks.node_fixtures import build_inventory, simulated_gpus
from gpuagent import leaserules
from gpuagent.outputs import CHUNK_BYTES, output_commitment_signing_bytes
from gpuagent.v1 import (
    common_pb2,
    inventory_pb2,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from scheduler import cli, ledger
from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer
from scheduler.storage import Conn
from tests.coordinator_harness import (
    FakeClock,
    account_token,
    admin_token,
    agent_config,
    authed_channel,
    db_rows,
    enrollment_token,
    scheduler_config,
    start_server,
    until,
)
from tests.test_scheduler_leases import FakeAgent, ScriptedReporter, accept

S = common_pb2.LeaseState
PRICE = 3_600_000  # micros per GPU-hour: 1 micro per GPU-millisecond
HOUR_NS = 3600 * 10**9
CREDIT = 10**9
SLASH = 4_000_000
GOOD = hashlib.sha256(b"the right answer").digest()
BAD = hashlib.sha256(b"a cheaper answer").digest()


def config(tmp_path: Path, credit: int = CREDIT) -> SchedulerConfig:
    data = scheduler_config(tmp_path, None, registration="token").model_dump()
    data["placement"] = {"assign_timeout": 2.0, "retry_interval": 0.1}
    data["attestation"] = {"enabled": False, "required": False}
    data["ledger"] = {
        "escrow": True,
        "default_credit_micros": credit,
        "slash_verify_micros": SLASH,
    }
    return SchedulerConfig.model_validate(data)


@dataclass
class Env:
    server: SchedulerServer
    stub: leases_pb2_grpc.LeasesStub
    nodes: nodes_pb2_grpc.NodesStub
    tmp: Path
    agents: list[FakeAgent]
    token: str = ""

    async def agent(self, name: str, provider: str, *, host: str = "") -> FakeAgent:
        """A simulated node enrolled under ``provider`` on host ``host`` (default: its name)."""
        token = await enrollment_token(self.server, provider)
        cfg = agent_config(self.server.port, None, enrollment_token=token)
        identity = load_or_create(self.tmp / name)
        inventory = build_inventory(simulated_gpus("rtx-4090", 1, identity.node_id))
        inventory.host.hostname = host or name
        agent = FakeAgent(None, inventory, accept)  # type: ignore[arg-type]
        agent.health = [
            inventory_pb2.GpuHealth(uuid=g.uuid, state=inventory_pb2.GpuHealth.HEALTHY)
            for g in inventory.gpus
        ]
        backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max, uniform=lambda a, b: 0.0)
        agent.link = CoordinatorLink(
            cfg,
            identity,
            ScriptedReporter(agent),
            node_name=name,
            labels={"price_micros_per_gpu_hour": str(PRICE)},  # the node's ask
            backoff=backoff,
        )
        await agent.start()
        self.agents.append(agent)
        await until(lambda: agent.node_id in self.server.registry.nodes, what="registered")
        return agent

    async def submit(self, replicas: int, **spec: Any) -> leases_pb2.Lease:
        fields: dict[str, Any] = {
            "image": "busybox",
            "gpu_count": 1,
            "price_micro_per_gpu_hour": PRICE,
            "max_duration_seconds": 3600,
            "outputs": ["out/*"],
            "verify": leases_pb2.Verify(replicas=replicas),
        }
        fields.update(spec)
        request = leases_pb2.SubmitLeaseRequest(spec=leases_pb2.LeaseSpec(**fields), buyer="alice")
        return await self.stub.Submit(request, timeout=5)

    async def get(self, lease_id: str) -> leases_pb2.Lease:
        return await self.stub.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5)

    async def wait_state(self, lease_id: str, state: int) -> leases_pb2.Lease:
        got: list[leases_pb2.Lease] = []

        async def check() -> bool:
            got[:] = [await self.get(lease_id)]
            return got[0].state == state

        for _ in range(500):
            if await check():
                return got[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"{lease_id}: still {S.Name(got[0].state)}: {got[0].reason}")

    def holder(self, copy_id: str) -> FakeAgent:
        return next(a for a in self.agents if any(x.lease_id == copy_id for x in a.assigns))

    async def run_copy(self, copy_id: str, gpu_ns: int) -> None:
        """The copy starts and meters ``gpu_ns`` of GPU time (settled by the ledger)."""
        agent = self.holder(copy_id)
        await agent.update(copy_id, S.LEASE_STATE_RUNNING)
        row = await self.server.leases_store.get(copy_id)
        assert row is not None

        def txn(conn: Conn) -> None:
            ledger.settle(conn, row, agent.node_id, gpu_ns, 1)

        await until(lambda: agent.leases.get(copy_id) == S.LEASE_STATE_RUNNING)
        await self.server.db.call(txn)

    async def finish(
        self, copy_id: str, digest: bytes, *, state: int = S.LEASE_STATE_SUCCEEDED
    ) -> leases_pb2.LeaseUpdate:
        """The copy's terminal update, with its node's signed output commitment."""
        agent = self.holder(copy_id)
        signed = output_commitment_signing_bytes(copy_id, agent.node_id, digest, 1024, CHUNK_BYTES)
        commitment = leases_pb2.OutputCommitment(
            lease_id=copy_id,
            node_id=agent.node_id,
            digest=digest,
            size=1024,
            chunk_bytes=CHUNK_BYTES,
            signature=agent.link.identity.sign(signed),
        )
        exit_code = 0 if state == S.LEASE_STATE_SUCCEEDED else 1
        seq = await agent.update(copy_id, state, exit_code=exit_code, outputs=commitment)
        return leases_pb2.LeaseUpdate(
            lease_id=copy_id, update_seq=seq, state=state, exit_code=exit_code, outputs=commitment
        )

    def earnings(self, agent: FakeAgent) -> int:
        rows = db_rows(
            self.server.config, "SELECT micros FROM earnings WHERE node_id = ?", agent.node_id
        )
        return int(rows[0][0]) if rows else 0

    def escrow(self, copy_id: str) -> tuple[int, int, int, str]:
        (row,) = db_rows(
            self.server.config,
            "SELECT reserved_micros, settled_micros, released_micros, state FROM escrow"
            " WHERE lease_id = ?",
            copy_id,
        )
        return row  # type: ignore[return-value]

    async def stake(self, agent: FakeAgent, micros: int) -> None:
        await self.server.db.call(lambda conn: ledger.stake(conn, agent.node_id, micros, 1))


@contextlib.asynccontextmanager
async def make_env(tmp_path: Path, credit: int = CREDIT) -> AsyncIterator[Env]:
    server = await start_server(config(tmp_path, credit), FakeClock())
    token = await admin_token(server)
    channel = authed_channel(server, token)
    env = Env(
        server,
        leases_pb2_grpc.LeasesStub(channel),
        nodes_pb2_grpc.NodesStub(channel),
        tmp_path,
        [],
        token,
    )
    try:
        yield env
    finally:
        for agent in env.agents:
            await agent.close()
        await channel.close()
        await server.stop(grace=0)


async def placed_copies(env: Env, parent_id: str, count: int) -> list[str]:
    """The parent's copies once ``count`` of them were offered to a node."""
    await until(
        lambda: sum(len(a.assigns) for a in env.agents) >= count, what=f"{count} copies offered"
    )
    lease = await env.get(parent_id)
    offered = {x.lease_id for a in env.agents for x in a.assigns}
    return [c.lease_id for c in lease.copies if c.lease_id in offered]


@pytest.mark.asyncio
async def test_three_copies_one_cheat_majority_paid_cheat_flagged_and_slashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """replicas 3 on three providers, one reports another digest: the parent succeeds,
    the honest two are paid what they ran (nothing before the vote), the cheat is paid
    nothing, its escrow goes back to the buyer, it is flagged in nodes show and slashed
    ledger.slash_verify_micros. The three terminal updates race; re-sending one, or
    the listener seeing it again, moves no money twice."""
    async with make_env(tmp_path) as env:
        honest = [await env.agent("a", "acme"), await env.agent("b", "globex")]
        cheat = await env.agent("c", "initech")
        for agent in (*honest, cheat):
            await env.stake(agent, 50_000_000)
        parent = await env.submit(3)
        assert parent.verify_state == "verifying" and len(parent.copies) == 3
        assert all(c.outcome == "held" for c in parent.copies)
        copies = await placed_copies(env, parent.lease_id, 3)
        assert len(copies) == 3
        shown = await env.get(parent.lease_id)
        assert len({c.provider for c in shown.copies}) == 3
        assert {c.node_id for c in shown.copies} == {a.node_id for a in env.agents}
        half_hour = HOUR_NS // 2
        for copy_id in copies:
            await env.run_copy(copy_id, half_hour)
        assert [env.earnings(a) for a in env.agents] == [0, 0, 0]  # held until the vote
        by_agent = {env.holder(c).node_id: c for c in copies}
        updates = await asyncio.gather(
            *(
                env.finish(by_agent[a.node_id], BAD if a is cheat else GOOD)
                for a in (*honest, cheat)
            )
        )
        done = await env.wait_state(parent.lease_id, S.LEASE_STATE_SUCCEEDED)
        assert done.verify_state == "majority"
        assert "2 of 3 copies agree" in done.reason
        outcome = {c.node_id: c.outcome for c in done.copies}
        assert outcome == {
            honest[0].node_id: "paid",
            honest[1].node_id: "paid",
            cheat.node_id: "flagged",
        }
        assert {c.node_id: c.digest for c in done.copies}[cheat.node_id] == BAD
        cost = PRICE // 2  # half an hour at PRICE per hour
        assert [env.earnings(a) for a in honest] == [cost, cost]
        assert env.earnings(cheat) == 0
        reserved, settled, released, state = env.escrow(by_agent[cheat.node_id])
        assert (settled, released, state) == (0, reserved, "released")
        node = await env.nodes.Get(nodes_pb2.GetNodeRequest(node_id=cheat.node_id), timeout=5)
        assert [f.parent_lease_id for f in node.verify_flags] == [parent.lease_id]
        assert node.verify_flags[0].slashed_micros == SLASH
        found = await env.server.db.call(lambda conn: ledger.collateral(conn, cheat.node_id))
        assert found is not None and found.slashed_micros == SLASH
        honest_node = await env.nodes.Get(
            nodes_pb2.GetNodeRequest(node_id=honest[0].node_id), timeout=5
        )
        assert not honest_node.verify_flags
        capsys.readouterr()
        assert await run_cli(env, "nodes", "show", cheat.node_id) == 0
        shown_node = capsys.readouterr().out
        assert f"(verified lease {parent.lease_id})" in shown_node
        assert "output disagreed with the majority; slashed 4\n" in shown_node

        # Idempotency: the same update again (a duplicate seq), a new terminal update
        # for the ended copy, and the listener called again all change nothing.
        honest_copy = by_agent[honest[0].node_id]
        await honest[0].send_raw(updates[0])
        await honest[0].update(honest_copy, S.LEASE_STATE_SUCCEEDED, exit_code=0)
        row = await env.server.leases_store.get(honest_copy)
        assert row is not None
        await env.server.verify.on_terminal_update(row, updates[0])
        await env.server.verify.sweep()
        await until(lambda: len(honest[0].acks) >= 4, what="acks of the re-sent updates")
        assert [env.earnings(a) for a in honest] == [cost, cost]
        again = await env.server.db.call(lambda conn: ledger.pay_held(conn, row, 2))
        assert again == 0
        settles = db_rows(
            env.server.config,
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'settle' AND lease_id = ?",
            honest_copy,
        )
        assert settles == [(1,)]
        slashes = db_rows(
            env.server.config,
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'slash' AND node_id = ?",
            cheat.node_id,
        )
        assert slashes == [(1,)]
        events = [e.state for e in (await env.get(parent.lease_id)).events]
        assert events.count(S.LEASE_STATE_SUCCEEDED) == 1


@pytest.mark.asyncio
async def test_two_copies_disagree_one_tiebreak_then_majority(tmp_path: Path) -> None:
    """replicas 2 with one cheat: both are held, ONE tie-break copy goes to a third
    provider (never one of the first two), and its digest decides as with 3."""
    async with make_env(tmp_path) as env:
        a = await env.agent("a", "acme")
        b = await env.agent("b", "globex")
        await env.stake(b, 50_000_000)
        parent = await env.submit(2)
        first, second = await placed_copies(env, parent.lease_id, 2)
        for copy_id in (first, second):
            await env.run_copy(copy_id, HOUR_NS // 4)
        cheat_copy = next(c for c in (first, second) if env.holder(c) is b)
        honest_copy = next(c for c in (first, second) if env.holder(c) is a)
        await env.finish(honest_copy, GOOD)
        await env.finish(cheat_copy, BAD)
        await until(
            lambda: len(db_rows(env.server.config, "SELECT 1 FROM verify_copies")) == 3,
            what="the tie-break copy",
        )
        waiting = await env.get(parent.lease_id)
        assert waiting.state == S.LEASE_STATE_PENDING
        tiebreak = next(c for c in waiting.copies if c.role == "tiebreak")
        assert {c.outcome for c in waiting.copies} == {"held"}
        assert [env.earnings(x) for x in (a, b)] == [0, 0]
        # Their final usage records and the release grace passing do not release a held
        # copy's escrow: the vote still has to pay from it.

        def final(conn: Conn) -> list[str]:
            for copy_id in (first, second):
                ledger.final_record(conn, copy_id, 2)
            return ledger.release_due(conn, 2**62, env.server.ledger.policy)

        assert await env.server.db.call(final) == []
        assert [env.escrow(x)[3] for x in (first, second)] == ["held", "held"]
        # Only acme and globex are enrolled: the tie-break waits for a third provider,
        # and the parent says so.
        tb_row = await env.get(tiebreak.lease_id)
        await until(lambda: "distinct providers" in env_reason(env, tiebreak.lease_id))
        assert "needs 3 distinct providers, 2 eligible" in env_reason(env, parent.lease_id)
        c = await env.agent("c", "initech")
        await until(lambda: any(x.lease_id == tiebreak.lease_id for x in c.assigns))
        await until(
            lambda: env_reason(env, parent.lease_id).startswith("verifying: copies placed"),
            what="the parent no longer says it waits",
        )
        assert tb_row.buyer == "alice"
        await env.run_copy(tiebreak.lease_id, HOUR_NS // 4)
        await env.finish(tiebreak.lease_id, GOOD)
        done = await env.wait_state(parent.lease_id, S.LEASE_STATE_SUCCEEDED)
        outcome = {x.node_id: x.outcome for x in done.copies}
        assert outcome == {a.node_id: "paid", b.node_id: "flagged", c.node_id: "paid"}
        assert [env.earnings(x) for x in (a, b, c)] == [PRICE // 4, 0, PRICE // 4]
        reserved, settled, released, state = env.escrow(honest_copy)
        assert (settled, released, state) == (PRICE // 4, reserved - PRICE // 4, "released")
        assert env.escrow(cheat_copy)[1:] == (0, env.escrow(cheat_copy)[0], "released")
        assert len(done.copies) == 3  # at most one tie-break


def env_reason(env: Env, lease_id: str) -> str:
    rows = db_rows(env.server.config, "SELECT reason FROM leases WHERE lease_id = ?", lease_id)
    return str(rows[0][0]) if rows else ""


@pytest.mark.asyncio
async def test_all_copies_differ_results_disagree_nobody_paid_escrow_released(
    tmp_path: Path,
) -> None:
    """Three different digests: the parent fails results_disagree, no node is paid or
    flagged (no majority says who is wrong), and the buyer gets every copy's escrow
    back: the balance is what it was before the submit."""
    async with make_env(tmp_path) as env:
        agents = [await env.agent(n, p) for n, p in (("a", "acme"), ("b", "globex"), ("c", "i"))]
        parent = await env.submit(3)
        copies = await placed_copies(env, parent.lease_id, 3)
        for n, copy_id in enumerate(copies):
            await env.run_copy(copy_id, HOUR_NS // 10)
            await env.finish(copy_id, hashlib.sha256(bytes([n])).digest())
        done = await env.wait_state(parent.lease_id, S.LEASE_STATE_FAILED)
        assert done.reason.startswith("results_disagree")
        assert done.verify_state == "results_disagree"
        assert {c.outcome for c in done.copies} == {"not_paid"}
        assert [env.earnings(a) for a in agents] == [0, 0, 0]
        for copy_id in copies:
            reserved, settled, released, state = env.escrow(copy_id)
            assert (settled, released, state) == (0, reserved, "released")
        balance = db_rows(
            env.server.config, "SELECT balance_micros FROM accounts WHERE buyer = 'alice'"
        )
        assert balance == [(CREDIT,)]
        assert db_rows(env.server.config, "SELECT COUNT(*) FROM verify_flags") == [(0,)]


@pytest.mark.asyncio
async def test_a_failed_copy_counts_as_not_agreeing_and_is_not_slashed(tmp_path: Path) -> None:
    """replicas 3, one copy exits non-zero: the other two agree, the parent succeeds,
    the failed copy is not paid and not flagged (a crash is not a wrong answer)."""
    async with make_env(tmp_path) as env:
        agents = [await env.agent(n, p) for n, p in (("a", "acme"), ("b", "globex"), ("c", "i"))]
        parent = await env.submit(3)
        copies = await placed_copies(env, parent.lease_id, 3)
        for copy_id in copies:
            await env.run_copy(copy_id, HOUR_NS // 10)
        await env.finish(copies[0], GOOD)
        await env.finish(copies[1], GOOD, state=S.LEASE_STATE_FAILED)
        await env.finish(copies[2], GOOD)
        done = await env.wait_state(parent.lease_id, S.LEASE_STATE_SUCCEEDED)
        outcome = {c.lease_id: c.outcome for c in done.copies}
        assert outcome == {copies[0]: "paid", copies[1]: "not_paid", copies[2]: "paid"}
        failed_node = env.holder(copies[1])
        assert env.earnings(failed_node) == 0
        assert sorted(env.earnings(a) for a in agents) == [0, PRICE // 10, PRICE // 10]
        assert db_rows(env.server.config, "SELECT COUNT(*) FROM verify_flags") == [(0,)]


@pytest.mark.asyncio
async def test_copies_never_share_a_provider_or_host_and_wait_with_the_reason(
    tmp_path: Path,
) -> None:
    """Two nodes of acme and one of globex: replicas 3 waits (needs 3 distinct
    providers, 2 eligible) and no copy is offered at all; replicas 2 goes to one acme
    node and the globex node, never both acme ones. A node of a third provider on
    globex's host does not count as distinct either."""
    async with make_env(tmp_path) as env:
        await env.agent("a1", "acme")
        await env.agent("a2", "acme")
        g = await env.agent("g", "globex")
        await env.agent("h", "hooli", host="g")  # another account, the same machine
        parent = await env.submit(3)
        await until(lambda: "eligible" in env_reason(env, parent.lease_id))
        shown = await env.get(parent.lease_id)
        assert "waiting: needs 3 distinct providers, 2 eligible" in shown.reason
        assert all(c.node_id == "" for c in shown.copies)
        assert all(not a.assigns for a in env.agents)
        await env.stub.Cancel(leases_pb2.CancelLeaseRequest(lease_id=parent.lease_id), timeout=5)
        two = await env.submit(2)
        copies = await placed_copies(env, two.lease_id, 2)
        shown = await env.get(two.lease_id)
        providers = sorted(c.provider for c in shown.copies)
        assert providers == ["acme", "globex"] or providers == ["acme", "hooli"]
        assert len({env.holder(c).inventory.host.hostname for c in copies}) == 2
        assert g.node_id in {c.node_id for c in shown.copies} or providers[1] == "hooli"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("spec", "wanted"),
    [
        ({"verify": leases_pb2.Verify(replicas=4)}, "verify.replicas: must be 0..3"),
        ({"verify": leases_pb2.Verify(replicas=2**32 - 1)}, "verify.replicas: must be 0..3"),
        (
            {"verify": leases_pb2.Verify(replicas=3), "outputs": []},
            "verify.replicas: needs outputs",
        ),
        (
            {"ports": [leases_pb2.PortSpec(container_port=80, name="web")]},
            "verify.replicas: not for services",
        ),
        ({"restart": "always"}, "verify.replicas: not with a restart policy"),
    ],
)
async def test_hostile_verified_submits_are_refused_naming_the_key(
    tmp_path: Path, spec: dict[str, Any], wanted: str
) -> None:
    """Too many copies, an absurd count, no outputs to compare, a service: refused at
    submit with the key named, and nothing stored."""
    async with make_env(tmp_path) as env:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.submit(2, **spec)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wanted in str(caught.value.details())
        assert db_rows(env.server.config, "SELECT COUNT(*) FROM leases") == [(0,)]


def test_verify_rule_bounds() -> None:
    """The one home of the rule: 0 and 1 are a single run, 2 and 3 copies; a negative
    count (what a hand-written client could send through a signed field) is refused."""
    assert leaserules.check_verify(0, [], 0, "") == 1
    assert leaserules.check_verify(1, [], 0, "") == 1
    assert leaserules.check_verify(3, ["out"], 0, "never") == 3
    with pytest.raises(
        leaserules.RuleError, match=r"verify.replicas: must be 0..3 \(2 or 3 copies\), got -1"
    ):
        leaserules.check_verify(-1, ["out"], 0, "")


@pytest.mark.asyncio
async def test_pinned_verified_lease_refused_and_quote_covers_every_copy(tmp_path: Path) -> None:
    """A verified lease cannot be pinned to one node; its quote reserves N copies'
    escrow and says so; submit takes that much from the balance."""
    async with make_env(tmp_path) as env:
        a = await env.agent("a", "acme")
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=1,
            price_micro_per_gpu_hour=PRICE,
            max_duration_seconds=3600,
            outputs=["out"],
            verify=leases_pb2.Verify(replicas=3),
        )
        with pytest.raises(grpc.aio.AioRpcError, match="cannot be pinned"):
            await env.stub.Submit(
                leases_pb2.SubmitLeaseRequest(spec=spec, node_id=a.node_id), timeout=5
            )
        quote = await env.stub.Quote(
            leases_pb2.SubmitLeaseRequest(spec=spec, buyer="alice"), timeout=5
        )
        assert quote.escrow_micros == 3 * PRICE
        # One provider enrolled: the copies would wait, and the quote says why.
        assert not quote.placeable
        assert "needs 3 distinct providers, 1 eligible" in quote.reason
        assert "x 3 copies" in quote.reason and "3 distinct providers" in quote.reason
        # Submitted twice with one idempotency key: one parent, three copies, one escrow.
        request = leases_pb2.SubmitLeaseRequest(spec=spec, buyer="alice", idempotency_key="job-7")
        first = await env.stub.Submit(request, timeout=5)
        again = await env.stub.Submit(request, timeout=5)
        assert first.lease_id == again.lease_id == "job-7"
        assert [c.lease_id for c in again.copies] == [c.lease_id for c in first.copies]
        assert db_rows(env.server.config, "SELECT COUNT(*) FROM leases") == [(4,)]
        balance = db_rows(
            env.server.config, "SELECT balance_micros FROM accounts WHERE buyer = 'alice'"
        )
        assert balance == [(CREDIT - 3 * PRICE,)]


async def run_cli(env: Env, *argv: str) -> int:
    conn = ["--address", f"127.0.0.1:{env.server.port}", "--insecure", "--token", env.token]
    return await asyncio.to_thread(cli.main, [argv[0], *argv[1:], *conn])


@pytest.mark.asyncio
async def test_cli_verify_flag_and_lease_show_copies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``submit --verify-replicas`` is checked before anything is sent (4 and -1 name
    the key; no outputs is refused by the scheduler naming it); ``lease show PARENT``
    lists every copy with node, provider, state and digest, and --json carries them."""
    async with make_env(tmp_path) as env:
        base = ["submit", "--image", "busybox", "--price-max", str(PRICE), "--max-duration", "1h"]
        for bad in ("4", "-1"):
            assert await run_cli(env, *base, "--verify-replicas", bad) != 0
            assert "verify.replicas" in capsys.readouterr().err
        assert await run_cli(env, *base, "--buyer", "alice", "--verify-replicas", "2") != 0
        assert "verify.replicas: needs outputs" in capsys.readouterr().err
        await env.agent("a", "acme")
        await env.agent("b", "globex")
        parent = await env.submit(2)
        copies = await placed_copies(env, parent.lease_id, 2)
        await env.finish(copies[0], GOOD)
        await until(
            lambda: (
                db_rows(
                    env.server.config,
                    "SELECT ended FROM verify_copies WHERE copy_id = ?",
                    copies[0],
                )
                == [(1,)]
            ),
            what="the first copy's digest stored",
        )
        capsys.readouterr()
        assert await run_cli(env, "lease", "show", parent.lease_id) == 0
        out = capsys.readouterr().out
        assert "verify:      verifying (2 copies)" in out
        for copy_id in copies:
            assert copy_id in out
        assert GOOD.hex()[:16] in out and "provider acme" in out and "provider globex" in out
        assert await run_cli(env, "lease", "show", parent.lease_id, "--json") == 0
        shown = json.loads(capsys.readouterr().out)
        assert len(shown["copies"]) == 2 and shown["verifyState"] == "verifying"
        assert await run_cli(env, "lease", "show", copies[0]) == 0
        assert f"copy of:     {parent.lease_id}" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_a_tiebreak_the_buyer_cannot_fund_fails_the_parent_cleanly(tmp_path: Path) -> None:
    """A balance that covers exactly the 2 copies: when they disagree the tie-break's
    escrow is refused, the parent fails results_disagree saying why, both copies'
    escrow goes back, and no half-stored tie-break lease is left behind."""
    async with make_env(tmp_path, credit=2 * PRICE) as env:
        await env.agent("a", "acme")
        await env.agent("b", "globex")
        await env.agent("c", "initech")
        parent = await env.submit(2)
        first, second = await placed_copies(env, parent.lease_id, 2)
        await env.finish(first, GOOD)
        await env.finish(second, BAD)
        done = await env.wait_state(parent.lease_id, S.LEASE_STATE_FAILED)
        assert done.reason.startswith("results_disagree: the tie-break copy could not be reserved")
        assert "insufficient balance" in done.reason
        assert len(done.copies) == 2
        assert db_rows(env.server.config, "SELECT COUNT(*) FROM leases") == [(3,)]
        balance = db_rows(
            env.server.config, "SELECT balance_micros FROM accounts WHERE buyer = 'alice'"
        )
        assert balance == [(2 * PRICE,)]


@pytest.mark.asyncio
async def test_racing_judgements_decide_once(tmp_path: Path) -> None:
    """The three copies' terminal updates are stored first, then judged all at once
    (three listener calls and two sweeps in flight together, on separate database
    connections under PostgreSQL): one decision, one payout per copy, one slash."""
    async with make_env(tmp_path) as env:
        agents = [await env.agent(n, p) for n, p in (("a", "acme"), ("b", "globex"), ("c", "i"))]
        await env.stake(agents[2], 50_000_000)
        parent = await env.submit(3)
        copies = await placed_copies(env, parent.lease_id, 3)
        for copy_id in copies:
            await env.run_copy(copy_id, HOUR_NS // 10)
        verifier = env.server.verify
        env.server.dispatcher.verify = None  # store the updates without judging them
        updates = [
            await env.finish(copy_id, BAD if env.holder(copy_id) is agents[2] else GOOD)
            for copy_id in copies
        ]
        await until(
            lambda: (
                db_rows(
                    env.server.config,
                    "SELECT COUNT(*) FROM leases WHERE state = 'succeeded' AND lease_id != ?",
                    parent.lease_id,
                )
                == [(3,)]
            ),
            what="three copies stored as succeeded",
        )
        rows = [await env.server.leases_store.get(c) for c in copies]
        await asyncio.gather(
            *(verifier.on_terminal_update(r, u) for r, u in zip(rows, updates, strict=True) if r),
            verifier.sweep(),
            verifier.sweep(),
        )
        done = await env.get(parent.lease_id)
        assert done.state == S.LEASE_STATE_SUCCEEDED
        assert [e.state for e in done.events].count(S.LEASE_STATE_SUCCEEDED) == 1
        assert sorted(c.outcome for c in done.copies) == ["flagged", "paid", "paid"]
        counts = db_rows(
            env.server.config,
            "SELECT kind, COUNT(*) FROM ledger_entries WHERE ref LIKE 'verify:%' GROUP BY kind"
            " ORDER BY kind",
        )
        assert counts == [("settle", 2), ("slash", 1)]


@pytest.mark.asyncio
async def test_another_buyer_cannot_see_or_cancel_a_verified_lease(tmp_path: Path) -> None:
    """A buyer's own token submits a verified lease; another buyer's token gets
    NOT_FOUND for the parent and for each copy, and cannot cancel them."""
    async with make_env(tmp_path) as env:
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=1,
            price_micro_per_gpu_hour=PRICE,
            max_duration_seconds=3600,
            outputs=["out"],
            verify=leases_pb2.Verify(replicas=2),
        )
        alice = authed_channel(env.server, await account_token(env.server, "alice", "buyer"))
        mallory = authed_channel(env.server, await account_token(env.server, "mallory", "buyer"))
        try:
            mine = await leases_pb2_grpc.LeasesStub(alice).Submit(
                leases_pb2.SubmitLeaseRequest(spec=spec), timeout=5
            )
            assert mine.buyer == "alice" and len(mine.copies) == 2
            theirs = leases_pb2_grpc.LeasesStub(mallory)
            for lease_id in (mine.lease_id, *(c.lease_id for c in mine.copies)):
                for call in (
                    theirs.Get(leases_pb2.GetLeaseRequest(lease_id=lease_id), timeout=5),
                    theirs.Cancel(leases_pb2.CancelLeaseRequest(lease_id=lease_id), timeout=5),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            still = await env.get(mine.lease_id)
            assert still.state == S.LEASE_STATE_PENDING
        finally:
            await alice.close()
            await mallory.close()


@pytest.mark.asyncio
async def test_a_pass_sweeps_only_when_its_view_has_a_copy_that_ended_unseen(
    tmp_path: Path,
) -> None:
    """The placement view names the pending copies and says when a copy ended without
    the verifier judging it; a pass runs the verifier's sweep (a SERIALIZABLE
    transaction) only then, and the ended copy is judged by that pass alone."""
    async with make_env(tmp_path) as env:
        store, dispatcher = env.server.leases_store, env.server.dispatcher
        parent = await env.submit(2)  # no node yet: both copies wait
        view = await store.placement_view()
        copy_ids = {r.lease_id for r in view.pending}
        assert len(copy_ids) == 2 and parent.lease_id not in copy_ids
        assert view.copies == copy_ids and not view.copies_ended

        sweeps = [0]
        real = env.server.verify.sweep

        async def counted() -> None:
            sweeps[0] += 1
            await real()

        env.server.verify.sweep = counted  # type: ignore[method-assign]
        for _ in range(3):
            await dispatcher.place_pending()
        assert sweeps[0] == 0

        # One copy ends with no update this scheduler saw (its row written directly).
        lost = sorted(copy_ids)[0]
        await env.server.db.call(
            lambda conn: conn.execute(
                "UPDATE leases SET state = 'lost', ended_ns = 1 WHERE lease_id = ?", (lost,)
            )
        )
        view = await store.placement_view()
        assert view.copies_ended and lost not in view.copies
        await dispatcher.place_pending()
        assert sweeps[0] >= 1  # the background loop's pass may have been the one
        judged = sweeps[0]
        view = await store.placement_view()
        assert not view.copies_ended
        for _ in range(3):
            await dispatcher.place_pending()
        assert sweeps[0] == judged
        ended = db_rows(
            env.server.config, "SELECT ended FROM verify_copies WHERE copy_id = ?", lost
        )
        assert ended == [(1,)]
