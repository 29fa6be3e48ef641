"""The off-chain ledger: buyer balances and escrow, provider earnings, collateral.

A stand-in for the protocol's payment layer, kept exact: every amount is an
integer number of micro-units (1 unit = 1_000_000 micros) and every movement
is one row of ``ledger_entries``, written in the same transaction as the
balance it changes. The functions here take the sqlite connection of a
transaction already open on the Database thread (``Database.call`` or the
lease store's hooks), so a lease's state change and its money move together.

Invariants (tests/test_ledger.py::test_balance_escrow_and_spent_are_conserved
checks them with hypothesis):

- per buyer: ``balance + escrow held + spent == deposited``, where held is
  ``reserved - settled - released`` summed over the buyer's leases;
- ``sum(earnings) == sum(settled)``: what buyers spent, providers earned;
- nothing is ever negative (CHECK constraints back this up).

Rounding (docs/ledger.md): the cost of a lease on a node is
``floor(price x cumulative gpu_ns / 3.6e12)``; each record is charged the
difference to the previous cumulative cost, so rounding never loses or creates
a micro however the time is cut into records. A reservation rounds up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .leases_store import LeaseRow
from .storage import Conn

log = logging.getLogger(__name__)

MICROS_PER_UNIT = 1_000_000
NS_PER_HOUR = 3600 * 1_000_000_000
I64_MAX = 2**63 - 1
# One credit or stake, and any account's or node's running total, stay far below
# int64: SQLite turns an overflowing integer sum into a float, which broke every
# later balance read. 10^15 micros is a billion units.
MAX_CREDIT_MICROS = 10**15
MAX_TOTAL_MICROS = 2**62


class LedgerError(Exception):
    """A movement the ledger refuses (e.g. insufficient balance); the message says why."""


@dataclass(frozen=True)
class LedgerPolicy:
    """The amounts and times the ledger applies (from ``ledger:`` in the config)."""

    min_collateral_micros: int = 0
    slash_attestation_micros: int = 0
    slash_uptime_micros: int = 0
    slash_verify_micros: int = 0
    default_credit_micros: int = 0
    final_record_grace_ns: int = 600 * 1_000_000_000
    clock_skew_allowance_ns: int = 60 * 1_000_000_000


@dataclass(frozen=True)
class Account:
    buyer: str
    balance_micros: int
    escrow_micros: int
    spent_micros: int
    deposited_micros: int


@dataclass(frozen=True)
class Collateral:
    node_id: str
    staked_micros: int
    slashed_micros: int
    uptime_commitment_ratio: float
    committed_ns: int
    last_uptime_slash_ns: int | None

    @property
    def available_micros(self) -> int:
        return self.staked_micros - self.slashed_micros


@dataclass(frozen=True)
class Settlement:
    charged_micros: int  # moved from escrow (or the balance, late) to the provider
    unbilled_micros: int  # metered beyond the lease's cap: not charged


def format_micros(micros: int) -> str:
    """12_500_000 -> "12.5"; exact (no float), trailing zeros trimmed."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text


def cost_micros(price_micros_per_gpu_hour: int, gpu_ns: int) -> int:
    """Cost of ``gpu_ns`` GPU-nanoseconds, rounded down to a whole micro."""
    return price_micros_per_gpu_hour * gpu_ns // NS_PER_HOUR


