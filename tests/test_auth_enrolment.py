"""Node enrolment: with ``registration: token`` a node joins only with an enrolment
token of a provider account, is bound to it for good, and its name is unique there;
``registration: open`` admits any key, unbound. Real scheduler, real links, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.link import CoordinatorLink
from scheduler.auth import store as acl_store
from scheduler.server import SchedulerServer
from tests.coordinator_harness import (
    Pki,
    admin_token,
    agent_config,
    enrollment_token,
    make_link,
    make_pki,
    scheduler_config,
    start_server,
    until,
)


@contextlib.asynccontextmanager
async def scheduler(
    tmp_path: Path, registration: str
) -> AsyncIterator[tuple[SchedulerServer, Pki]]:
    pki = make_pki(tmp_path / "pki")
    server = await start_server(scheduler_config(tmp_path, pki, registration=registration))
    try:
        yield server, pki
    finally:
        await server.stop(0)


async def connect(
    server: SchedulerServer, pki: Pki, state: Path, name: str = "test-node", **coordinator: object
) -> tuple[CoordinatorLink, str | None]:
    """Run a link until it is welcomed or refused; (link, refusal text or None)."""
    link, _ = make_link(agent_config(server.port, pki, **coordinator), state)
    link.node_name = name
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    welcomed = asyncio.create_task(link.wait_connected())
    refused = asyncio.create_task(until(lambda: link.last_error is not None, 10, "a refusal"))
    done, _ = await asyncio.wait({welcomed, refused}, timeout=10, return_when="FIRST_COMPLETED")
    refusal = None if welcomed in done else link.last_error
    stop.set()
    for pending in (welcomed, refused):
        pending.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 5)
    assert done, "neither welcomed nor refused within 10 s"
    return link, refusal


@pytest.mark.asyncio
async def test_a_node_without_an_enrolment_token_is_refused(tmp_path: Path) -> None:
    """The default: no token, a malformed one, an API token, a revoked or expired
    enrolment token: refused with the reason, and the node is never registered."""
    async with scheduler(tmp_path, "token") as (server, pki):
        api = await admin_token(server)
        revoked = await enrollment_token(server, "acme")
        await server.db.call(
            lambda c: acl_store.revoke(
                c, acl_store.list_tokens(c, "acme")[0].token_id, time.time_ns()
            )
        )
        expired = await enrollment_token(server, "acme")
        await server.db.call(
            lambda c: c.execute(
                "UPDATE acl_tokens SET expires_ns = 1 WHERE kind = 'enrollment' AND revoked_ns = 0"
            )
        )
        for n, token in enumerate((None, "gse_nonsense", revoked, expired)):
            kw = {} if token is None else {"enrollment_token_file": _write(tmp_path, n, token)}
            _, refusal = await connect(server, pki, tmp_path / "agent", **kw)
            assert refusal is not None and "REJECTED" in refusal, refusal
        with pytest.raises(ValueError, match="not an enrolment token"):
            agent_config(server.port, pki, enrollment_token=api)
        assert server.registry.nodes == {}


def _write(tmp_path: Path, n: int, token: str) -> str:
    path = tmp_path / f"enroll-{n}"
    path.write_text(token + "\n")
    return str(path)


@pytest.mark.asyncio
async def test_an_enrolled_node_is_bound_and_rejoins_without_its_token(tmp_path: Path) -> None:
    """A valid token binds the node to its provider; the node reconnects later with no
    token at all (its key proves it), and a token of another provider does not move it."""
    async with scheduler(tmp_path, "token") as (server, pki):
        token = await enrollment_token(server, "acme")
        link, refusal = await connect(server, pki, tmp_path / "a", enrollment_token=token)
        assert refusal is None
        node_id = link.identity.node_id
        assert server.registry.nodes[node_id].owner == "acme"
        _, refusal = await connect(server, pki, tmp_path / "a")
        assert refusal is None
        other = await enrollment_token(server, "globex")
        _, refusal = await connect(server, pki, tmp_path / "a", enrollment_token=other)
        assert refusal is None and server.registry.nodes[node_id].owner == "acme"
    async with scheduler(tmp_path, "token") as (server, pki):  # restart: the binding persists
        assert server.registry.nodes[node_id].owner == "acme"


@pytest.mark.asyncio
async def test_node_names_are_unique_per_provider_account(tmp_path: Path) -> None:
    """A second node of acme named like the first is refused, naming the clash; the same
    name under another provider is fine."""
    async with scheduler(tmp_path, "token") as (server, pki):
        acme = await enrollment_token(server, "acme")
        _, refusal = await connect(server, pki, tmp_path / "a", "gpu-1", enrollment_token=acme)
        assert refusal is None
        _, refusal = await connect(server, pki, tmp_path / "b", "gpu-1", enrollment_token=acme)
        assert refusal is not None and "already used by node" in refusal
        globex = await enrollment_token(server, "globex")
        _, refusal = await connect(server, pki, tmp_path / "c", "gpu-1", enrollment_token=globex)
        assert refusal is None
        assert sorted(r.owner for r in server.registry.nodes.values()) == ["acme", "globex"]


@pytest.mark.asyncio
async def test_open_registration_admits_any_key_unbound(tmp_path: Path) -> None:
    """registration: open (permissionless networks): a node joins without a token, owned
    by nobody, and is shown as such."""
    async with scheduler(tmp_path, "open") as (server, pki):
        link, refusal = await connect(server, pki, tmp_path / "a")
        assert refusal is None
        record = server.registry.nodes[link.identity.node_id]
        assert record.owner == ""
        assert server.registry.to_proto(record).registration == "open"


@pytest.mark.asyncio
async def test_enrolment_is_audited(tmp_path: Path) -> None:
    """Binding a node is written to the audit log under its provider account."""
    async with scheduler(tmp_path, "token") as (server, pki):
        token = await enrollment_token(server, "acme")
        link, refusal = await connect(server, pki, tmp_path / "a", "gpu-7", enrollment_token=token)
        assert refusal is None
        entries = await server.db.call(lambda c: acl_store.audit_entries(c, 10, "acme"))
        assert [(e.action, e.target, e.detail) for e in entries] == [
            ("node.enroll", link.identity.node_id, "name=gpu-7")
        ]
