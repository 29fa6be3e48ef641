"""Refused calls: every guarded method of the real scheduler, over TLS, with no token,
a bad one, a revoked one, an expired one, another account's and a too-weak role's.

Each refusal must come with the right status and change nothing: the tables a call
could touch are compared before and after the whole barrage.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from gpuagent.v1 import (
    acl_pb2,
    acl_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    market_pb2,
    market_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
)
from scheduler.auth import policy
from scheduler.auth import store as acl_store
from scheduler.server import SchedulerServer, served_methods
from tests.coordinator_harness import (
    admin_token,
    agent_config,
    db_rows,
    enrollment_token,
    make_link,
    make_pki,
    scheduler_config,
    start_server,
    until,
)

Code = grpc.StatusCode
# Tables any of the guarded calls could write; a refused call must leave them as they were.
WATCHED = (
    "leases",
    "lease_events",
    "accounts",
    "escrow",
    "ledger_entries",
    "collateral",
    "acl_accounts",
    "acl_tokens",
    "audit_log",
)


@dataclass
class World:
    server: SchedulerServer
    ca: bytes
    tokens: dict[str, str]  # admin, alice, bob (buyers), acme, other (providers), revoked, expired
    node_id: str  # enrolled by acme
    lease_id: str  # alice's

    def channel(self) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
        return grpc.aio.secure_channel(f"localhost:{self.server.port}", creds)

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        config = self.server.config
        tables = {t: db_rows(config, f"SELECT * FROM {t} ORDER BY rowid") for t in WATCHED}  # noqa: S608
        tables["nodes"] = db_rows(config, "SELECT node_id, owner, draining FROM nodes ORDER BY 1")
        return tables


async def _issue(server: SchedulerServer, name: str, role: str, **kw: Any) -> str:
    def txn(conn: sqlite3.Connection) -> str:
        now = time.time_ns()
        if acl_store.account(conn, name) is None:
            acl_store.create_account(conn, name, role, now)
        return acl_store.issue(conn, name, "api", now, **kw)[1]

    return await server.db.call(txn)


@pytest_asyncio.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    pki = make_pki(tmp_path / "pki")
    config = scheduler_config(tmp_path, pki, registration="token")
    data = config.model_dump()
    data["ledger"] = {"escrow": True}
    server = await start_server(type(config).model_validate(data))
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        tokens = {"admin": await admin_token(server)}
        for name, role in (("alice", "buyer"), ("bob", "buyer"), ("acme", "provider")):
            tokens[name] = await _issue(server, name, role)
        tokens["other"] = await _issue(server, "other-provider", "provider")
        revoked = await _issue(server, "carol", "buyer")
        await server.db.call(
            lambda conn: acl_store.revoke(
                conn, acl_store.list_tokens(conn, "carol")[0].token_id, time.time_ns()
            )
        )
        tokens["revoked"] = revoked
        expired_at = time.time_ns() - 10**9
        tokens["expired"] = await _issue(server, "dave", "buyer", ttl_seconds=1)
        await server.db.call(
            lambda conn: conn.execute(
                "UPDATE acl_tokens SET expires_ns = ? WHERE account = 'dave'", (expired_at,)
            )
        )
        coordinator = agent_config(
            server.port, pki, enrollment_token=await enrollment_token(server, "acme")
        )
        link, identity = make_link(coordinator, tmp_path / "agent")
        task = asyncio.create_task(link.run(stop))
        await asyncio.wait_for(link.wait_connected(), 10)
        world = World(server, pki.ca_file.read_bytes(), tokens, identity.node_id, "")
        async with world.channel() as ch:
            meta = (("authorization", f"Bearer {tokens['admin']}"),)
            await ledger_pb2_grpc.LedgerStub(ch).Deposit(
                ledger_pb2.DepositRequest(buyer="alice", amount_micros=10_000_000), metadata=meta
            )
            lease = await leases_pb2_grpc.LeasesStub(ch).Submit(
                leases_pb2.SubmitLeaseRequest(
                    spec=leases_pb2.LeaseSpec(
                        image="busybox",
                        gpu_count=1,
                        price_micro_per_gpu_hour=1,
                        max_duration_seconds=60,
                        env={"SECRET": "s3cret"},
                        # Waits forever: nothing moves while the refusals are counted.
                        gpu_model="no-such-gpu",
                    )
                ),
                metadata=(("authorization", f"Bearer {tokens['alice']}"),),
            )
        world.lease_id = lease.lease_id
        await server.dispatcher.place_pending()  # its "waiting: ..." reason is written now
        yield world
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        await server.stop(0)


# One representative request per guarded method; w is the World (ids known at run time).
Call = tuple[str, Any, str, Callable[[World], Any]]
CALLS: list[Call] = [
    ("/gpuagent.v1.Leases/Submit", leases_pb2_grpc.LeasesStub, "Submit",
     lambda w: leases_pb2.SubmitLeaseRequest(spec=leases_pb2.LeaseSpec(image="x", gpu_count=1))),
    ("/gpuagent.v1.Leases/Quote", leases_pb2_grpc.LeasesStub, "Quote",
     lambda w: leases_pb2.SubmitLeaseRequest(spec=leases_pb2.LeaseSpec(image="x", gpu_count=1))),
    ("/gpuagent.v1.Market/Offers", market_pb2_grpc.MarketStub, "Offers",
     lambda w: market_pb2.OffersRequest(nodes=True)),
    ("/gpuagent.v1.Leases/Get", leases_pb2_grpc.LeasesStub, "Get",
     lambda w: leases_pb2.GetLeaseRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.Leases/List", leases_pb2_grpc.LeasesStub, "List",
     lambda w: leases_pb2.ListLeasesRequest()),
    ("/gpuagent.v1.Leases/Cancel", leases_pb2_grpc.LeasesStub, "Cancel",
     lambda w: leases_pb2.CancelLeaseRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.Leases/Logs", leases_pb2_grpc.LeasesStub, "Logs",
     lambda w: leases_pb2.LeaseLogsRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.Leases/RotateEndpointToken", leases_pb2_grpc.LeasesStub,
     "RotateEndpointToken", lambda w: leases_pb2.RotateEndpointTokenRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.Leases/OutputTicket", leases_pb2_grpc.LeasesStub,
     "OutputTicket", lambda w: leases_pb2.OutputTicketRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.Leases/ReportOutputMismatch", leases_pb2_grpc.LeasesStub,
     "ReportOutputMismatch",
     lambda w: leases_pb2.OutputMismatchReport(lease_id=w.lease_id, fetched_digest=b"x" * 32)),
    ("/gpuagent.v1.RelayDirectory/Route", relay_pb2_grpc.RelayDirectoryStub, "Route",
     lambda w: relay_pb2.RouteRequest(lease_id=w.lease_id)),
    ("/gpuagent.v1.RelayDirectory/OutputRoute", relay_pb2_grpc.RelayDirectoryStub, "OutputRoute",
     lambda w: relay_pb2.OutputRouteRequest(lease_id=w.lease_id, ticket="gso_x")),
    ("/gpuagent.v1.Nodes/List", nodes_pb2_grpc.NodesStub, "List",
     lambda w: nodes_pb2.ListNodesRequest()),
    ("/gpuagent.v1.Nodes/Get", nodes_pb2_grpc.NodesStub, "Get",
     lambda w: nodes_pb2.GetNodeRequest(node_id=w.node_id)),
    ("/gpuagent.v1.Nodes/Drain", nodes_pb2_grpc.NodesStub, "Drain",
     lambda w: nodes_pb2.DrainNodeRequest(node_id=w.node_id, enabled=True, deadline_unix_nanos=1)),
    ("/gpuagent.v1.Nodes/Attest", nodes_pb2_grpc.NodesStub, "Attest",
     lambda w: nodes_pb2.AttestNodeRequest(node_id=w.node_id)),
    ("/gpuagent.v1.Ledger/Deposit", ledger_pb2_grpc.LedgerStub, "Deposit",
     lambda w: ledger_pb2.DepositRequest(buyer="alice", amount_micros=10**12)),
    ("/gpuagent.v1.Ledger/Stake", ledger_pb2_grpc.LedgerStub, "Stake",
     lambda w: ledger_pb2.StakeRequest(node_id=w.node_id, amount_micros=1)),
    ("/gpuagent.v1.Ledger/Balance", ledger_pb2_grpc.LedgerStub, "Balance",
     lambda w: ledger_pb2.BalanceRequest()),
    ("/gpuagent.v1.Ledger/Usage", ledger_pb2_grpc.LedgerStub, "Usage",
     lambda w: ledger_pb2.UsageRequest()),
    ("/gpuagent.v1.Acl/WhoAmI", acl_pb2_grpc.AclStub, "WhoAmI",
     lambda w: acl_pb2.WhoAmIRequest()),
    ("/gpuagent.v1.Acl/CreateAccount", acl_pb2_grpc.AclStub, "CreateAccount",
     lambda w: acl_pb2.CreateAccountRequest(name="mallory", role=acl_pb2.ROLE_ADMIN)),
    ("/gpuagent.v1.Acl/ListAccounts", acl_pb2_grpc.AclStub, "ListAccounts",
     lambda w: acl_pb2.ListAccountsRequest()),
    ("/gpuagent.v1.Acl/CreateToken", acl_pb2_grpc.AclStub, "CreateToken",
     lambda w: acl_pb2.CreateTokenRequest(account="admin")),
    ("/gpuagent.v1.Acl/ListTokens", acl_pb2_grpc.AclStub, "ListTokens",
     lambda w: acl_pb2.ListTokensRequest(account="admin")),
    ("/gpuagent.v1.Acl/RevokeToken", acl_pb2_grpc.AclStub, "RevokeToken",
     lambda w: acl_pb2.RevokeTokenRequest(token_id="000000000000")),
    ("/gpuagent.v1.Acl/CreateEnrollmentToken", acl_pb2_grpc.AclStub, "CreateEnrollmentToken",
     lambda w: acl_pb2.CreateEnrollmentTokenRequest(account="acme")),
    ("/gpuagent.v1.Acl/Audit", acl_pb2_grpc.AclStub, "Audit",
     lambda w: acl_pb2.AuditRequest()),
]  # fmt: skip


def test_every_served_method_has_a_rule_and_a_refusal_case() -> None:
    """A new RPC cannot ship unguarded: the server refuses to start without a rule for
    it, and this suite fails until the RPC has a case above."""
    guarded = {m for m in served_methods() if not policy.RULES[m].public}
    assert guarded == {c[0] for c in CALLS}
    assert set(policy.RULES) >= set(served_methods())


async def _call(w: World, token: str | None, call: Call, header: str | None = None) -> Code:
    _, stub_class, method, build = call
    metadata: tuple[tuple[str, str], ...] = ()
    if header is not None:
        metadata = (("authorization", header),)
    elif token is not None:
        metadata = (("authorization", f"Bearer {token}"),)
    async with w.channel() as ch:
        try:
            await getattr(stub_class(ch), method)(build(w), metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return Code.OK


@pytest.mark.asyncio
async def test_no_bad_revoked_or_expired_token_is_unauthenticated_everywhere(world: World) -> None:
    """Every guarded method, without a token and with a malformed, unknown, revoked,
    expired or enrolment token, or a non-Bearer header: UNAUTHENTICATED, nothing written."""
    enrolment = await enrollment_token(world.server, "acme")
    before = world.snapshot()
    unknown = "gst_0123456789ab_" + "A" * 43
    cases: list[tuple[str | None, str | None]] = [
        (None, None),
        ("not-a-token", None),
        (unknown, None),
        (world.tokens["revoked"], None),
        (world.tokens["expired"], None),
        (enrolment, None),
        (None, f"Basic {world.tokens['admin']}"),
        (None, "Bearer "),
        ("x" * 5000, None),
    ]
    for call in CALLS:
        for token, header in cases:
            code = await _call(world, token, call, header)
            assert code == Code.UNAUTHENTICATED, (call[0], token and token[:12], header, code)
    assert world.snapshot() == before


ADMIN_ONLY = {
    "/gpuagent.v1.Ledger/Deposit",
    "/gpuagent.v1.Ledger/Stake",
    "/gpuagent.v1.Acl/CreateAccount",
    "/gpuagent.v1.Acl/ListAccounts",
    "/gpuagent.v1.Acl/Audit",
    "/gpuagent.v1.RelayDirectory/Route",
    "/gpuagent.v1.RelayDirectory/OutputRoute",
}


@pytest.mark.asyncio
async def test_a_buyer_token_is_refused_on_admin_and_provider_methods(world: World) -> None:
    """Crediting, staking, accounts and the audit log are admin's; draining, attesting
    and enrolment tokens the provider's: a buyer gets PERMISSION_DENIED and changes
    nothing. A provider cannot submit, cancel or read logs."""
    before = world.snapshot()
    by_path = {c[0]: c for c in CALLS}
    for path in (*ADMIN_ONLY, "/gpuagent.v1.Nodes/Drain", "/gpuagent.v1.Nodes/Attest",
                 "/gpuagent.v1.Acl/CreateEnrollmentToken"):  # fmt: skip
        assert await _call(world, world.tokens["bob"], by_path[path]) == Code.PERMISSION_DENIED, (
            path
        )
    for path in (*ADMIN_ONLY, "/gpuagent.v1.Leases/Submit", "/gpuagent.v1.Leases/Cancel",
                 "/gpuagent.v1.Leases/Logs", "/gpuagent.v1.Ledger/Balance",
                 "/gpuagent.v1.Leases/Quote",
                 "/gpuagent.v1.Leases/RotateEndpointToken",
                 "/gpuagent.v1.Leases/OutputTicket",
                 "/gpuagent.v1.Leases/ReportOutputMismatch"):  # fmt: skip
        assert await _call(world, world.tokens["acme"], by_path[path]) == Code.PERMISSION_DENIED, (
            path
        )
    assert world.snapshot() == before


@pytest.mark.asyncio
async def test_another_buyers_lease_answers_not_found_and_is_untouched(world: World) -> None:
    """bob cannot see, cancel, read the logs or usage of alice's lease: each answers
    NOT_FOUND exactly as a lease that does not exist, so ids cannot be probed; bob
    cannot bill alice, read her balance or her tokens, nor mint tokens for her."""
    before = world.snapshot()
    bob = world.tokens["bob"]
    async with world.channel() as ch:
        meta = (("authorization", f"Bearer {bob}"),)
        leases = leases_pb2_grpc.LeasesStub(ch)
        ledger = ledger_pb2_grpc.LedgerStub(ch)
        acl = acl_pb2_grpc.AclStub(ch)
        probe: list[str] = []
        for lease_id in (world.lease_id, "no-such-lease"):
            details = []
            for method, request in (
                (leases.Get, leases_pb2.GetLeaseRequest(lease_id=lease_id)),
                (leases.Cancel, leases_pb2.CancelLeaseRequest(lease_id=lease_id)),
                (leases.Logs, leases_pb2.LeaseLogsRequest(lease_id=lease_id)),
                (
                    leases.RotateEndpointToken,
                    leases_pb2.RotateEndpointTokenRequest(lease_id=lease_id),
                ),
                (leases.OutputTicket, leases_pb2.OutputTicketRequest(lease_id=lease_id)),
                (
                    leases.ReportOutputMismatch,
                    leases_pb2.OutputMismatchReport(lease_id=lease_id, fetched_digest=b"x" * 32),
                ),
                (ledger.Usage, ledger_pb2.UsageRequest(lease_id=lease_id)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(request, metadata=meta, timeout=5)
                assert err.value.code() == Code.NOT_FOUND
                details.append(err.value.details().replace(lease_id, "ID"))
            if lease_id != world.lease_id:
                assert details == probe, "a missing lease must read like someone else's"
            probe = details
        listed = await leases.List(leases_pb2.ListLeasesRequest(), metadata=meta, timeout=5)
        assert [x.lease_id for x in listed.leases] == []
        for method, request in (
            (leases.List, leases_pb2.ListLeasesRequest(buyer="alice")),
            (leases.Submit, leases_pb2.SubmitLeaseRequest(
                spec=leases_pb2.LeaseSpec(image="busybox", gpu_count=1), buyer="alice")),
            (leases.Quote, leases_pb2.SubmitLeaseRequest(
                spec=leases_pb2.LeaseSpec(image="busybox", gpu_count=1), buyer="alice")),
            (ledger.Balance, ledger_pb2.BalanceRequest(buyer="alice")),
            (acl.CreateToken, acl_pb2.CreateTokenRequest(account="alice")),
            (acl.ListTokens, acl_pb2.ListTokensRequest(account="alice")),
        ):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(request, metadata=meta, timeout=5)
            assert err.value.code() == Code.PERMISSION_DENIED, request
        alice_token = acl_store.list_tokens  # a token id bob might have seen in a log
        ids = await world.server.db.call(lambda c: [t.token_id for t in alice_token(c, "alice")])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await acl.RevokeToken(acl_pb2.RevokeTokenRequest(token_id=ids[0]), metadata=meta)
        assert err.value.code() == Code.NOT_FOUND
        own = await ledger.Balance(ledger_pb2.BalanceRequest(), metadata=meta, timeout=5)
        assert [a.buyer for a in own.accounts] == ["bob"]
    assert world.snapshot() == before


@pytest.mark.asyncio
async def test_another_providers_node_cannot_be_drained_or_attested(world: World) -> None:
    """Only the node's provider (acme) or admin acts on it: another provider gets
    PERMISSION_DENIED and the node stays undrained; acme's own drain works and is audited."""
    before = world.snapshot()
    by_path = {c[0]: c for c in CALLS}
    for path in ("/gpuagent.v1.Nodes/Drain", "/gpuagent.v1.Nodes/Attest"):
        assert await _call(world, world.tokens["other"], by_path[path]) == Code.PERMISSION_DENIED
    assert world.snapshot() == before
    async with world.channel() as ch:
        meta = (("authorization", f"Bearer {world.tokens['acme']}"),)
        node = await nodes_pb2_grpc.NodesStub(ch).Drain(
            nodes_pb2.DrainNodeRequest(node_id=world.node_id, enabled=True), metadata=meta
        )
    assert node.draining
    entries = await world.server.db.call(lambda c: acl_store.audit_entries(c, 10, "acme"))
    assert [(e.action, e.target) for e in entries] == [
        ("node.drain", world.node_id),
        ("node.enroll", world.node_id),
    ]


