"""Breakages a hostile caller found, each pinned by a regression test against the real
scheduler (the first three broke it for every user, and outlived the request)."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import grpc
import pytest

from agent.leases.spec import LeaseRejected, parse_spec
from gpuagent import leaserules
from gpuagent.logsetup import setup_logging
from gpuagent.v1 import common_pb2, leases_pb2, ledger_pb2
from scheduler.cli import main
from tests.coordinator_harness import until
from tests.test_scheduler_leases import accept, make_env
from tests.test_usage_ingest import Env as LedgerEnv
from tests.test_usage_ingest import make_env as make_ledger_env

S = common_pb2.LeaseState
Code = grpc.StatusCode


@pytest.mark.asyncio
async def test_a_deposit_near_int64_is_refused_and_balances_stay_integers(tmp_path: Path) -> None:
    """Two deposits near 2^63 once turned the balance into a float and broke `balance`
    for everyone: each deposit is bounded and so is an account's total."""
    async for env in make_ledger_env(tmp_path):
        await _deposit_ok(env, "alice", 10**15)
        for amount in (2**63 - 1, 10**15 + 1):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await env.ledger.Deposit(
                    ledger_pb2.DepositRequest(buyer="alice", amount_micros=amount), timeout=5
                )
            assert err.value.code() == Code.INVALID_ARGUMENT and "amount" in err.value.details()
        for _ in range(4):  # each within bounds, the running total is capped too
            try:
                await _deposit_ok(env, "alice", 10**15)
            except grpc.aio.AioRpcError as exc:
                assert "would pass" in exc.details()
        everyone = await env.ledger.Balance(ledger_pb2.BalanceRequest(), timeout=5)
        assert all(isinstance(a.balance_micros, int) for a in everyone.accounts)
        assert sum(a.deposited_micros for a in everyone.accounts) <= 2**62


async def _deposit_ok(env: LedgerEnv, buyer: str, micros: int) -> None:
    await env.ledger.Deposit(
        ledger_pb2.DepositRequest(buyer=buyer, amount_micros=micros), timeout=5
    )


@pytest.mark.asyncio
async def test_uint64_fields_past_their_bounds_are_invalid_argument_naming_the_field(
    tmp_path: Path,
) -> None:
    """2^63 and above in Submit's u64 fields raised OverflowError inside the server:
    now INVALID_ARGUMENT naming the field, and nothing is stored."""
    async with make_env(tmp_path) as env:
        for field_name in leaserules.UINT64_FIELDS:
            for value in (2**63, 2**64 - 1):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await env.submit(**{field_name: value})
                assert err.value.code() == Code.INVALID_ARGUMENT
                assert f"spec.{field_name}" in err.value.details()
        listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
        assert list(listed.leases) == []


@pytest.mark.asyncio
async def test_a_megabyte_command_is_refused_at_submit_and_by_the_agent(tmp_path: Path) -> None:
    """A command of megabytes made Docker's error oversize the agent's update and
    wedged the lease: the scheduler refuses it at submit (naming command/args) and the
    agent's own spec check refuses it too."""
    async with make_env(tmp_path) as env:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.submit(command=["sh", "-c", "x" * 4000] + ["y" * 4000] * 200)
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "spec.command/args" in err.value.details()
    with pytest.raises(LeaseRejected, match="command and args"):
        parse_spec({"image": "busybox", "gpu_count": 1, "args": ["y" * 4000] * 20})


@pytest.mark.asyncio
async def test_an_oversized_lease_update_is_clipped_or_ends_the_lease_never_wedges(
    tmp_path: Path,
) -> None:
    """An update with a huge reason is stored clipped and acked; one that cannot be
    clipped into bounds (thousands of GPU ids) ends the lease failed with the reason,
    is acked, and the GPU is free again; List and cancel keep working."""
    async with make_env(tmp_path) as env:
        agent = await env.agent("a", accept)
        lease = await env.submit()
        await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
        seq = await agent.update(lease.lease_id, S.LEASE_STATE_STARTING, reason="e" * 1_000_000)
        await until(lambda: (lease.lease_id, seq) in agent.acks, what="ack of the clipped update")
        got = await env.get(lease.lease_id)
        assert got.state == S.LEASE_STATE_STARTING and len(got.reason) <= 4096
        seq = await agent.update(
            lease.lease_id, S.LEASE_STATE_RUNNING, gpu_uuids=[f"GPU-{n}" for n in range(5000)]
        )
        await until(lambda: (lease.lease_id, seq) in agent.acks, what="ack of the bad update")
        ended = await env.get(lease.lease_id)
        assert ended.state == S.LEASE_STATE_FAILED
        assert "could not store the agent's update" in ended.reason
        listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
        assert [x.lease_id for x in listed.leases] == [lease.lease_id]


@pytest.mark.asyncio
async def test_list_pages_by_size_so_big_specs_never_outgrow_the_message_limit(
    tmp_path: Path,
) -> None:
    """Leases with big (allowed) environments: List answers pages under the 4 MiB limit
    and the pages together hold every lease exactly once."""
    async with make_env(tmp_path) as env:
        env_vars = {f"V{n}": "v" * 3000 for n in range(80)}  # ~240 KB per lease
        submitted = {(await env.submit(env=env_vars, gpu_model="none")).lease_id for _ in range(24)}
        seen: list[str] = []
        token = ""
        while True:
            page = await env.stub.List(
                leases_pb2.ListLeasesRequest(page_size=1000, page_token=token), timeout=5
            )
            assert page.ByteSize() < 4 * 1024 * 1024
            seen += [x.lease_id for x in page.leases]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(submitted)


