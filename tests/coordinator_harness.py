"""A real scheduler on a loopback port with real TLS, and agent links to it.

Shared by the link and scheduler tests: certificates come from trustme, the
server is the real ``SchedulerServer`` (its clock injectable), the agent side is
the real ``CoordinatorLink`` with a deterministic backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trustme

from agent.config import CoordinatorConfig
from agent.identity import NodeIdentity, load_or_create
from agent.link import Backoff, CoordinatorLink
from benchmarks.node_fixtures import StaticReporter, build_inventory, simulated_gpus
from gpuagent.v1 import coordinator_pb2
from scheduler.auth import store as acl_store
from scheduler.config import SchedulerConfig
from scheduler.server import SchedulerServer
from scheduler.storage import PgConn, register_pg_types


async def drop_messages(message: coordinator_pb2.CoordinatorMessage) -> None:
    """A session sender for registry-level tests: nothing is listening."""
    return None


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(tmp: Path, *, expired: bool = False) -> Pki:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        cert = ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    else:
        cert = ca.issue_cert("localhost", "127.0.0.1")
    tmp.mkdir(parents=True, exist_ok=True)
    pki = Pki(ca, tmp / "ca.pem", tmp / "server.pem", tmp / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    cert.private_key_pem.write_to_path(str(pki.key_file))
    cert.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(pki.cert_file), append=True)
    return pki


# Attestation is off unless a test asks for it: the simulated GPUs of make_link would
# otherwise fail it (accept_simulated is off by default) and take no leases.
NO_ATTESTATION: dict[str, object] = {"enabled": False, "required": False}


# Set by the ``storage_backend`` fixture (tests/conftest.py) while a test runs on
# PostgreSQL: every scheduler the test builds uses this database.
DATABASE_URL: str | None = None


def db_rows(config: SchedulerConfig, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of one portable query, read straight from the database ``config`` names
    (SQLite file or PostgreSQL), outside the server: what is really stored."""
    target = config.database.target()
    if target.dialect == "postgresql":
        import psycopg

        with psycopg.connect(target.conninfo, autocommit=True) as raw:
            register_pg_types(raw)
            return [tuple(r) for r in PgConn(raw).execute(sql, params).fetchall()]
    assert target.path is not None
    with contextlib.closing(sqlite3.connect(target.path)) as conn:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]


def scheduler_config(
    tmp: Path,
    pki: Pki | None,
    *,
    port: int = 0,
    heartbeat: float = 0.2,
    attestation: dict[str, object] | None = None,
    registration: str = "open",
    **liveness: float,
) -> SchedulerConfig:
    server: dict[str, object] = {"listen": f"127.0.0.1:{port}"}
    if pki is None:
        server["insecure"] = True
    else:
        server.update(cert_file=str(pki.cert_file), key_file=str(pki.key_file))
    return SchedulerConfig.model_validate(
        {
            "server": server,
            "database": {
                "path": str(tmp / "sched" / "scheduler.db"),
                **({"url": DATABASE_URL} if DATABASE_URL else {}),
            },
            "liveness": {"heartbeat_interval": heartbeat, **liveness},
            "metrics": {"listen": None},
            # A relay on a free port (plain HTTP: loopback only), as `serve` runs one.
            "relay": {"listen": "127.0.0.1:0", "insecure_http": True},
            "attestation": NO_ATTESTATION if attestation is None else attestation,
            # Link and placement tests run anonymous test agents; the enrolment tests
            # (tests/test_auth_*.py) ask for "token", the production default.
            "auth": {"registration": registration},
        }
    )


def agent_config(port: int, pki: Pki | None, **overrides: object) -> CoordinatorConfig:
    data: dict[str, object] = {
        "address": f"localhost:{port}",
        "call_timeout": 2.0,
        "reconnect_initial": 0.1,
        "reconnect_max": 0.5,
    }
    if pki is None:
        data["insecure"] = True
    else:
        data["ca_file"] = str(pki.ca_file)
    data.update(overrides)
    return CoordinatorConfig.model_validate(data)


def make_link(
    config: CoordinatorConfig, state_dir: Path, *, gpus: int = 2
) -> tuple[CoordinatorLink, NodeIdentity]:
    identity = load_or_create(state_dir)
    reporter = StaticReporter(build_inventory(simulated_gpus("rtx-4090", gpus, identity.node_id)))
    # No jitter: the reconnect schedule is exactly initial * 1.6^n, capped.
    backoff = Backoff(config.reconnect_initial, config.reconnect_max, uniform=lambda a, b: 0.0)
    link = CoordinatorLink(config, identity, reporter, node_name="test-node", backoff=backoff)
    return link, identity


async def until(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; for state with no event to await (remote DB rows)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


class FakeClock:
    """Wall clock the test moves by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def start_server(
    config: SchedulerConfig, clock: Callable[[], float] = time.time
) -> SchedulerServer:
    server = SchedulerServer(config, clock=clock)
    await server.start()
    return server


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to every unary call of a channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        metadata = [
            *(client_call_details.metadata or ()),
            ("authorization", f"Bearer {self.token}"),
        ]
        return await continuation(client_call_details._replace(metadata=metadata), request)


async def admin_token(server: SchedulerServer) -> str:
    """``acl bootstrap`` against the server's own database: the first admin token (a
    further one for the same admin when a test restarts a server on its database)."""

    def txn(conn: Any) -> str:
        try:
            return acl_store.bootstrap(conn, time.time_ns())[1]
        except acl_store.AlreadyBootstrapped:
            return acl_store.issue(conn, acl_store.BOOTSTRAP_ACCOUNT, "api", time.time_ns())[1]

    return await server.db.call(txn)


async def account_token(server: SchedulerServer, name: str, role: str) -> str:
    """A new account with one API token (what an admin does with accounts/tokens create)."""

    def txn(conn: Any) -> str:
        now = time.time_ns()
        if acl_store.account(conn, name) is None:
            acl_store.create_account(conn, name, role, now)
        return acl_store.issue(conn, name, "api", now)[1]

    return await server.db.call(txn)


async def enrollment_token(server: SchedulerServer, provider: str) -> str:
    def txn(conn: Any) -> str:
        now = time.time_ns()
        if acl_store.account(conn, provider) is None:
            acl_store.create_account(conn, provider, "provider", now)
        return acl_store.issue(conn, provider, "enrollment", now, ttl_seconds=3600)[1]

    return await server.db.call(txn)


def authed_channel(server: SchedulerServer, token: str) -> grpc.aio.Channel:
    """A plaintext loopback channel to ``server`` that sends ``token`` on every call."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[BearerToken(token)])