@pytest.mark.asyncio
async def test_buyers_see_the_market_view_and_providers_their_own_detail(world: World) -> None:
    """A buyer's node view has GPUs, uptime and attestation but no peer address,
    hostname, serials or running leases; the owning provider sees everything; another
    provider sees the market view; a provider sees its nodes' leases without env."""
    async with world.channel() as ch:
        stub = nodes_pb2_grpc.NodesStub(ch)

        async def view(who: str) -> nodes_pb2.Node:
            meta = (("authorization", f"Bearer {world.tokens[who]}"),)
            listed = await stub.List(nodes_pb2.ListNodesRequest(), metadata=meta, timeout=5)
            return listed.nodes[0]

        await until(lambda: bool(world.server.registry.nodes), what="node registered")
        buyer, owner, other = await view("bob"), await view("acme"), await view("other")
        for market in (buyer, other):
            assert market.market_view and not market.peer and not market.leases
            assert not market.inventory.host.hostname
            assert all(not g.serial and not g.pci_bus_id for g in market.inventory.gpus)
            assert len(market.inventory.gpus) == 2 and market.uptime.ratio_1h > 0
        assert not owner.market_view and owner.peer and owner.inventory.host.hostname
        assert owner.owner == "acme" and owner.registration == "enrolled"
        meta = (("authorization", f"Bearer {world.tokens['acme']}"),)
        leases = await leases_pb2_grpc.LeasesStub(ch).List(
            leases_pb2.ListLeasesRequest(), metadata=meta, timeout=5
        )
        # alice's lease waits (no node has its GPU model): not on acme's node, not shown.
        assert list(leases.leases) == []
        admin = (("authorization", f"Bearer {world.tokens['admin']}"),)
        everything = await leases_pb2_grpc.LeasesStub(ch).List(
            leases_pb2.ListLeasesRequest(), metadata=admin, timeout=5
        )
        assert [x.spec.env["SECRET"] for x in everything.leases] == ["s3cret"]