def reservation_micros(price_micros_per_gpu_hour: int, gpu_count: int, max_duration_s: int) -> int:
    """The most a lease can cost: price x GPUs x max duration, rounded up."""
    return -(-price_micros_per_gpu_hour * gpu_count * max_duration_s // 3600)


def _entry(
    conn: Conn,
    kind: str,
    amount: int,
    now: int,
    *,
    buyer: str = "",
    node_id: str = "",
    lease_id: str = "",
    reason: str = "",
    ref: str = "",
) -> None:
    conn.execute(
        "INSERT INTO ledger_entries (ts_ns, kind, buyer, node_id, lease_id, amount_micros,"
        " reason, ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (now, kind, buyer, node_id, lease_id, amount, reason, ref),
    )


def _check_amount(what: str, micros: int, *, allow_zero: bool = False) -> None:
    if micros < 0 or (micros == 0 and not allow_zero) or micros > I64_MAX:
        bound = ">= 0" if allow_zero else "> 0"
        raise LedgerError(f"{what}: {micros} micros is not {bound} and within int64")


def _ensure_account(conn: Conn, buyer: str, policy: LedgerPolicy, now: int) -> None:
    """Create the buyer's account on first use, with the configured demo credit."""
    cur = conn.execute("INSERT OR IGNORE INTO accounts (buyer) VALUES (?)", (buyer,))
    if cur.rowcount and policy.default_credit_micros > 0:
        credit = policy.default_credit_micros
        conn.execute(
            "UPDATE accounts SET balance_micros = ?, deposited_micros = ? WHERE buyer = ?",
            (credit, credit, buyer),
        )
        _entry(conn, "deposit", credit, now, buyer=buyer, reason="default credit (ledger config)")


# -- buyers ---------------------------------------------------------------------------


def deposit(
    conn: Conn,
    buyer: str,
    micros: int,
    now: int,
    policy: LedgerPolicy,
    idempotency_key: str = "",
) -> Account:
    """Credit ``buyer``; a repeat with the same non-empty key credits once."""
    if not buyer:
        raise LedgerError("buyer: empty")
    _check_amount("amount", micros)
    if micros > MAX_CREDIT_MICROS:
        raise LedgerError(f"amount: at most {MAX_CREDIT_MICROS} micros per deposit, got {micros}")
    _ensure_account(conn, buyer, policy, now)
    if idempotency_key:
        seen = conn.execute(
            "SELECT buyer, amount_micros FROM ledger_entries WHERE kind = 'deposit' AND ref = ?",
            (idempotency_key,),
        ).fetchone()
        if seen is not None:
            if tuple(seen) != (buyer, micros):
                raise LedgerError(
                    f"idempotency key {idempotency_key!r} was used for another deposit "
                    f"({seen[1]} micros to {seen[0]!r})"
                )
            return account(conn, buyer)
    (deposited,) = conn.execute(
        "SELECT deposited_micros FROM accounts WHERE buyer = ?", (buyer,)
    ).fetchone()
    if int(deposited) + micros > MAX_TOTAL_MICROS:
        raise LedgerError(
            f"amount: the account's deposits would pass {MAX_TOTAL_MICROS} micros; refused"
        )
    conn.execute(
        "UPDATE accounts SET balance_micros = balance_micros + ?,"
        " deposited_micros = deposited_micros + ? WHERE buyer = ?",
        (micros, micros, buyer),
    )
    _entry(conn, "deposit", micros, now, buyer=buyer, ref=idempotency_key)
    log.info("deposit", extra={"buyer": buyer, "micros": micros})
    return account(conn, buyer)


def account(conn: Conn, buyer: str) -> Account:
    row = conn.execute(
        "SELECT balance_micros, deposited_micros FROM accounts WHERE buyer = ?", (buyer,)
    ).fetchone()
    balance, deposited = row if row else (0, 0)
    held, spent = conn.execute(
        "SELECT COALESCE(SUM(reserved_micros - settled_micros - released_micros), 0),"
        " COALESCE(SUM(settled_micros), 0) FROM escrow WHERE buyer = ?",
        (buyer,),
    ).fetchone()
    return Account(buyer, balance, held, spent, deposited)


def accounts(conn: Conn) -> list[Account]:
    buyers = [b for (b,) in conn.execute("SELECT buyer FROM accounts ORDER BY buyer")]
    return [account(conn, b) for b in buyers]


# -- escrow ---------------------------------------------------------------------------


def reserve(conn: Conn, lease: LeaseRow, now: int, policy: LedgerPolicy) -> int:
    """Move the lease's maximum cost from the buyer's balance into escrow.

    Raises LedgerError (nothing moved) when the balance is short or a priced
    lease has no max duration to bound it.
    """
    price = lease.price_micros_per_gpu_hour
    if price > 0 and lease.max_duration_s <= 0:
        raise LedgerError(
            "a lease with a price needs max_duration_seconds: escrow reserves "
            "price x gpu_count x max_duration up front"
        )
    amount = reservation_micros(price, lease.gpu_count, lease.max_duration_s)
    if amount > 0 and not lease.buyer:
        raise LedgerError("a lease with a price needs a buyer account to pay from (set buyer)")
    # An account that has the amount pays it in one statement (every Submit: two round
    # trips fewer); otherwise it is created on first use and checked, to say why not.
    paid = (
        amount > 0
        and conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - ?"
            " WHERE buyer = ? AND balance_micros >= ?",
            (amount, lease.buyer, amount),
        ).rowcount
    )
    if not paid:
        _ensure_account(conn, lease.buyer, policy, now)
        # Locked: Submit runs READ COMMITTED on PostgreSQL (Database.call_locked), and a
        # balance read unlocked could be spent by another Submit before the UPDATE.
        (balance,) = conn.execute(
            "SELECT balance_micros FROM accounts WHERE buyer = ? FOR UPDATE", (lease.buyer,)
        ).fetchone()
        if amount > balance:
            raise LedgerError(
                f"insufficient balance: buyer {lease.buyer!r} has {format_micros(balance)}, "
                f"the lease needs {format_micros(amount)} in escrow "
                f"({lease.gpu_count} GPU x {lease.max_duration_s}s x "
                f"{format_micros(price)}/GPU-hour); deposit more or shorten max_duration"
            )
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - ? WHERE buyer = ?",
            (amount, lease.buyer),
        )
    conn.execute(
        "INSERT INTO escrow (lease_id, buyer, cap_micros, reserved_micros, state, created_ns)"
        " VALUES (?, ?, ?, ?, 'held', ?)",
        (lease.lease_id, lease.buyer, amount, amount, now),
    )
    _entry(conn, "reserve", amount, now, buyer=lease.buyer, lease_id=lease.lease_id)
    return amount