@pytest.mark.asyncio
async def test_an_image_with_a_newline_is_refused_and_logs_escape_control_characters(
    tmp_path: Path,
) -> None:
    """A newline in an image name wrote a forged line into the text log: such an image
    is refused at submit, and the text log escapes control characters in every value."""
    async with make_env(tmp_path) as env:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.submit(image="busybox\n12:00:00 INFO    scheduler: deposit ok")
        assert (
            err.value.code() == Code.INVALID_ARGUMENT and "control character" in err.value.details()
        )
    out = io.StringIO()
    setup_logging("info", "text", out)
    try:
        logging.getLogger("t").info("pulling %s", "a\nFAKE", extra={"image": "b\r\nFAKE\x1b[2J"})
    finally:
        setup_logging("info", "text")
    assert out.getvalue().count("\n") == 1
    assert "a\\nFAKE" in out.getvalue() and "\\x1b" in out.getvalue()


@pytest.mark.asyncio
async def test_a_lease_every_node_rejected_ends_rejected_and_releases_escrow(
    tmp_path: Path,
) -> None:
    """It stayed pending ("already tried") forever and kept its escrow: now it ends
    rejected with the last node's reason, and the buyer's money is back."""
    async for env in make_ledger_env(tmp_path):
        await _deposit_ok(env, "alice", 10_000_000)
        # Two nodes, both refuse the image.
        for name in ("a", "b"):
            agent = await env.agent(name)

            async def refuse(assign: leases_pb2.LeaseAssign, agent: object = agent) -> None:
                await agent.update(  # type: ignore[attr-defined]
                    assign.lease_id, S.LEASE_STATE_REJECTED, reason="image not allowed here"
                )

            agent.link.on("lease_assign", refuse)
        spec = leases_pb2.LeaseSpec(
            image="busybox",
            gpu_count=1,
            price_micro_per_gpu_hour=1_000_000,
            max_duration_seconds=60,
        )
        lease = await env.leases.Submit(
            leases_pb2.SubmitLeaseRequest(spec=spec, buyer="alice"), timeout=5
        )
        get = leases_pb2.GetLeaseRequest(lease_id=lease.lease_id)
        last: list[leases_pb2.Lease] = []

        async def ended(
            env: LedgerEnv = env,
            get: leases_pb2.GetLeaseRequest = get,
            last: list[leases_pb2.Lease] = last,
        ) -> bool:
            await env.server.dispatcher.place_pending()
            last[:] = [await env.leases.Get(get, timeout=5)]
            return last[0].state == S.LEASE_STATE_REJECTED

        for _ in range(200):
            if await ended():
                break
            await asyncio.sleep(0.02)
        got = last[0]
        assert got.state == S.LEASE_STATE_REJECTED, got.reason
        assert "rejected by every node it could go to" in got.reason
        assert "image not allowed here" in got.reason
        balance = await env.ledger.Balance(ledger_pb2.BalanceRequest(buyer="alice"), timeout=5)
        assert balance.accounts[0].escrow_micros == 0
        assert balance.accounts[0].balance_micros == 10_000_000


@pytest.mark.asyncio
async def test_nodes_show_prints_lease_states_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nodes show` printed a lease's state as a number (state=4): now its name."""
    async with make_env(tmp_path) as env:
        agent = await env.agent("a", accept)
        lease = await env.submit()
        await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
        agent.leases[lease.lease_id] = S.LEASE_STATE_RUNNING
        await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING)
        record = env.server.registry.nodes[agent.node_id]

        def listed() -> bool:
            beat = record.last_heartbeat
            return beat is not None and any(x.lease_id == lease.lease_id for x in beat.leases)

        await until(listed, what="a heartbeat listing the lease")
        argv = ["nodes", "show", agent.node_id, "--address", f"127.0.0.1:{env.server.port}",
                "--insecure", "--token", env.token]  # fmt: skip
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr().out
        assert code == 0
        assert f"lease:       {lease.lease_id} state=running" in out


@pytest.mark.asyncio
async def test_registry_credentials_are_sealed_at_rest_and_reach_only_the_node(
    tmp_path: Path,
) -> None:
    """A buyer's registry password is not in the database file in any form a reader can
    use; the LeaseAssign to the placed node carries it; Get never returns it; the state
    files are 0600 in a 0700 directory."""
    async with make_env(tmp_path) as env:
        agent = await env.agent("a", accept)
        lease = await env.submit(
            registry_auth=leases_pb2.RegistryAuth(
                username="bob", password="hunter2-registry-pass", server="registry.example"
            )
        )
        await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
        assert agent.assigns[0].spec.registry_auth.password == "hunter2-registry-pass"
        got = await env.get(lease.lease_id)
        assert not got.spec.HasField("registry_auth")
        db = env.server.config.database.path
        stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert b"hunter2-registry-pass" not in stored
        key = db.parent / "secrets.key"
        for path in (db, key):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert db.parent.stat().st_mode & 0o777 == 0o700
