"""``Ledger`` gRPC service and the ledger's periodic duties.

The RPCs (``gpu-scheduler deposit|balance|usage|stake``) are operator actions:
in a real network deposits and stakes come from the payment layer, here they
are recorded by whoever can reach the scheduler's port, so protect it (mTLS,
``server.client_ca_file``) like the Nodes service.

``run(stop)`` releases escrow whose final usage record never came and, every
``ledger.uptime_check_interval``, slashes staked nodes whose measured uptime
since their commitment fell below it. ``attestation_failed`` is what the
attestation verifier calls when a node fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from gpuagent.usage import decode_canonical
from gpuagent.v1 import ledger_pb2, ledger_pb2_grpc

from . import ledger, uptime
from .auth import store as acl_store
from .auth.interceptor import caller
from .config import LedgerConfig
from .db import Database
from .registry import Registry
from .storage import Conn

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Context = grpc.aio.ServicerContext[Any, Any]


def policy_from_config(config: LedgerConfig) -> ledger.LedgerPolicy:
    return ledger.LedgerPolicy(
        min_collateral_micros=config.min_collateral_micros,
        slash_attestation_micros=config.slash_attestation_micros,
        slash_uptime_micros=config.slash_uptime_micros,
        slash_verify_micros=config.slash_verify_micros,
        default_credit_micros=config.default_credit_micros,
        final_record_grace_ns=round(config.final_record_grace * 1e9),
        clock_skew_allowance_ns=round(config.clock_skew_allowance * 1e9),
    )


def _account_pb(account: ledger.Account) -> ledger_pb2.Account:
    return ledger_pb2.Account(
        buyer=account.buyer,
        balance_micros=account.balance_micros,
        escrow_micros=account.escrow_micros,
        spent_micros=account.spent_micros,
        deposited_micros=account.deposited_micros,
    )


def lease_usage(conn: Conn, lease_id: str) -> ledger_pb2.LeaseUsage:
    """Totals of one lease's accepted records, and its escrow (summed in Python:
    counters are u64 and SQL SUM would overflow on a hostile node's values)."""
    usage = ledger_pb2.LeaseUsage(lease_id=lease_id, escrow_state="none")
    lease = conn.execute(
        "SELECT buyer, node_id, state, COALESCE(accepted_price_micros_per_gpu_hour,"
        " price_micros_per_gpu_hour) FROM leases WHERE lease_id = ?",
        (lease_id,),
    ).fetchone()
    if lease is not None:
        usage.buyer, usage.node_id, usage.state = lease[0], lease[1] or "", lease[2]
        usage.price_micros_per_gpu_hour = lease[3]
    escrow = conn.execute(
        "SELECT reserved_micros, settled_micros, released_micros, unbilled_micros, state,"
        " final_seen, buyer FROM escrow WHERE lease_id = ?",
        (lease_id,),
    ).fetchone()
    if escrow is not None:
        usage.reserved_micros, usage.cost_micros, usage.released_micros = escrow[:3]
        usage.unbilled_micros, usage.escrow_state, usage.final_seen = escrow[3:6]
        usage.buyer = usage.buyer or escrow[6]
    for node_id, status, body in conn.execute(
        "SELECT node_id, status, canonical FROM usage_records WHERE lease_id = ? ORDER BY start_ns",
        (lease_id,),
    ):
        if status != "accepted":
            usage.rejected_records += 1
            continue
        r = decode_canonical(bytes(body))
        usage.records += 1
        usage.node_id = node_id
        usage.duration_ns += r.duration_ns
        usage.gpu_ns += r.gpu_ns
        usage.energy_millijoules += r.energy_mj
        usage.cpu_usec += r.cpu_usec
        usage.net_rx_bytes += r.net_rx_bytes
        usage.net_tx_bytes += r.net_tx_bytes
        usage.unmeasured |= r.unmeasured
        usage.gpu_memory_peak_bytes = max(usage.gpu_memory_peak_bytes, r.peak_gpu_memory_bytes)
        if not usage.first_start_unix_nanos:
            usage.first_start_unix_nanos = r.start_unix_ns
        usage.last_end_unix_nanos = max(usage.last_end_unix_nanos, r.end_unix_ns)
    return usage