def _escrow(conn: Conn, lease: LeaseRow, now: int) -> tuple[int, int, str]:
    """(cap, settled, state) of the lease's escrow, created if missing.

    A lease stored before the ledger was enabled has none: it gets one with
    nothing reserved, so its usage is charged from the balance as it arrives.
    """
    row = conn.execute(
        "SELECT cap_micros, settled_micros, state FROM escrow WHERE lease_id = ?",
        (lease.lease_id,),
    ).fetchone()
    if row is None:
        cap = reservation_micros(
            lease.price_micros_per_gpu_hour, lease.gpu_count, lease.max_duration_s
        )
        conn.execute(
            "INSERT INTO escrow (lease_id, buyer, cap_micros, reserved_micros, state, created_ns)"
            " VALUES (?, ?, ?, 0, 'released', ?)",
            (lease.lease_id, lease.buyer, cap, now),
        )
        return cap, 0, "released"
    return int(row[0]), int(row[1]), str(row[2])


def settle(
    conn: Conn,
    lease: LeaseRow,
    node_id: str,
    gpu_ns: int,
    now: int,
    ref: str = "",
) -> Settlement:
    """Charge ``gpu_ns`` more GPU time on ``node_id`` to the lease; pay the provider.

    The price is fixed per (lease, node) at the first record: the node's accepted
    ask (the buyer's ceiling when none was recorded). Charges never exceed the
    lease's cap; after release (a record arriving late) they come from the
    buyer's balance, as far as it goes.
    """
    price = lease.accepted_price_micros_per_gpu_hour
    if price is None:
        price = lease.price_micros_per_gpu_hour
    conn.execute(
        "INSERT OR IGNORE INTO billing (lease_id, node_id, price_micros_per_gpu_hour)"
        " VALUES (?, ?, ?)",
        (lease.lease_id, node_id, price),
    )
    price, billed_ns, billed_cost = conn.execute(
        "SELECT price_micros_per_gpu_hour, gpu_ns, cost_micros FROM billing"
        " WHERE lease_id = ? AND node_id = ?",
        (lease.lease_id, node_id),
    ).fetchone()
    total_ns = billed_ns + gpu_ns
    new_cost = cost_micros(price, total_ns)
    delta = new_cost - billed_cost
    conn.execute(
        "UPDATE billing SET gpu_ns = ?, cost_micros = ? WHERE lease_id = ? AND node_id = ?",
        (total_ns, new_cost, lease.lease_id, node_id),
    )
    if verify_hold(conn, lease.lease_id) is not None:
        # A copy of a redundant run: its cost is billed, but paid (or not) only when
        # the copies are compared (pay_held, docs/verification.md).
        return Settlement(0, 0)
    cap, settled, state = _escrow(conn, lease, now)
    charge = min(delta, cap - settled)
    if state == "released":
        (balance,) = conn.execute(
            "SELECT COALESCE(MAX(balance_micros), 0) FROM accounts WHERE buyer = ?", (lease.buyer,)
        ).fetchone()
        charge = max(0, min(charge, balance))
        if charge:
            # A late record: reserve it from the balance and settle it at once, so the
            # escrow identity (held = reserved - settled - released) stays exact.
            conn.execute(
                "UPDATE accounts SET balance_micros = balance_micros - ? WHERE buyer = ?",
                (charge, lease.buyer),
            )
            conn.execute(
                "UPDATE escrow SET reserved_micros = reserved_micros + ? WHERE lease_id = ?",
                (charge, lease.lease_id),
            )
            _entry(
                conn,
                "reserve",
                charge,
                now,
                buyer=lease.buyer,
                lease_id=lease.lease_id,
                reason="usage after release",
                ref=ref,
            )
    charge = max(charge, 0)
    unbilled = delta - charge
    if charge:
        conn.execute(
            "UPDATE escrow SET settled_micros = settled_micros + ? WHERE lease_id = ?",
            (charge, lease.lease_id),
        )
        conn.execute(
            "INSERT INTO earnings (node_id, micros) VALUES (?, ?)"
            " ON CONFLICT(node_id) DO UPDATE SET micros = earnings.micros + excluded.micros",
            (node_id, charge),
        )
        _entry(
            conn,
            "settle",
            charge,
            now,
            buyer=lease.buyer,
            node_id=node_id,
            lease_id=lease.lease_id,
            ref=ref,
        )
    if unbilled:
        conn.execute(
            "UPDATE escrow SET unbilled_micros = unbilled_micros + ? WHERE lease_id = ?",
            (unbilled, lease.lease_id),
        )
        log.warning(
            "usage beyond what the lease can be charged; not billed",
            extra={"lease_id": lease.lease_id, "node_id": node_id, "unbilled_micros": unbilled},
        )
    return Settlement(charge, unbilled)


def release(conn: Conn, lease_id: str, now: int, reason: str) -> int:
    """Return what escrow still holds for the lease to the buyer; idempotent. A copy of
    a redundant run keeps its escrow until its copies are compared (pay_held)."""
    if verify_hold(conn, lease_id) == "held":
        return 0
    row = conn.execute(
        "SELECT buyer, reserved_micros - settled_micros - released_micros, state FROM escrow"
        " WHERE lease_id = ?",
        (lease_id,),
    ).fetchone()
    if row is None or row[2] == "released":
        return 0
    buyer, held, _ = row
    conn.execute(
        "UPDATE escrow SET released_micros = released_micros + ?, state = 'released'"
        " WHERE lease_id = ?",
        (held, lease_id),
    )
    conn.execute(
        "UPDATE accounts SET balance_micros = balance_micros + ? WHERE buyer = ?", (held, buyer)
    )
    _entry(conn, "release", held, now, buyer=buyer, lease_id=lease_id, reason=reason)
    return int(held)