@pytest.mark.asyncio
async def test_out_of_range_and_oversized_acl_and_ledger_values_are_refused(world: World) -> None:
    """Even an admin's malformed requests are refused with a message naming the field,
    and nothing is written: bad or huge account names, unknown roles and accounts,
    ttls past ten years or at the uint64 limit, long descriptions and ids, an
    enrolment token for a buyer, a huge buyer name in a deposit. Audit's limit is
    clamped, not trusted."""
    before = world.snapshot()
    meta = (("authorization", f"Bearer {world.tokens['admin']}"),)
    async with world.channel() as ch:
        acl = acl_pb2_grpc.AclStub(ch)
        ledger = ledger_pb2_grpc.LedgerStub(ch)
        account, token, enroll = (
            acl_pb2.CreateAccountRequest,
            acl_pb2.CreateTokenRequest,
            (acl_pb2.CreateEnrollmentTokenRequest),
        )
        bad: list[tuple[Any, Any, str]] = [
            (acl.CreateAccount, account(name="Bad Name", role=2), "account name"),
            (acl.CreateAccount, account(name="a" * 5000, role=2), "name"),
            (acl.CreateAccount, account(name="fine", role=0), "role"),
            (acl.CreateAccount, account(name="alice", role=2), "exists"),
            (acl.CreateToken, token(account="nobody"), "does not exist"),
            (acl.CreateToken, token(account="alice", ttl_seconds=2**64 - 1), "ttl"),
            (acl.CreateToken, token(account="alice", ttl_seconds=10**9), "ttl"),
            (acl.CreateToken, token(account="alice", description="d" * 300), "description"),
            (acl.CreateEnrollmentToken, enroll(account="alice"), "provider"),
            (ledger.Deposit, ledger_pb2.DepositRequest(buyer="b" * 5000, amount_micros=1), "buyer"),
            (ledger.Deposit, ledger_pb2.DepositRequest(buyer="alice", amount_micros=-1), "amount"),
        ]  # fmt: skip
        for method, request, named in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(request, metadata=meta, timeout=5)
            assert err.value.code() == Code.INVALID_ARGUMENT, (request, err.value.details())
            assert named in err.value.details(), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await acl.RevokeToken(acl_pb2.RevokeTokenRequest(token_id="x" * 5000), metadata=meta)
        assert err.value.code() == Code.NOT_FOUND and len(err.value.details()) < 100
        entries = await acl.Audit(acl_pb2.AuditRequest(limit=2**32 - 1), metadata=meta, timeout=5)
        assert 0 < len(entries.entries) <= 1000
    assert world.snapshot() == before
