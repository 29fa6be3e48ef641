"""The ledger's arithmetic on a real (migrated, in-memory) scheduler database.

Escrow reserve/settle/release, rounding, caps, late records, collateral and
slashing; plus a hypothesis property: money is neither created nor lost.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuagent.usage import Unmeasured, UsageRecord, canonical_bytes
from gpuagent.v1 import leases_pb2
from scheduler import ledger
from scheduler.cmd_ledger import network_text
from scheduler.db import migrate
from scheduler.leases_store import LeaseRow
from scheduler.ledger import LedgerError, LedgerPolicy
from scheduler.ledger_service import lease_usage
from scheduler.storage import SqliteConn

NOW = 1_700_000_000 * 10**9
HOUR_NS = 3600 * 10**9
POLICY = LedgerPolicy(final_record_grace_ns=600 * 10**9)


def open_db() -> SqliteConn:
    """The ledger's statements run through the scheduler's connection adapter, as in
    production (it drops the row locks that only PostgreSQL takes)."""
    raw = sqlite3.connect(":memory:", isolation_level=None)
    raw.execute("PRAGMA foreign_keys=ON")
    migrate(raw)
    return SqliteConn(raw)


@pytest.fixture
def conn() -> Iterator[SqliteConn]:
    db = open_db()
    yield db
    db.raw.close()


def lease(
    lease_id: str = "l1",
    buyer: str = "alice",
    *,
    price: int = 1_000_000,
    gpus: int = 1,
    max_s: int = 3600,
    accepted: int | None = None,
    node: str | None = "node-a",
    state: str = "running",
    started: int | None = NOW,
) -> LeaseRow:
    """A lease row as the lease store hands it to the ledger's hooks."""
    return LeaseRow(
        lease_id=lease_id,
        buyer=buyer,
        spec=leases_pb2.LeaseSpec(gpu_count=gpus),
        gpu_count=gpus,
        price_micros_per_gpu_hour=price,
        accepted_price_micros_per_gpu_hour=accepted,
        max_duration_s=max_s,
        pinned_node_id="",
        replace_on_lost=False,
        node_id=node,
        gpu_uuids=[],
        state=state,
        exit_code=None,
        reason="",
        log_tail="",
        container_id="",
        last_update_seq=0,
        created_ns=NOW,
        updated_ns=NOW,
        placed_ns=NOW,
        started_ns=started,
        ended_ns=None,
        cancel_requested_ns=None,
        attempts=1,
        expires_at_ns=0,
    )


def escrow_row(conn: SqliteConn, lease_id: str) -> tuple[int, int, int, int, str]:
    return conn.execute(  # type: ignore[no-any-return]
        "SELECT cap_micros, reserved_micros, settled_micros, released_micros, state"
        " FROM escrow WHERE lease_id = ?",
        (lease_id,),
    ).fetchone()