def lease_ended(conn: Conn, lease: LeaseRow, now: int) -> int:
    """The lease reached a terminal state: release now, or once its final record is in.

    Released at once when no usage can follow (it never started and nothing was
    metered) or the final record already arrived; otherwise held until the
    final record or ``final_record_grace`` (``release_due``), so the last
    interval is paid from escrow rather than chased from the balance.
    """
    conn.execute(
        "UPDATE escrow SET ended_ns = COALESCE(ended_ns, ?) WHERE lease_id = ?",
        (now, lease.lease_id),
    )
    row = conn.execute(
        "SELECT final_seen FROM escrow WHERE lease_id = ?", (lease.lease_id,)
    ).fetchone()
    if row is None or verify_hold(conn, lease.lease_id) == "held":
        return 0  # a copy not yet compared keeps its escrow until pay_held / release
    metered = conn.execute(
        "SELECT 1 FROM usage_records WHERE lease_id = ? AND status = 'accepted' LIMIT 1",
        (lease.lease_id,),
    ).fetchone()
    if row[0] or (lease.started_ns is None and metered is None):
        return release(conn, lease.lease_id, now, f"lease {lease.state}")
    return 0


def final_record(conn: Conn, lease_id: str, now: int) -> int:
    """The lease's final usage record is stored: release if the lease has ended."""
    conn.execute("UPDATE escrow SET final_seen = 1 WHERE lease_id = ?", (lease_id,))
    row = conn.execute("SELECT ended_ns FROM escrow WHERE lease_id = ?", (lease_id,)).fetchone()
    if row is not None and row[0] is not None:
        return release(conn, lease_id, now, "final usage record")
    return 0


def release_due(conn: Conn, now: int, policy: LedgerPolicy) -> list[str]:
    """Release ended leases whose final record did not come within the grace."""
    due = [
        lease_id
        for (lease_id,) in conn.execute(
            "SELECT lease_id FROM escrow WHERE state = 'held' AND ended_ns IS NOT NULL"
            " AND ended_ns <= ?"
            # Copies of a redundant run waiting for their vote keep their escrow.
            " AND lease_id NOT IN (SELECT copy_id FROM verify_copies WHERE paid IS NULL)",
            (now - policy.final_record_grace_ns,),
        )
    ]
    for lease_id in due:
        release(conn, lease_id, now, "no final usage record within the grace")
    return due


# -- redundant runs (scheduler/verify.py) ---------------------------------------------


def verify_hold(conn: Conn, lease_id: str) -> str | None:
    """For a copy of a redundant run whose pay is not released: "held" until its
    copies are compared, "not_paid" after it lost; None for every other lease."""
    row = conn.execute("SELECT paid FROM verify_copies WHERE copy_id = ?", (lease_id,)).fetchone()
    if row is None or row[0] == 1:
        return None
    return "held" if row[0] is None else "not_paid"


def pay_held(conn: Conn, lease: LeaseRow, now: int) -> int:
    """Pay a verified copy what its usage cost (billed while held), from its escrow;
    once: the ``verify:<copy>`` ref makes a second call pay nothing."""
    ref = f"verify:{lease.lease_id}"
    if conn.execute(
        "SELECT 1 FROM ledger_entries WHERE kind = 'settle' AND lease_id = ? AND ref = ?",
        (lease.lease_id, ref),
    ).fetchone():
        return 0
    paid = 0
    cap, settled, state = _escrow(conn, lease, now)
    for node_id, cost in conn.execute(
        "SELECT node_id, cost_micros FROM billing WHERE lease_id = ? ORDER BY node_id",
        (lease.lease_id,),
    ).fetchall():
        charge = max(0, min(int(cost), cap - settled - paid))
        if state == "released":
            # No escrow holds it (ledger.escrow off): from the balance, as settle does.
            (balance,) = conn.execute(
                "SELECT COALESCE(MAX(balance_micros), 0) FROM accounts WHERE buyer = ?",
                (lease.buyer,),
            ).fetchone()
            charge = max(0, min(charge, balance))
            if charge:
                conn.execute(
                    "UPDATE accounts SET balance_micros = balance_micros - ? WHERE buyer = ?",
                    (charge, lease.buyer),
                )
                conn.execute(
                    "UPDATE escrow SET reserved_micros = reserved_micros + ? WHERE lease_id = ?",
                    (charge, lease.lease_id),
                )
                _entry(
                    conn,
                    "reserve",
                    charge,
                    now,
                    buyer=lease.buyer,
                    lease_id=lease.lease_id,
                    reason="verified copy, no escrow",
                    ref=ref,
                )
        if not charge:
            continue
        conn.execute(
            "UPDATE escrow SET settled_micros = settled_micros + ? WHERE lease_id = ?",
            (charge, lease.lease_id),
        )
        conn.execute(
            "INSERT INTO earnings (node_id, micros) VALUES (?, ?)"
            " ON CONFLICT(node_id) DO UPDATE SET micros = earnings.micros + excluded.micros",
            (node_id, charge),
        )
        _entry(
            conn,
            "settle",
            charge,
            now,
            buyer=lease.buyer,
            node_id=node_id,
            lease_id=lease.lease_id,
            reason="verified copy",
            ref=ref,
        )
        paid += charge
    if not paid:
        # Nothing billed yet: a marker so a retry still pays nothing twice.
        _entry(conn, "settle", 0, now, buyer=lease.buyer, lease_id=lease.lease_id, ref=ref)
    return paid