def provider(conn: Conn, node_id: str, policy: ledger.LedgerPolicy) -> ledger_pb2.Provider:
    found = ledger.collateral(conn, node_id)
    counts = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM usage_records WHERE node_id = ? GROUP BY status",
            (node_id,),
        ).fetchall()
    )
    acked = conn.execute(
        "SELECT acked_usage_seq FROM nodes WHERE node_id = ?", (node_id,)
    ).fetchone()
    return ledger_pb2.Provider(
        node_id=node_id,
        earnings_micros=ledger.earnings(conn, node_id),
        staked_micros=found.staked_micros if found else 0,
        slashed_micros=found.slashed_micros if found else 0,
        uptime_commitment_ratio=found.uptime_commitment_ratio if found else 0.0,
        eligible=ledger.collateral_ok(conn, node_id, policy),
        records=counts.get("accepted", 0),
        rejected_records=counts.get("rejected", 0),
        acked_usage_seq=acked[0] if acked else 0,
    )


class LedgerService(ledger_pb2_grpc.LedgerServicer):
    def __init__(
        self,
        db: Database,
        registry: Registry,
        config: LedgerConfig,
        clock: Clock = time.time,
    ) -> None:
        self.db = db
        self.registry = registry
        self.config = config
        self.policy = policy_from_config(config)
        self.clock = clock
        # Unslashed stake per node, mirrored from the database so placement's
        # synchronous filter (node_eligible) never waits on it.
        self._available: dict[str, int] = {}
        # Called with the node whose eligibility may have changed ("": any node).
        self._eligibility_listeners: list[Callable[[str], None]] = []

    async def load(self) -> None:
        """Read every node's collateral; call once at startup, after the database opens."""
        rows = await self.db.call(
            lambda conn: conn.execute(
                "SELECT node_id, staked_micros - slashed_micros FROM collateral"
            ).fetchall()
        )
        self._available = {node_id: int(available) for node_id, available in rows}

    def collateral_changed(self, node_id: str, found: ledger.Collateral | None) -> None:
        """After a slash made elsewhere (scheduler/verify.py): placement's view follows."""
        self._collateral_changed(node_id, found)

    def _collateral_changed(self, node_id: str, found: ledger.Collateral | None) -> None:
        self._available[node_id] = found.available_micros if found else 0
        self._eligibility_changed(node_id)

    def on_eligibility_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(node_id)`` whenever a node's collateral eligibility may have
        changed (``""``: any node's, e.g. after a reload)."""
        self._eligibility_listeners.append(listener)

    def _eligibility_changed(self, node_id: str = "") -> None:
        for listener in self._eligibility_listeners:
            listener(node_id)

    def node_eligible(self, node_id: str) -> bool:
        """Placement's collateral rule: unslashed stake >= ``ledger.min_collateral_micros``."""
        minimum = self.policy.min_collateral_micros
        return minimum <= 0 or self._available.get(node_id, 0) >= minimum

    def _now(self) -> int:
        return round(self.clock() * 1e9)

    async def _refuse(self, context: Context, exc: ledger.LedgerError) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # -- RPCs ------------------------------------------------------------------------

    async def Deposit(
        self, request: ledger_pb2.DepositRequest, context: Context
    ) -> ledger_pb2.Account:
        now = self._now()
        who = caller()
        if len(request.buyer) > 128 or len(request.idempotency_key) > 128:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "buyer and idempotency_key: at most 128 characters",
            )

        def txn(conn: Conn) -> ledger.Account:
            before = conn.total_changes
            account = ledger.deposit(
                conn,
                request.buyer,
                request.amount_micros,
                now,
                self.policy,
                request.idempotency_key,
            )
            if conn.total_changes != before:  # a repeat of a key deposits (and audits) once
                acl_store.audit(
                    conn,
                    now,
                    who.account,
                    "deposit",
                    request.buyer,
                    f"micros={request.amount_micros} key={request.idempotency_key}",
                    who.peer,
                )
            return account

        try:
            account = await self.db.call(txn)
        except ledger.LedgerError as exc:
            await self._refuse(context, exc)
            raise AssertionError("abort returned") from None
        return _account_pb(account)

    async def Balance(
        self, request: ledger_pb2.BalanceRequest, context: Context
    ) -> ledger_pb2.BalanceResponse:
        who = caller()
        if not who.is_admin():
            if request.buyer and request.buyer != who.account:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"buyer: account {who.account!r} may read only its own balance",
                )
            own = who.account
            found = await self.db.call(lambda conn: ledger.account(conn, own))
            return ledger_pb2.BalanceResponse(accounts=[_account_pb(found)])
        if request.buyer:
            found = await self.db.call(lambda conn: ledger.account(conn, request.buyer))
            return ledger_pb2.BalanceResponse(accounts=[_account_pb(found)])
        every = await self.db.call(ledger.accounts)
        return ledger_pb2.BalanceResponse(accounts=[_account_pb(a) for a in every])

    async def Usage(
        self, request: ledger_pb2.UsageRequest, context: Context
    ) -> ledger_pb2.UsageResponse:
        limit = min(request.limit or 100, 1000)
        who = caller()
        node_id = request.node_id
        # Scope: a buyer sees its own leases, a provider its own nodes, admin everything.
        buyer = who.account if who.role == "buyer" else ""
        own_nodes: set[str] | None = None
        if who.role == "provider":
            own_nodes = {r.node_id for r in self.registry.nodes.values() if r.owner == who.account}
        if node_id:
            record = self.registry.find(node_id)
            if record is None or (own_nodes is not None and record.node_id not in own_nodes):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no node with id or unique prefix {node_id[:80]!r}"
                )
            assert record is not None
            node_id = record.node_id

        def mine(usage: ledger_pb2.LeaseUsage) -> bool:
            if buyer:
                return usage.buyer == buyer
            if own_nodes is not None:
                return usage.node_id in own_nodes
            return True

        def read(conn: Conn) -> ledger_pb2.UsageResponse | None:
            if request.lease_id:
                found = lease_usage(conn, request.lease_id)
                if not mine(found) or (not found.buyer and not found.records):
                    return None
                usages = [found]
            else:
                # The scope is in the query (buyer, or the provider's nodes), so LIMIT
                # counts only what the caller may see.
                where, params = (
                    ["(? = '' OR u.node_id = ?)", "(? = '' OR l.buyer = ?)"],
                    [
                        node_id,
                        node_id,
                        buyer,
                        buyer,
                    ],
                )
                if own_nodes is not None:
                    where.append(f"u.node_id IN ({', '.join('?' * len(own_nodes)) or 'NULL'})")
                    params.extend(sorted(own_nodes))
                lease_ids = [
                    lid
                    for (lid,) in conn.execute(
                        "SELECT u.lease_id FROM usage_records u LEFT JOIN leases l"  # noqa: S608
                        f" ON l.lease_id = u.lease_id WHERE {' AND '.join(where)}"
                        " GROUP BY u.lease_id ORDER BY MAX(u.received_ns) DESC LIMIT ?",
                        (*params, limit),
                    )
                ]
                usages = [u for u in (lease_usage(conn, i) for i in lease_ids) if mine(u)]
            response = ledger_pb2.UsageResponse(leases=usages)
            if buyer:
                return response  # providers' earnings and stake are not the buyer's business
            nodes = (
                [node_id] if node_id else sorted({u.node_id for u in response.leases if u.node_id})
            )
            response.providers.extend(provider(conn, n, self.policy) for n in nodes)
            return response

        response = await self.db.call(read)
        if response is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no usage for lease {request.lease_id[:140]!r}"
            )
        assert response is not None
        return response

    async def Stake(
        self, request: ledger_pb2.StakeRequest, context: Context
    ) -> ledger_pb2.Provider:
        record = self.registry.find(request.node_id) if request.node_id else None
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no node with id or unique prefix {request.node_id!r} (it must connect once)",
            )
        assert record is not None
        now = self._now()
        who = caller()
        commitment = request.uptime_commitment_ratio or None

        def txn(conn: Conn) -> tuple[ledger.Collateral, ledger_pb2.Provider]:
            found = ledger.stake(conn, record.node_id, request.amount_micros, now, commitment)
            acl_store.audit(
                conn,
                now,
                who.account,
                "stake",
                record.node_id,
                f"micros={request.amount_micros} uptime_commitment={commitment}",
                who.peer,
            )
            return found, provider(conn, record.node_id, self.policy)

        try:
            found, response = await self.db.call(txn)
        except ledger.LedgerError as exc:
            await self._refuse(context, exc)
            raise AssertionError("abort returned") from None
        self._collateral_changed(record.node_id, found)
        return response

    # -- for placement and attestation --------------------------------------------------

    async def attestation_failed(self, node_id: str, reason: str, challenge_id: str = "") -> int:
        """Slash ``ledger.slash_attestation_micros``, once per ``challenge_id``; returns
        what was taken."""
        now = self._now()

        def txn(conn: Conn) -> tuple[int, ledger.Collateral | None]:
            taken = ledger.slash(
                conn,
                node_id,
                self.policy.slash_attestation_micros,
                now,
                f"failed attestation: {reason}",
                ref=challenge_id,
            )
            return taken, ledger.collateral(conn, node_id)

        taken, found = await self.db.call(txn)
        if taken:
            self._collateral_changed(node_id, found)
        return taken

    # -- periodic duties ----------------------------------------------------------------

    async def check_uptime(self) -> dict[str, int]:
        """Slash each staked node below its uptime commitment; {node_id: slashed}."""
        now = self.clock()
        window = self.config.uptime_window

        def txn(conn: Conn) -> dict[str, int]:
            slashed = {}
            rows = conn.execute(
                "SELECT node_id, committed_ns FROM collateral WHERE uptime_commitment_ratio > 0"
            ).fetchall()
            for node_id, committed_ns in rows:
                record = self.registry.nodes.get(node_id)
                spans = record.spans if record is not None else []
                # Measured from the commitment (or first sight): no debt for earlier time,
                # and only over a whole window, so a short sample cannot slash.
                since = max(committed_ns / 1e9, record.first_seen if record else 0.0)
                if now - since < window:
                    continue
                measured = uptime.ratio(spans, now, window, since)
                taken = ledger.check_uptime(
                    conn, node_id, measured, round(now * 1e9), round(window * 1e9), self.policy
                )
                if taken:
                    slashed[node_id] = taken
            return slashed

        slashed = await self.db.call(txn)
        if slashed:
            await self.load()
            self._eligibility_changed()
        return slashed

    async def release_due(self) -> list[str]:
        now = self._now()
        return await self.db.call(lambda conn: ledger.release_due(conn, now, self.policy))

    # Replicas: only the leader sweeps (set by the server; one scheduler always leads).
    is_leader: Callable[[], bool] = staticmethod(lambda: True)

    async def run(self, stop: asyncio.Event) -> None:
        tick = min(60.0, self.config.final_record_grace / 2, self.config.uptime_check_interval)
        last_uptime = self.clock()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
            if stop.is_set():
                return
            if not self.is_leader():
                continue  # another replica runs the ledger's sweeps (scheduler/replicas.py)
            try:
                await self.release_due()
                if self.clock() - last_uptime >= self.config.uptime_check_interval:
                    last_uptime = self.clock()
                    await self.check_uptime()
            except Exception:
                # The ledger's sweeps must not take the server down; the next tick retries.
                log.exception("ledger sweep failed")