def test_reserve_settle_release_arithmetic_is_exact(conn: SqliteConn) -> None:
    """A 2-GPU, 1 h lease at 1.5/GPU-hour reserves 3.0; 30 min on 2 GPUs costs 1.5
    (paid to the node); release returns exactly the remaining 1.5."""
    ledger.deposit(conn, "alice", 10_000_000, NOW, POLICY)
    row = lease(price=1_500_000, gpus=2, max_s=3600)
    assert ledger.reserve(conn, row, NOW, POLICY) == 3_000_000
    assert ledger.account(conn, "alice").balance_micros == 7_000_000
    assert ledger.account(conn, "alice").escrow_micros == 3_000_000

    result = ledger.settle(conn, row, "node-a", gpu_ns=2 * HOUR_NS // 2, now=NOW)
    assert result == ledger.Settlement(charged_micros=1_500_000, unbilled_micros=0)
    assert ledger.earnings(conn, "node-a") == 1_500_000

    assert ledger.release(conn, "l1", NOW, "test") == 1_500_000
    assert ledger.release(conn, "l1", NOW, "again") == 0, "release is idempotent"
    assert ledger.account(conn, "alice") == ledger.Account(
        "alice",
        balance_micros=8_500_000,
        escrow_micros=0,
        spent_micros=1_500_000,
        deposited_micros=10_000_000,
    )
    kinds = [k for (k,) in conn.execute("SELECT kind FROM ledger_entries ORDER BY entry_id")]
    assert kinds == ["deposit", "reserve", "settle", "release"]


def test_reservation_rounds_up_and_is_refused_when_short(conn: SqliteConn) -> None:
    """The reservation covers the worst case (rounded up); a short balance refuses it
    with a message naming both amounts, and moves nothing."""
    assert ledger.reservation_micros(1, 1, 1) == 1  # 1/3600 of a micro rounds up to 1
    ledger.deposit(conn, "bob", 999_999, NOW, POLICY)
    with pytest.raises(LedgerError, match=r"insufficient balance.*0\.999999.*needs 1"):
        ledger.reserve(conn, lease(buyer="bob", price=1_000_000, max_s=3600), NOW, POLICY)
    assert ledger.account(conn, "bob").balance_micros == 999_999
    assert conn.execute("SELECT COUNT(*) FROM escrow").fetchone()[0] == 0


def test_priced_lease_without_max_duration_or_buyer_is_refused(conn: SqliteConn) -> None:
    """Escrow needs a bound and a payer; a free lease needs neither."""
    with pytest.raises(LedgerError, match="max_duration"):
        ledger.reserve(conn, lease(max_s=0), NOW, POLICY)
    with pytest.raises(LedgerError, match="buyer"):
        ledger.reserve(conn, lease(buyer=""), NOW, POLICY)
    assert ledger.reserve(conn, lease("free", buyer="", price=0, max_s=0), NOW, POLICY) == 0


def test_cumulative_rounding_never_loses_or_creates_a_micro(conn: SqliteConn) -> None:
    """Charged per record as the difference of floor(price x cumulative / hour): seven
    records whose individual costs all round down still add up to the exact total."""
    ledger.deposit(conn, "alice", 10**9, NOW, POLICY)
    price = 1_000_003  # does not divide evenly into any of these intervals
    row = lease(price=price, max_s=36_000)
    ledger.reserve(conn, row, NOW, POLICY)
    pieces = [1_234_567_891, 7, 999_999_999_999, 3_333_333_333, 1, 42_000_000_017, 5]
    charged = [ledger.settle(conn, row, "node-a", p, NOW).charged_micros for p in pieces]
    assert sum(charged) == price * sum(pieces) // HOUR_NS
    naive = sum(price * p // HOUR_NS for p in pieces)
    assert naive < sum(charged), "per-record rounding would have lost micros"


def test_usage_beyond_the_reservation_is_not_charged(conn: SqliteConn) -> None:
    """The reservation is the most a lease can cost: metered time past it is recorded
    as unbilled, the buyer is never charged more than was reserved."""
    ledger.deposit(conn, "alice", 5_000_000, NOW, POLICY)
    row = lease(price=1_000_000, max_s=3600)
    ledger.reserve(conn, row, NOW, POLICY)
    first = ledger.settle(conn, row, "node-a", HOUR_NS // 2, NOW)
    second = ledger.settle(conn, row, "node-a", HOUR_NS, NOW)
    assert (first.charged_micros, second.charged_micros, second.unbilled_micros) == (
        500_000,
        500_000,  # only the rest of the 1.0 reserved
        500_000,  # 1.5 h metered at 1.0/h, 0.5 over the cap
    )
    assert ledger.account(conn, "alice").balance_micros == 4_000_000
    assert ledger.account(conn, "alice").spent_micros == 1_000_000


def test_price_is_the_nodes_accepted_ask_not_the_ceiling(conn: SqliteConn) -> None:
    """The buyer reserves at its ceiling but pays the placed node's (lower) ask."""
    ledger.deposit(conn, "alice", 5_000_000, NOW, POLICY)
    row = lease(price=2_000_000, accepted=500_000, max_s=3600)
    ledger.reserve(conn, row, NOW, POLICY)
    assert ledger.settle(conn, row, "node-a", HOUR_NS, NOW).charged_micros == 500_000
    assert ledger.release(conn, "l1", NOW, "end") == 1_500_000


def test_escrow_waits_for_the_final_record_then_releases(conn: SqliteConn) -> None:
    """A lease that ran is released when its final record arrives after the end (not at
    the end, so the last interval is paid from escrow); a lease that never ran is
    released at once; one whose final record never comes, after the grace."""
    ledger.deposit(conn, "alice", 10_000_000, NOW, POLICY)
    ran, never, silent = lease("ran"), lease("never", started=None), lease("silent")
    for row in (ran, never, silent):
        ledger.reserve(conn, row, NOW, POLICY)
    assert ledger.lease_ended(conn, never, NOW) == 1_000_000
    assert ledger.lease_ended(conn, ran, NOW) == 0
    assert escrow_row(conn, "ran")[4] == "held"
    ledger.settle(conn, ran, "node-a", HOUR_NS // 4, NOW)
    assert ledger.final_record(conn, "ran", NOW) == 750_000
    assert ledger.lease_ended(conn, silent, NOW) == 0
    assert ledger.release_due(conn, NOW + 599 * 10**9, POLICY) == []
    assert ledger.release_due(conn, NOW + 600 * 10**9, POLICY) == ["silent"]
    assert ledger.account(conn, "alice").escrow_micros == 0
    assert ledger.account(conn, "alice").balance_micros == 10_000_000 - 250_000


def test_late_record_after_release_is_charged_from_the_balance(conn: SqliteConn) -> None:
    """A record arriving after release is still paid (up to the cap and the balance),
    and the escrow identity stays exact: reserved - settled - released == 0."""
    ledger.deposit(conn, "alice", 2_000_000, NOW, POLICY)
    row = lease(price=1_000_000, max_s=3600)
    ledger.reserve(conn, row, NOW, POLICY)
    ledger.release(conn, "l1", NOW, "ended")
    late = ledger.settle(conn, row, "node-a", HOUR_NS // 10, NOW)
    assert late.charged_micros == 100_000
    _cap, reserved, settled, released, state = escrow_row(conn, "l1")
    assert (reserved - settled - released, state) == (0, "released")
    assert ledger.account(conn, "alice").balance_micros == 1_900_000
    assert ledger.earnings(conn, "node-a") == 100_000


def test_deposit_is_idempotent_by_key_and_validates(conn: SqliteConn) -> None:
    """A repeated key credits once; reusing it for another amount, a zero or negative
    amount, or an empty buyer are refused."""
    ledger.deposit(conn, "alice", 5, NOW, POLICY, idempotency_key="k1")
    ledger.deposit(conn, "alice", 5, NOW, POLICY, idempotency_key="k1")
    assert ledger.account(conn, "alice").deposited_micros == 5
    with pytest.raises(LedgerError, match="idempotency key"):
        ledger.deposit(conn, "alice", 6, NOW, POLICY, idempotency_key="k1")
    for amount in (0, -1):
        with pytest.raises(LedgerError, match="amount"):
            ledger.deposit(conn, "alice", amount, NOW, POLICY)
    with pytest.raises(LedgerError, match="buyer"):
        ledger.deposit(conn, "", 1, NOW, POLICY)


def test_default_credit_opens_new_accounts_with_a_balance(conn: SqliteConn) -> None:
    """The demo setting credits a buyer's first use, once, as a journaled deposit."""
    policy = LedgerPolicy(default_credit_micros=50_000_000)
    ledger.reserve(conn, lease(price=1_000_000, max_s=3600), NOW, policy)
    ledger.reserve(conn, lease("l2", price=1_000_000, max_s=3600), NOW, policy)
    assert ledger.account(conn, "alice").balance_micros == 48_000_000
    assert ledger.account(conn, "alice").deposited_micros == 50_000_000


def test_collateral_is_required_when_configured(conn: SqliteConn) -> None:
    """With a minimum stake, only nodes whose unslashed stake meets it are eligible;
    with none configured, every node is."""
    policy = LedgerPolicy(min_collateral_micros=100_000_000)
    nodes = frozenset({"node-a", "node-b", "node-c"})

    def eligible(p: LedgerPolicy) -> set[str]:
        return {n for n in nodes if ledger.collateral_ok(conn, n, p)}

    assert eligible(LedgerPolicy()) == set(nodes)
    assert eligible(policy) == set()
    ledger.stake(conn, "node-a", 100_000_000, NOW)
    ledger.stake(conn, "node-b", 99_999_999, NOW)
    assert eligible(policy) == {"node-a"}
    ledger.stake(conn, "node-b", 1, NOW)
    assert eligible(policy) == {"node-a", "node-b"}


def test_slashing_takes_stake_never_more_than_there_is(conn: SqliteConn) -> None:
    """A slash below the minimum makes the node ineligible; a slash larger than what is
    left takes only what is left; a node without stake loses nothing."""
    policy = LedgerPolicy(min_collateral_micros=100_000_000)
    ledger.stake(conn, "node-a", 120_000_000, NOW)
    assert ledger.slash(conn, "node-a", 30_000_000, NOW, "failed attestation") == 30_000_000
    assert not ledger.collateral_ok(conn, "node-a", policy)
    assert ledger.slash(conn, "node-a", 500_000_000, NOW, "again") == 90_000_000
    found = ledger.collateral(conn, "node-a")
    assert found is not None and found.available_micros == 0
    assert ledger.slash(conn, "node-z", 1, NOW, "nothing staked") == 0
    reasons = [r for (r,) in conn.execute("SELECT reason FROM ledger_entries WHERE kind='slash'")]
    assert reasons == ["failed attestation", "again"]


def test_uptime_below_commitment_is_slashed_once_per_window(conn: SqliteConn) -> None:
    """Measured uptime under the declared commitment slashes the configured amount, at
    most once per window; meeting the commitment (or having none) slashes nothing."""
    policy = LedgerPolicy(slash_uptime_micros=10_000_000)
    day = 86_400 * 10**9
    ledger.stake(conn, "node-a", 100_000_000, NOW, uptime_commitment=0.99)
    ledger.stake(conn, "node-b", 100_000_000, NOW)  # no commitment
    assert ledger.check_uptime(conn, "node-a", 0.995, NOW, day, policy) == 0
    assert ledger.check_uptime(conn, "node-b", 0.10, NOW, day, policy) == 0
    assert ledger.check_uptime(conn, "node-a", 0.95, NOW, day, policy) == 10_000_000
    assert ledger.check_uptime(conn, "node-a", 0.95, NOW + day - 1, day, policy) == 0
    assert ledger.check_uptime(conn, "node-a", 0.95, NOW + day, day, policy) == 10_000_000
    found = ledger.collateral(conn, "node-a")
    assert found is not None and found.slashed_micros == 20_000_000


def test_stake_rejects_a_commitment_outside_0_to_1(conn: SqliteConn) -> None:
    """An uptime commitment is a ratio."""
    with pytest.raises(LedgerError, match=r"0\.\.1"):
        ledger.stake(conn, "node-a", 1, NOW, uptime_commitment=1.5)


def test_format_micros_is_exact() -> None:
    """Display never goes through a float."""
    assert ledger.format_micros(12_500_000) == "12.5"
    assert ledger.format_micros(1) == "0.000001"
    assert ledger.format_micros(10**20 + 1) == "100000000000000.000001"
    assert ledger.format_micros(-3_000_000) == "-3"


# -- property: conservation -------------------------------------------------------------

BUYERS = ("alice", "bob")
_op = st.one_of(
    st.tuples(st.just("deposit"), st.sampled_from(BUYERS), st.integers(1, 10**9)),
    st.tuples(
        st.just("submit"),
        st.sampled_from(BUYERS),
        st.integers(0, 5_000_000),  # price per GPU-hour
        st.integers(1, 8),  # GPUs
        st.integers(1, 7200),  # max duration, s
    ),
    st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, 4 * HOUR_NS)),
    st.tuples(st.just("end"), st.integers(0, 20)),
    st.tuples(st.just("final"), st.integers(0, 20)),
)


def check_conservation(conn: SqliteConn, deposited: dict[str, int]) -> None:
    spent_total = 0
    for buyer in BUYERS:
        a = ledger.account(conn, buyer)
        assert a.deposited_micros == deposited.get(buyer, 0)
        assert a.balance_micros + a.escrow_micros + a.spent_micros == a.deposited_micros
        assert min(a.balance_micros, a.escrow_micros, a.spent_micros) >= 0
        spent_total += a.spent_micros
    (earned,) = conn.execute("SELECT COALESCE(SUM(micros), 0) FROM earnings").fetchone()
    assert earned == spent_total


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=40))
def test_balance_escrow_and_spent_are_conserved(ops: list[tuple[object, ...]]) -> None:
    """Under any sequence of deposits, submits (refused or not), settlements of any
    size, lease ends and final records: balance + escrow + spent == deposits for
    every buyer, providers earn exactly what buyers spent, nothing goes negative."""
    conn = open_db()
    deposited: dict[str, int] = {}
    leases: list[LeaseRow] = []
    try:
        for op in ops:
            kind = op[0]
            if kind == "deposit":
                _, buyer, amount = op
                ledger.deposit(conn, str(buyer), int(amount), NOW, POLICY)  # type: ignore[call-overload]
                deposited[str(buyer)] = deposited.get(str(buyer), 0) + int(amount)  # type: ignore[call-overload]
            elif kind == "submit":
                _, buyer, price, gpus, max_s = op
                row = lease(f"l{len(leases)}", str(buyer), price=price, gpus=gpus, max_s=max_s)  # type: ignore[arg-type]
                try:
                    ledger.reserve(conn, row, NOW, POLICY)
                except LedgerError:
                    continue
                leases.append(row)
            elif leases:
                row = leases[int(op[1]) % len(leases)]  # type: ignore[call-overload]
                if kind == "settle":
                    ledger.settle(conn, row, "node-a", int(op[2]), NOW)  # type: ignore[call-overload]
                elif kind == "end":
                    ledger.lease_ended(conn, row, NOW)
                else:
                    ledger.final_record(conn, row.lease_id, NOW)
            check_conservation(conn, deposited)
        ledger.release_due(conn, NOW + POLICY.final_record_grace_ns, POLICY)
        check_conservation(conn, deposited)
    finally:
        conn.raw.close()


def _store_record(conn: SqliteConn, record: UsageRecord) -> None:
    conn.execute(
        "INSERT INTO usage_records (node_id, seq, lease_id, status, start_ns, end_ns,"
        " duration_ns, gpu_count, gpu_ns, final, canonical, signature, received_ns)"
        " VALUES (?, ?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?, x'', ?)",
        (
            record.node_id,
            record.seq,
            record.lease_id,
            record.start_unix_ns,
            record.end_unix_ns,
            record.duration_ns,
            record.gpu_count,
            record.gpu_ns,
            int(record.final),
            canonical_bytes(record),
            NOW,
        ),
    )


def test_lease_usage_keeps_unmeasured_network_unknown(conn: SqliteConn) -> None:
    """Totals carry the records' unmeasured bits: a lease whose node could not read
    its network counters shows network unknown, not 0 bytes; one measured record
    among them makes the bytes a lower bound, still flagged."""
    base = UsageRecord(
        node_id="n1", seq=1, lease_id="L1", start_unix_ns=NOW, end_unix_ns=NOW + 10**9,
        duration_ns=10**9, gpu_count=1, gpu_ns=10**9, unmeasured=int(Unmeasured.NETWORK),
    )  # fmt: skip
    _store_record(conn, base)
    usage = lease_usage(conn, "L1")
    assert usage.unmeasured & Unmeasured.NETWORK
    assert network_text(usage).startswith("unknown")
    measured = dataclasses.replace(
        base, seq=2, start_unix_ns=NOW + 10**9, end_unix_ns=NOW + 2 * 10**9,
        net_rx_bytes=500, net_tx_bytes=70, unmeasured=0,
    )  # fmt: skip
    _store_record(conn, measured)
    usage = lease_usage(conn, "L1")
    assert (usage.net_rx_bytes, usage.net_tx_bytes) == (500, 70)
    assert network_text(usage) == "rx >= 500 B, tx >= 70 B (some intervals unmeasured)"
    conn.execute("DELETE FROM usage_records WHERE seq = 1")
    usage = lease_usage(conn, "L1")
    assert usage.unmeasured == 0
    assert network_text(usage) == "rx 500 B, tx 70 B"