# -- many records in one transaction (scheduler/usage_ingest.py) ---------------------

# Rows named per IN (...) list: far below SQLite's and PostgreSQL's parameter limits.
IN_CHUNK = 500


def chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    """``values`` in slices of at most ``size`` (for ``IN (?, ?, ...)`` lists)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def marks(count: int) -> str:
    """``?, ?, ?`` for an IN list of ``count`` values."""
    return ", ".join("?" * count)


@dataclass
class _Escrow:
    """One escrow row as a batch sees it: as read (``base``), and as changed since."""

    buyer: str
    cap: int
    reserved: int
    settled: int
    released: int
    unbilled: int
    state: str
    final_seen: int
    ended_ns: int | None
    base: tuple[int, int, int, int] = (0, 0, 0, 0)  # reserved, settled, released, unbilled
    created_ns: int | None = None  # set when the batch creates the row (_escrow's insert)
    dirty: bool = False


@dataclass
class _Billing:
    price: int
    gpu_ns: int
    cost: int
    dirty: bool = False


@dataclass
class SettlementBatch:
    """``settle``, ``final_record`` and ``release`` for the records of one report.

    The same arithmetic, in the same order, as calling those functions once per
    record, but against an in-memory copy of the rows they touch: each billing,
    escrow, verify_copies and accounts row is read once (the rows of the leases
    given up front in one query per table, on first use), and each changed row is
    written once by ``flush``, the ledger entries with one ``executemany`` in the
    order the per-record calls would have written them (so their entry ids are the
    same too). Money columns are written as deltas to what was read. Nothing
    outlives the transaction: a retried transaction builds a new batch.
    """

    conn: Conn
    now: int
    leases: Iterable[LeaseRow] = ()
    node_id: str = ""  # billing rows of (lease, node_id) are read with the leases
    _wanted: dict[str, LeaseRow] = field(default_factory=dict)
    _loaded: bool = False
    _billing: dict[tuple[str, str], _Billing | None] = field(default_factory=dict)
    _holds: dict[str, str | None] = field(default_factory=dict)
    _escrows: dict[str, _Escrow | None] = field(default_factory=dict)
    _created: list[str] = field(default_factory=list)
    _balances: dict[str, int | None] = field(default_factory=dict)
    _balance_delta: dict[str, int] = field(default_factory=dict)
    _earnings: dict[str, int] = field(default_factory=dict)
    _entries: list[tuple[object, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._wanted = {lease.lease_id: lease for lease in self.leases}

    # -- reads -------------------------------------------------------------------------

    def _load(self) -> None:
        """The rows of every lease named up front, one query per table."""
        if self._loaded:
            return
        self._loaded = True
        ids = sorted(self._wanted)
        for part in chunks(ids):
            for lease_id, price, gpu_ns, cost in self.conn.execute(
                "SELECT lease_id, price_micros_per_gpu_hour, gpu_ns, cost_micros FROM billing"  # noqa: S608 - only ? marks
                f" WHERE node_id = ? AND lease_id IN ({marks(len(part))})",
                (self.node_id, *part),
            ).fetchall():
                self._billing[(str(lease_id), self.node_id)] = _Billing(
                    int(price), int(gpu_ns), int(cost)
                )
            for copy_id, paid in self.conn.execute(
                f"SELECT copy_id, paid FROM verify_copies WHERE copy_id IN ({marks(len(part))})",  # noqa: S608 - only ? marks
                tuple(part),
            ).fetchall():
                self._holds[str(copy_id)] = _hold_of(paid)
            for row in self.conn.execute(
                "SELECT lease_id, buyer, cap_micros, reserved_micros, settled_micros,"  # noqa: S608 - only ? marks
                " released_micros, unbilled_micros, state, final_seen, ended_ns FROM escrow"
                f" WHERE lease_id IN ({marks(len(part))})",
                tuple(part),
            ).fetchall():
                self._escrows[str(row[0])] = _escrow_of(row[1:])
        for lease_id in ids:
            self._billing.setdefault((lease_id, self.node_id), None)
            self._holds.setdefault(lease_id, None)
            self._escrows.setdefault(lease_id, None)

    def _hold(self, lease_id: str) -> str | None:
        """``verify_hold``."""
        self._load()
        if lease_id not in self._holds:
            row = self.conn.execute(
                "SELECT paid FROM verify_copies WHERE copy_id = ?", (lease_id,)
            ).fetchone()
            self._holds[lease_id] = None if row is None else _hold_of(row[0])
        return self._holds[lease_id]

    def _escrow_row(self, lease_id: str) -> _Escrow | None:
        self._load()
        if lease_id not in self._escrows:
            row = self.conn.execute(
                "SELECT buyer, cap_micros, reserved_micros, settled_micros, released_micros,"
                " unbilled_micros, state, final_seen, ended_ns FROM escrow WHERE lease_id = ?",
                (lease_id,),
            ).fetchone()
            self._escrows[lease_id] = None if row is None else _escrow_of(row)
        return self._escrows[lease_id]

    def _escrow(self, lease: LeaseRow) -> _Escrow:
        """``_escrow``: the lease's escrow, created ('released', nothing reserved) if missing."""
        found = self._escrow_row(lease.lease_id)
        if found is None:
            cap = reservation_micros(
                lease.price_micros_per_gpu_hour, lease.gpu_count, lease.max_duration_s
            )
            found = _Escrow(lease.buyer, cap, 0, 0, 0, 0, "released", 0, None, created_ns=self.now)
            self._escrows[lease.lease_id] = found
            self._created.append(lease.lease_id)
        return found

    def _billing_row(self, lease: LeaseRow, node_id: str, price: int) -> _Billing:
        """``INSERT OR IGNORE`` then ``SELECT`` of the (lease, node) billing row."""
        key = (lease.lease_id, node_id)
        self._load()
        if key not in self._billing:
            row = self.conn.execute(
                "SELECT price_micros_per_gpu_hour, gpu_ns, cost_micros FROM billing"
                " WHERE lease_id = ? AND node_id = ?",
                key,
            ).fetchone()
            self._billing[key] = (
                None if row is None else _Billing(int(row[0]), int(row[1]), int(row[2]))
            )
        found = self._billing[key]
        if found is None:
            found = self._billing[key] = _Billing(price, 0, 0)
        return found

    def _balance(self, buyer: str) -> int | None:
        """The buyer's balance (None: no account row)."""
        if buyer not in self._balances:
            # Every buyer this batch may touch, in one query.
            buyers = {lease.buyer for lease in self._wanted.values()}
            buyers |= {e.buyer for e in self._escrows.values() if e is not None}
            todo = sorted((buyers | {buyer}) - set(self._balances))
            for part in chunks(todo):
                for name, balance in self.conn.execute(
                    "SELECT buyer, balance_micros FROM accounts"  # noqa: S608 - only ? marks
                    f" WHERE buyer IN ({marks(len(part))})",
                    tuple(part),
                ).fetchall():
                    self._balances[str(name)] = int(balance)
            for name in todo:
                self._balances.setdefault(name, None)
        return self._balances[buyer]

    def _add_balance(self, buyer: str, micros: int) -> None:
        """``UPDATE accounts SET balance_micros = balance_micros + ? WHERE buyer = ?``."""
        balance = self._balance(buyer)
        if balance is None:
            return  # no row: the UPDATE changes nothing
        self._balances[buyer] = balance + micros
        self._balance_delta[buyer] = self._balance_delta.get(buyer, 0) + micros

    def _entry(
        self,
        kind: str,
        amount: int,
        *,
        buyer: str = "",
        node_id: str = "",
        lease_id: str = "",
        reason: str = "",
        ref: str = "",
    ) -> None:
        self._entries.append((self.now, kind, buyer, node_id, lease_id, amount, reason, ref))

    # -- the per-record operations, in memory ---------------------------------------------

    def settle(self, lease: LeaseRow, node_id: str, gpu_ns: int, ref: str = "") -> Settlement:
        """``settle(conn, lease, node_id, gpu_ns, now, ref)``, step for step."""
        price = lease.accepted_price_micros_per_gpu_hour
        if price is None:
            price = lease.price_micros_per_gpu_hour
        billing = self._billing_row(lease, node_id, price)
        total_ns = billing.gpu_ns + gpu_ns
        new_cost = cost_micros(billing.price, total_ns)
        delta = new_cost - billing.cost
        billing.gpu_ns, billing.cost, billing.dirty = total_ns, new_cost, True
        if self._hold(lease.lease_id) is not None:
            return Settlement(0, 0)
        escrow = self._escrow(lease)
        charge = min(delta, escrow.cap - escrow.settled)
        if escrow.state == "released":
            balance = self._balance(lease.buyer) or 0
            charge = max(0, min(charge, balance))
            if charge:
                self._add_balance(lease.buyer, -charge)
                escrow.reserved += charge
                self._entry(
                    "reserve",
                    charge,
                    buyer=lease.buyer,
                    lease_id=lease.lease_id,
                    reason="usage after release",
                    ref=ref,
                )
        charge = max(charge, 0)
        unbilled = delta - charge
        escrow.dirty |= bool(charge or unbilled)
        if charge:
            escrow.settled += charge
            self._earnings[node_id] = self._earnings.get(node_id, 0) + charge
            self._entry(
                "settle",
                charge,
                buyer=lease.buyer,
                node_id=node_id,
                lease_id=lease.lease_id,
                ref=ref,
            )
        if unbilled:
            escrow.unbilled += unbilled
            log.warning(
                "usage beyond what the lease can be charged; not billed",
                extra={"lease_id": lease.lease_id, "node_id": node_id, "unbilled_micros": unbilled},
            )
        return Settlement(charge, unbilled)

    def final_record(self, lease_id: str) -> int:
        """``final_record(conn, lease_id, now)``."""
        escrow = self._escrow_row(lease_id)
        if escrow is None:
            return 0
        escrow.final_seen, escrow.dirty = 1, True
        if escrow.ended_ns is not None:
            return self.release(lease_id, "final usage record")
        return 0

    def release(self, lease_id: str, reason: str) -> int:
        """``release(conn, lease_id, now, reason)``."""
        if self._hold(lease_id) == "held":
            return 0
        escrow = self._escrow_row(lease_id)
        if escrow is None or escrow.state == "released":
            return 0
        held = escrow.reserved - escrow.settled - escrow.released
        escrow.released += held
        escrow.state, escrow.dirty = "released", True
        self._add_balance(escrow.buyer, held)
        self._entry("release", held, buyer=escrow.buyer, lease_id=lease_id, reason=reason)
        return held

    # -- writes --------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every changed row once (sorted by key, so replicas lock in one order)."""
        conn = self.conn
        billing = [
            (lease_id, node_id, b.price, b.gpu_ns, b.cost)
            for (lease_id, node_id), b in sorted(self._billing.items())
            if b is not None and b.dirty
        ]
        if billing:
            conn.executemany(
                "INSERT INTO billing (lease_id, node_id, price_micros_per_gpu_hour, gpu_ns,"
                " cost_micros) VALUES (?, ?, ?, ?, ?) ON CONFLICT (lease_id, node_id)"
                " DO UPDATE SET gpu_ns = excluded.gpu_ns, cost_micros = excluded.cost_micros",
                billing,
            )
        created = []
        for lease_id in self._created:
            e = self._escrows[lease_id]
            assert e is not None
            created.append(
                (
                    lease_id,
                    e.buyer,
                    e.cap,
                    e.reserved,
                    e.settled,
                    e.released,
                    e.unbilled,
                    e.state,
                    e.final_seen,
                    e.ended_ns,
                    e.created_ns,
                )
            )
        if created:
            conn.executemany(
                "INSERT INTO escrow (lease_id, buyer, cap_micros, reserved_micros, settled_micros,"
                " released_micros, unbilled_micros, state, final_seen, ended_ns, created_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                created,
            )
        changed = []
        for lease_id, e in sorted(self._escrows.items()):
            if e is None or not e.dirty or e.created_ns is not None:
                continue
            reserved, settled, released, unbilled = e.base
            changed.append(
                (
                    e.reserved - reserved,
                    e.settled - settled,
                    e.released - released,
                    e.unbilled - unbilled,
                    e.state,
                    e.final_seen,
                    lease_id,
                )
            )
        if changed:
            conn.executemany(
                "UPDATE escrow SET reserved_micros = reserved_micros + ?,"
                " settled_micros = settled_micros + ?, released_micros = released_micros + ?,"
                " unbilled_micros = unbilled_micros + ?, state = ?, final_seen = ?"
                " WHERE lease_id = ?",
                changed,
            )
        balances = [(d, buyer) for buyer, d in sorted(self._balance_delta.items()) if d]
        if balances:
            conn.executemany(
                "UPDATE accounts SET balance_micros = balance_micros + ? WHERE buyer = ?", balances
            )
        earned = [(node_id, m) for node_id, m in sorted(self._earnings.items()) if m]
        if earned:
            conn.executemany(
                "INSERT INTO earnings (node_id, micros) VALUES (?, ?) ON CONFLICT(node_id)"
                " DO UPDATE SET micros = earnings.micros + excluded.micros",
                earned,
            )
        if self._entries:
            conn.executemany(
                "INSERT INTO ledger_entries (ts_ns, kind, buyer, node_id, lease_id,"
                " amount_micros, reason, ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                self._entries,
            )


def _hold_of(paid: object) -> str | None:
    """``verify_hold`` from a verify_copies row's ``paid``."""
    if paid == 1:
        return None
    return "held" if paid is None else "not_paid"


def _escrow_of(row: Sequence[Any]) -> _Escrow:
    buyer, cap, reserved, settled, released, unbilled, state, final_seen, ended_ns = row
    amounts = (int(reserved), int(settled), int(released), int(unbilled))
    return _Escrow(
        str(buyer),
        int(cap),
        *amounts,
        state=str(state),
        final_seen=int(final_seen),
        ended_ns=None if ended_ns is None else int(ended_ns),
        base=amounts,
    )


# -- providers ------------------------------------------------------------------------


def earnings(conn: Conn, node_id: str) -> int:
    row = conn.execute("SELECT micros FROM earnings WHERE node_id = ?", (node_id,)).fetchone()
    return int(row[0]) if row else 0


def collateral(conn: Conn, node_id: str) -> Collateral | None:
    row = conn.execute(
        "SELECT staked_micros, slashed_micros, uptime_commitment_ratio, committed_ns,"
        " last_uptime_slash_ns FROM collateral WHERE node_id = ?",
        (node_id,),
    ).fetchone()
    return Collateral(node_id, *row) if row else None


def stake(
    conn: Conn,
    node_id: str,
    micros: int,
    now: int,
    uptime_commitment: float | None = None,
) -> Collateral:
    """Add to the node's recorded stake; set its uptime commitment (0..1) if given.

    A new commitment restarts the uptime measurement: the node answers for the
    uptime it promised from the moment it promised it.
    """
    _check_amount("amount", micros, allow_zero=True)
    if micros > MAX_CREDIT_MICROS:
        raise LedgerError(f"amount: at most {MAX_CREDIT_MICROS} micros per stake, got {micros}")
    if uptime_commitment is not None and not (
        math.isfinite(uptime_commitment) and 0.0 <= uptime_commitment <= 1.0
    ):
        raise LedgerError(f"uptime commitment {uptime_commitment} is not within 0..1")
    found = collateral(conn, node_id)
    if found is not None and found.staked_micros + micros > MAX_TOTAL_MICROS:
        raise LedgerError(f"amount: the node's stake would pass {MAX_TOTAL_MICROS} micros")
    conn.execute(
        "INSERT OR IGNORE INTO collateral (node_id, committed_ns) VALUES (?, ?)", (node_id, now)
    )
    conn.execute(
        "UPDATE collateral SET staked_micros = staked_micros + ? WHERE node_id = ?",
        (micros, node_id),
    )
    if uptime_commitment is not None:
        conn.execute(
            "UPDATE collateral SET uptime_commitment_ratio = ?, committed_ns = ? WHERE node_id = ?",
            (uptime_commitment, now, node_id),
        )
    reason = f"uptime commitment {uptime_commitment:g}" if uptime_commitment is not None else ""
    _entry(conn, "stake", micros, now, node_id=node_id, reason=reason)
    found = collateral(conn, node_id)
    assert found is not None
    log.info("stake recorded", extra={"node_id": node_id, "micros": micros})
    return found


def slash(conn: Conn, node_id: str, micros: int, now: int, reason: str, ref: str = "") -> int:
    """Take up to ``micros`` of the node's available stake; returns what was taken.

    With ``ref`` (e.g. the failed challenge's id) a repeat for the same ref takes
    nothing, so a caller told about one failure twice slashes once.
    """
    if (
        ref
        and conn.execute(
            "SELECT 1 FROM ledger_entries WHERE kind = 'slash' AND node_id = ? AND ref = ?",
            (node_id, ref),
        ).fetchone()
    ):
        return 0
    found = collateral(conn, node_id)
    amount = min(max(micros, 0), found.available_micros if found else 0)
    if amount <= 0:
        log.warning(
            "slash found no collateral to take",
            extra={"node_id": node_id, "wanted_micros": micros, "reason": reason},
        )
        return 0
    conn.execute(
        "UPDATE collateral SET slashed_micros = slashed_micros + ? WHERE node_id = ?",
        (amount, node_id),
    )
    _entry(conn, "slash", amount, now, node_id=node_id, reason=reason, ref=ref)
    log.warning(
        "collateral slashed", extra={"node_id": node_id, "micros": amount, "reason": reason}
    )
    return amount


def collateral_ok(conn: Conn, node_id: str, policy: LedgerPolicy) -> bool:
    """True when the node's unslashed stake meets ``ledger.min_collateral``."""
    if policy.min_collateral_micros <= 0:
        return True
    found = collateral(conn, node_id)
    return found is not None and found.available_micros >= policy.min_collateral_micros


def check_uptime(
    conn: Conn,
    node_id: str,
    measured_ratio: float,
    now: int,
    window_ns: int,
    policy: LedgerPolicy,
) -> int:
    """Slash once per window when measured uptime is below the node's commitment."""
    found = collateral(conn, node_id)
    if found is None or found.uptime_commitment_ratio <= 0:
        return 0
    if measured_ratio >= found.uptime_commitment_ratio:
        return 0
    last = found.last_uptime_slash_ns
    if last is not None and now - last < window_ns:
        return 0  # already slashed for this window
    conn.execute("UPDATE collateral SET last_uptime_slash_ns = ? WHERE node_id = ?", (now, node_id))
    return slash(
        conn,
        node_id,
        policy.slash_uptime_micros,
        now,
        f"uptime {measured_ratio:.4f} below the committed {found.uptime_commitment_ratio:.4f}",
    )


ClockNs = Callable[[], int]


class HookTarget(Protocol):
    """What ``LeaseHooks.register`` needs of the lease store."""

    def add_hooks(
        self,
        *,
        on_submitted: Callable[[Conn, LeaseRow], None] | None = None,
        on_terminal: Callable[[Conn, LeaseRow], None] | None = None,
        refusals: tuple[type[BaseException], ...] = (),
    ) -> None: ...


class LeaseHooks:
    """The escrow side of the lease store's transactions (``LeaseStore.add_hooks``)."""

    def __init__(self, policy: LedgerPolicy, clock_ns: ClockNs) -> None:
        self.policy = policy
        self.clock_ns = clock_ns

    def on_submitted(self, conn: Conn, lease: LeaseRow) -> None:
        if lease.spec.verify.replicas > 1:
            return  # a redundant run's parent: each of its copies reserves its own
        reserve(conn, lease, self.clock_ns(), self.policy)

    def on_terminal(self, conn: Conn, lease: LeaseRow) -> None:
        lease_ended(conn, lease, self.clock_ns())

    def register(self, store: HookTarget) -> None:
        store.add_hooks(
            on_submitted=self.on_submitted, on_terminal=self.on_terminal, refusals=(LedgerError,)
        )
