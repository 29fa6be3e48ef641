"""Leases in the scheduler's database: rows, transitions, history, attempts.

Every method is one transaction on the Database thread, so a state change, its
history event and the ledger hooks commit together or not at all. Guarded
UPDATEs (``WHERE state = ...``) make concurrent paths (an agent's update, a
buyer's cancel, a placement timeout) safe without locks: the loser's UPDATE
matches no row and it sees the winner's state.

Ledger hooks: ``on_submitted(conn, row)`` runs inside Submit's transaction and
``on_terminal(conn, row)`` inside the transaction that ends a lease. A submit
hook refuses a lease by raising one of the ``refusals`` exception types given
with it (e.g. the ledger's insufficient-balance error); Submit then fails with
that message and nothing is stored. On PostgreSQL a plain lease's Submit runs READ
COMMITTED (``Database.call_locked``): a submit hook locks what it reads to decide a
write (``FOR UPDATE``) or writes guarded, as ``ledger.reserve`` does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from gpuagent.v1 import common_pb2, leases_pb2

from . import outputs_store
from .db import Database, DatabaseError
from .secretbox import SecretBox
from .storage import Conn, lock_key

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Hook = Callable[[Conn, "LeaseRow"], None]

PENDING = "pending"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired", "lost", "rejected"})
# Failed offers that count against placement.max_attempts.
FAILED_OFFERS = ("rejected", "timeout", "unreachable")
# storage.lock_key space of the per-node offer locks (beside db.MIGRATION_LOCK and
# replicas.LEADER_LOCK, which are single 64-bit keys: a different lock space).
OFFER_LOCKS = 0x6F66_6672  # "offr"

_COLUMNS = (
    "lease_id, buyer, spec, gpu_count, price_micros_per_gpu_hour,"
    " accepted_price_micros_per_gpu_hour, max_duration_s, pinned_node_id, replace_on_lost,"
    " node_id, gpu_uuids_json, state, exit_code, reason, log_tail, container_id,"
    " last_update_seq, created_ns, updated_ns, placed_ns, started_ns, ended_ns,"
    " cancel_requested_ns, attempts, expires_at_ns, registry_auth_enc,"
    " endpoints_pb, restarts"
)


def state_name(state: int) -> str:
    """``LEASE_STATE_RUNNING`` -> ``running``; unknown values -> ``unspecified``."""
    try:
        return common_pb2.LeaseState.Name(state).removeprefix("LEASE_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unspecified"


def state_value(name: str) -> common_pb2.LeaseState.ValueType:
    return common_pb2.LeaseState.Value("LEASE_STATE_" + name.upper())


class LeaseRefused(Exception):
    """A submit hook refused the lease (e.g. insufficient balance); the message says why."""


class IdempotencyConflict(Exception):
    """The idempotency key was used before for a different spec."""


@dataclass
class LeaseRow:
    lease_id: str
    buyer: str
    spec: leases_pb2.LeaseSpec
    gpu_count: int
    price_micros_per_gpu_hour: int
    accepted_price_micros_per_gpu_hour: int | None
    max_duration_s: int
    pinned_node_id: str
    replace_on_lost: bool
    node_id: str | None
    gpu_uuids: list[str]
    state: str
    exit_code: int | None
    reason: str
    log_tail: str
    container_id: str
    last_update_seq: int
    created_ns: int
    updated_ns: int
    placed_ns: int | None
    started_ns: int | None
    ended_ns: int | None
    cancel_requested_ns: int | None
    attempts: int
    expires_at_ns: int
    # The spec's registry_auth, sealed (secretbox); row.spec never holds it.
    registry_auth_enc: bytes | None = None
    # The latest endpoints the node reported (serialized in a Lease), and restarts.
    endpoints_pb: bytes | None = None
    restarts: int = 0
    rowid: int = 0  # set by list_leases, for paging

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_db(cls, row: Sequence[object]) -> LeaseRow:
        spec = leases_pb2.LeaseSpec()
        spec.ParseFromString(row[2])  # type: ignore[arg-type]
        return cls(
            lease_id=str(row[0]),
            buyer=str(row[1]),
            spec=spec,
            gpu_count=int(row[3]),  # type: ignore[call-overload]
            price_micros_per_gpu_hour=int(row[4]),  # type: ignore[call-overload]
            accepted_price_micros_per_gpu_hour=row[5],  # type: ignore[arg-type]
            max_duration_s=int(row[6]),  # type: ignore[call-overload]
            pinned_node_id=str(row[7]),
            replace_on_lost=bool(row[8]),
            node_id=row[9],  # type: ignore[arg-type]
            gpu_uuids=json.loads(str(row[10])),
            state=str(row[11]),
            exit_code=row[12],  # type: ignore[arg-type]
            reason=str(row[13]),
            log_tail=str(row[14]),
            container_id=str(row[15]),
            last_update_seq=int(row[16]),  # type: ignore[call-overload]
            created_ns=int(row[17]),  # type: ignore[call-overload]
            updated_ns=int(row[18]),  # type: ignore[call-overload]
            placed_ns=row[19],  # type: ignore[arg-type]
            started_ns=row[20],  # type: ignore[arg-type]
            ended_ns=row[21],  # type: ignore[arg-type]
            cancel_requested_ns=row[22],  # type: ignore[arg-type]
            attempts=int(row[23]),  # type: ignore[call-overload]
            expires_at_ns=int(row[24]),  # type: ignore[call-overload]
            registry_auth_enc=bytes(row[25]) if row[25] is not None else None,  # type: ignore[call-overload]
            endpoints_pb=bytes(row[26]) if row[26] is not None else None,  # type: ignore[call-overload]
            restarts=int(row[27] or 0),  # type: ignore[call-overload]
        )

    def to_proto(self, events: Iterable[leases_pb2.LeaseEvent] = ()) -> leases_pb2.Lease:
        spec = leases_pb2.LeaseSpec()
        spec.CopyFrom(self.spec)
        spec.ClearField("registry_auth")  # a credential: stored for the agent, never shown
        lease = leases_pb2.Lease(
            lease_id=self.lease_id,
            spec=spec,
            state=state_value(self.state),
            node_id=self.node_id or "",
            gpu_uuids=self.gpu_uuids,
            created_at_unix_nanos=self.created_ns,
            updated_at_unix_nanos=self.updated_ns,
            reason=self.reason,
            expires_at_unix_nanos=self.expires_at_ns,
            buyer=self.buyer,
            attempts=self.attempts,
            replace_on_lost=self.replace_on_lost,
            accepted_price_micro_per_gpu_hour=self.accepted_price_micros_per_gpu_hour or 0,
            events=events,
            started_at_unix_nanos=self.started_ns or 0,
            ended_at_unix_nanos=self.ended_ns or 0,
        )
        if self.exit_code is not None:
            lease.exit_code = self.exit_code
        if self.endpoints_pb:
            held = leases_pb2.Lease()
            held.ParseFromString(self.endpoints_pb)
            lease.endpoints.extend(held.endpoints)
        lease.restarts = self.restarts
        return lease


@dataclass(frozen=True)
class PlacementView:
    """What a placement pass reads (LeaseStore.placement_view)."""

    pending: list[LeaseRow]  # to place, oldest first
    holding: list[LeaseRow]  # placed, not ended: what holds GPUs
    tried: dict[str, set[str]]  # pending lease -> nodes it was offered to
    copies: frozenset[str]  # pending leases that are a redundant run's copies
    # A copy's lease ended and its verify row is still open: the verifier's sweep has
    # work (a pass runs it only then).
    copies_ended: bool


@dataclass(frozen=True)
class NewLease:
    lease_id: str
    buyer: str
    spec: leases_pb2.LeaseSpec
    pinned_node_id: str = ""
    replace_on_lost: bool = False


class UpdateOutcome(Enum):
    APPLIED = "applied"  # stored; the lease changed
    DUPLICATE = "duplicate"  # seq already stored; ack again, change nothing
    REJECTED = "rejected"  # the node refused the offer; the lease is pending again (or ended)
    FOREIGN = "foreign"  # the lease is not (or no longer) placed on this node
    ENDED = "ended"  # the scheduler already ended the lease; the update changes nothing
    UNKNOWN = "unknown"  # no such lease


@dataclass
class UpdateResult:
    outcome: UpdateOutcome
    row: LeaseRow | None = None
    previous_state: str = ""


@dataclass
class CancelResult:
    row: LeaseRow
    # Where a LeaseCancel must go (the lease runs or is being offered there); None = done here.
    notify_node: str | None = None


@dataclass
class _Hooks:
    on_submitted: list[Hook] = field(default_factory=list)
    on_terminal: list[Hook] = field(default_factory=list)
    refusals: tuple[type[BaseException], ...] = ()


class LeaseStore:
    def __init__(
        self, db: Database, clock: Clock = time.time, secrets: SecretBox | None = None
    ) -> None:
        self.db = db
        self.clock = clock
        self.secrets = secrets
        self._hooks = _Hooks()
        # Leases by state, kept current after each commit, for metrics scrapes.
        self.counts: dict[str, int] = {}

    def assign_spec(self, row: LeaseRow) -> leases_pb2.LeaseSpec:
        """The spec as the placed node gets it: with the registry credential unsealed.
        Only the LeaseAssign to that node carries it; no read API ever does."""
        if row.registry_auth_enc is None or self.secrets is None:
            return row.spec
        spec = leases_pb2.LeaseSpec()
        spec.CopyFrom(row.spec)
        spec.registry_auth.ParseFromString(self.secrets.open(row.registry_auth_enc, row.lease_id))
        return spec

    # -- hooks ---------------------------------------------------------------------

    def add_hooks(
        self,
        *,
        on_submitted: Hook | None = None,
        on_terminal: Hook | None = None,
        refusals: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Run ``on_submitted`` / ``on_terminal`` inside the lease's transactions.

        ``refusals``: exception types an ``on_submitted`` hook raises to refuse a
        lease; Submit reports them as a failed precondition with their message.
        """
        if on_submitted is not None:
            self._hooks.on_submitted.append(on_submitted)
        if on_terminal is not None:
            self._hooks.on_terminal.append(on_terminal)
        self._hooks.refusals += refusals

    # -- helpers on the database thread ---------------------------------------------

    def _now(self) -> int:
        return round(self.clock() * 1e9)

    @staticmethod
    def _get(conn: Conn, lease_id: str) -> LeaseRow | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM leases WHERE lease_id = ?",  # noqa: S608 - constant columns
            (lease_id,),
        ).fetchone()
        return LeaseRow.from_db(row) if row else None

    @staticmethod
    def _event(
        conn: Conn,
        lease_id: str,
        state: str,
        reason: str,
        node: str | None,
        ts: int,
        *,
        first: bool = False,
    ) -> None:
        """Record the lease's next event."""
        params: tuple[object, ...]
        if first:  # a lease just inserted: seq 1, no events to read (``_insert``)
            seq, params = "1", (lease_id, state, reason, node, ts)
        else:
            seq = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM lease_events WHERE lease_id = ?)"
            params = (lease_id, lease_id, state, reason, node, ts)
        conn.execute(
            "INSERT INTO lease_events (lease_id, seq, state, reason, node_id, ts_ns)"  # noqa: S608 - seq is one of two constants
            f" VALUES (?, {seq}, ?, ?, ?, ?)",
            params,
        )

    @staticmethod
    def _attempt(conn: Conn, lease_id: str, node: str, outcome: str, reason: str, ts: int) -> None:
        conn.execute(
            "INSERT INTO placement_attempts (lease_id, node_id, outcome, reason, ts_ns)"
            " VALUES (?, ?, ?, ?, ?)",
            (lease_id, node, outcome, reason, ts),
        )

    def _transition(
        self,
        conn: Conn,
        lease_id: str,
        state: str,
        reason: str,
        now: int,
        *,
        event_node: str | None = None,
        columns: Mapping[str, object] | None = None,
    ) -> LeaseRow:
        """Set ``state`` (+ columns), record the event, run on_terminal when it ends."""
        columns = {"state": state, "reason": reason, "updated_ns": now, **(columns or {})}
        if state in TERMINAL:
            columns.setdefault("ended_ns", now)
        assignments = ", ".join(f"{name} = ?" for name in columns)
        # RETURNING, not a read after: one round trip less in every transition.
        found = conn.execute(
            f"UPDATE leases SET {assignments} WHERE lease_id = ? RETURNING {_COLUMNS}",  # noqa: S608 - names are ours
            (*columns.values(), lease_id),
        ).fetchone()
        assert found is not None
        row = LeaseRow.from_db(found)
        self._event(conn, lease_id, state, reason, event_node or row.node_id, now)
        if state in TERMINAL:
            for hook in self._hooks.on_terminal:
                hook(conn, row)
        return row

    def _count(self, before: str | None, after: str | None) -> None:
        if before == after:
            return
        if before is not None:
            self.counts[before] = self.counts.get(before, 1) - 1
        if after is not None:
            self.counts[after] = self.counts.get(after, 0) + 1

    # -- reads ---------------------------------------------------------------------

    async def load(self, *, interrupt_offers: bool = True) -> None:
        """Count leases by state and fail offers a previous run left in flight
        (``interrupt_offers``: false when other replicas run, whose offers are live).

        An offer is in memory only (its deadline task); after a restart nobody
        waits for the answer, so the lease goes back to pending. The node, if it
        accepted meanwhile, is told to cancel when it reconnects (its Hello lists
        a lease the scheduler does not have there).
        """
        now = self._now()

        def txn(conn: Conn) -> dict[str, int]:
            if interrupt_offers:
                self._interrupt_offers(conn, now, now + 1, "scheduler restarted")
            return dict(
                conn.execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall()
            )

        self.counts = await self.db.call(txn)

    async def interrupt_stale_offers(self, older_than_s: float) -> list[str]:
        """Offers made more than ``older_than_s`` ago and never answered go back to
        pending: their replica died before the deadline task could settle them (the
        leader runs this; a live replica settles its own within assign_timeout)."""
        now = self._now()
        before = now - round(older_than_s * 1e9)
        return await self.db.call(
            lambda c: self._interrupt_offers(c, now, before, "its scheduler replica went away")
        )

    def _interrupt_offers(self, conn: Conn, now: int, placed_before: int, why: str) -> list[str]:
        stale = conn.execute(
            "SELECT lease_id, node_id FROM leases WHERE state = ? AND node_id IS NOT NULL"
            " AND COALESCE(placed_ns, 0) < ? FOR UPDATE",
            (PENDING, placed_before),
        ).fetchall()
        for lease_id, node_id in stale:
            self._attempt(conn, lease_id, node_id, "interrupted", why, now)
            conn.execute(
                "UPDATE leases SET node_id = NULL, gpu_uuids_json = '[]',"
                " accepted_price_micros_per_gpu_hour = NULL, updated_ns = ?"
                " WHERE lease_id = ?",
                (now, lease_id),
            )
        return [str(r[0]) for r in stale]

    async def get(self, lease_id: str) -> LeaseRow | None:
        return await self.db.call(lambda conn: self._get(conn, lease_id))

    async def events(self, lease_id: str) -> list[leases_pb2.LeaseEvent]:
        def read(conn: Conn) -> list[leases_pb2.LeaseEvent]:
            return [
                leases_pb2.LeaseEvent(
                    state=state_value(s), reason=r, node_id=n or "", at_unix_nanos=ts
                )
                for s, r, n, ts in conn.execute(
                    "SELECT state, reason, node_id, ts_ns FROM lease_events"
                    " WHERE lease_id = ? ORDER BY seq",
                    (lease_id,),
                )
            ]

        return await self.db.call(read)

    async def attempts(self, lease_id: str) -> list[tuple[str, str, str, int]]:
        """(node_id, outcome, reason, ts_ns) per placement attempt, oldest first."""
        return await self.db.call(
            lambda conn: conn.execute(
                "SELECT node_id, outcome, reason, ts_ns FROM placement_attempts"
                " WHERE lease_id = ? ORDER BY rowid",
                (lease_id,),
            ).fetchall()
        )

    async def list_leases(
        self,
        *,
        states: Sequence[str] = (),
        node_id: str = "",
        node_ids: set[str] | None = None,
        buyer: str = "",
        limit: int = 100,
        after_rowid: int = 0,
    ) -> tuple[list[LeaseRow], int]:
        """A page of leases in submit order and the rowid to continue after (0 = end)."""
        where, params = ["rowid > ?"], [after_rowid]
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)  # type: ignore[arg-type]
        if node_id:
            where.append("node_id = ?")
            params.append(node_id)  # type: ignore[arg-type]
        if buyer:
            where.append("buyer = ?")
            params.append(buyer)  # type: ignore[arg-type]
        if node_ids is not None:
            # A provider's view: leases on its own nodes only (none -> nothing).
            where.append(f"node_id IN ({', '.join('?' * len(node_ids)) or 'NULL'})")
            params.extend(sorted(node_ids))  # type: ignore[arg-type]
        sql = (
            f"SELECT rowid, {_COLUMNS} FROM leases WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY rowid LIMIT ?"
        )

        def read(conn: Conn) -> tuple[list[LeaseRow], int]:
            rows = conn.execute(sql, (*params, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            found = []
            for r in rows:
                row = LeaseRow.from_db(r[1:])
                row.rowid = int(r[0])
                found.append(row)
            return found, (rows[-1][0] if more else 0)

        return await self.db.call(read)

    async def placement_view(self) -> PlacementView:
        """What a placement pass reads, in one statement of one snapshot."""

        def read(conn: Conn) -> PlacementView:
            # One statement for both kinds of lease, the redundant runs' copies among
            # them, and whether a copy ended that the verifier has not judged: every pass
            # runs this, and on a loaded host each round trip cost milliseconds
            # (fleet_replicas at 10k: a pass was 4 of them, the verifier's sweep a
            # SERIALIZABLE transaction even with no redundant run anywhere).
            terminal = tuple(TERMINAL)
            marks = ", ".join("?" * len(terminal))
            pending: list[LeaseRow] = []
            holding: list[LeaseRow] = []
            copies: set[str] = set()
            copies_ended = False
            for r in conn.execute(
                f"SELECT {_COLUMNS}, CASE WHEN EXISTS (SELECT 1 FROM verify_copies c"  # noqa: S608
                " WHERE c.copy_id = leases.lease_id) THEN 1 ELSE 0 END FROM leases"
                " WHERE (state = ? AND node_id IS NULL"
                # A redundant run's parent is never placed: its copies are.
                " AND lease_id NOT IN (SELECT parent_id FROM verify_groups))"
                f" OR (node_id IS NOT NULL AND state NOT IN ({marks}))"
                f" OR (state IN ({marks}) AND lease_id IN"
                " (SELECT copy_id FROM verify_copies WHERE ended = 0))"
                " ORDER BY created_ns, lease_id",
                (PENDING, *terminal, *terminal),
            ):
                row = LeaseRow.from_db(r)
                if row.state in TERMINAL:
                    copies_ended = True
                    continue
                (holding if row.node_id is not None else pending).append(row)
                if r[-1] and row.node_id is None:
                    copies.add(row.lease_id)
            tried: dict[str, set[str]] = {}
            if any(row.attempts for row in pending):  # an attempt comes with an offer
                for lease_id, node in conn.execute(
                    "SELECT a.lease_id, a.node_id FROM placement_attempts a"
                    " JOIN leases l ON l.lease_id = a.lease_id"
                    " WHERE l.state = ? AND l.node_id IS NULL",
                    (PENDING,),
                ):
                    tried.setdefault(lease_id, set()).add(node)
            return PlacementView(pending, holding, tried, frozenset(copies), copies_ended)

        # A snapshot: every pass on every replica reads the whole leases table, and as
        # a SERIALIZABLE read it made Submits, offers and updates retry (fleet_replicas
        # at 10k); what it returns is checked again by the offer.
        return await self.db.read(read)

    async def on_node(self, node_id: str) -> list[LeaseRow]:
        """Non-terminal leases placed on ``node_id`` (offers in flight included)."""
        terminal = tuple(TERMINAL)
        return await self.db.call(
            lambda conn: [
                LeaseRow.from_db(r)
                for r in conn.execute(
                    f"SELECT {_COLUMNS} FROM leases WHERE node_id = ?"  # noqa: S608
                    f" AND state NOT IN ({', '.join('?' * len(terminal))})",
                    (node_id, *terminal),
                )
            ]
        )

    async def nodes_with_leases(self) -> set[str]:
        """Nodes holding at least one placed, non-terminal lease (offers excluded)."""
        terminal = tuple(TERMINAL)
        return await self.db.call(
            lambda conn: {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT node_id FROM leases WHERE node_id IS NOT NULL"  # noqa: S608
                    f" AND state != ? AND state NOT IN ({', '.join('?' * len(terminal))})",
                    (PENDING, *terminal),
                )
            }
        )

    async def get_many(self, lease_ids: Sequence[str]) -> dict[str, LeaseRow]:
        if not lease_ids:
            return {}  # most Hellos list no leases: no trip to the database thread

        def read(conn: Conn) -> dict[str, LeaseRow]:
            found = {}
            for lease_id in lease_ids:
                row = self._get(conn, lease_id)
                if row is not None:
                    found[lease_id] = row
            return found

        return await self.db.call(read)

    # -- writes --------------------------------------------------------------------

    def _prepare(self, new: NewLease) -> tuple[bytes, bytes | None]:
        """(spec bytes without its registry credential, the credential sealed)."""
        spec = leases_pb2.LeaseSpec()
        spec.CopyFrom(new.spec)
        sealed: bytes | None = None
        if spec.HasField("registry_auth"):
            if self.secrets is None:
                raise LeaseRefused("this scheduler keeps no secrets: registry_auth is not accepted")
            auth = spec.registry_auth.SerializeToString(deterministic=True)
            sealed = self.secrets.seal(auth, new.lease_id)
            spec.ClearField("registry_auth")
        return spec.SerializeToString(deterministic=True), sealed

    def _insert(
        self, conn: Conn, new: NewLease, spec_bytes: bytes, sealed: bytes | None, now: int
    ) -> LeaseRow | None:
        """Store a new pending lease and run the submit hooks (a refusal raises); None
        when the lease id is taken.

        Writes only, no reads of the leases or their events (the row comes back with
        RETURNING, a new lease's first event is seq 1): on PostgreSQL a SERIALIZABLE
        read here sat on the index pages of the lease placed just before, and one
        Submit in three was run again (fleet_replicas at 10k agents)."""
        found = conn.execute(
            "INSERT INTO leases (lease_id, buyer, spec, gpu_count, price_micros_per_gpu_hour,"  # noqa: S608 - constant columns
            " max_duration_s, pinned_node_id, replace_on_lost, state, created_ns, updated_ns,"
            " registry_auth_enc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT (lease_id) DO NOTHING RETURNING {_COLUMNS}",
            (
                new.lease_id,
                new.buyer,
                spec_bytes,
                new.spec.gpu_count,
                new.spec.price_micro_per_gpu_hour,
                new.spec.max_duration_seconds,
                new.pinned_node_id,
                int(new.replace_on_lost),
                PENDING,
                now,
                now,
                sealed,
            ),
        ).fetchone()
        if found is None:
            return None
        row = LeaseRow.from_db(found)
        self._event(conn, new.lease_id, PENDING, "submitted", None, now, first=True)
        for hook in self._hooks.on_submitted:
            try:
                hook(conn, row)
            except self._hooks.refusals as exc:
                raise LeaseRefused(str(exc)) from exc
        return row

    def insert_in(self, conn: Conn, new: NewLease) -> LeaseRow:
        """A new lease inside the caller's transaction (a redundant run's copies); the
        caller calls ``stored(n)`` once it committed."""
        spec_bytes, sealed = self._prepare(new)
        row = self._insert(conn, new, spec_bytes, sealed, self._now())
        if row is None:
            raise LeaseRefused(f"lease id {new.lease_id!r} is taken")
        return row

    def stored(self, count: int) -> None:
        """``count`` leases stored by ``insert_in`` were committed (metrics, kicks)."""
        for _ in range(count):
            self._count(None, PENDING)

    async def submit(
        self, new: NewLease, *, also: Callable[[Conn, LeaseRow], None] | None = None
    ) -> tuple[LeaseRow, bool]:
        """Store a pending lease; (row, created). A repeat of the same key returns the
        first lease when the request is the same, else raises IdempotencyConflict.
        ``also(conn, row)`` runs in the same transaction after a new lease is stored
        (a redundant run stores its copies there)."""
        spec_bytes, sealed = self._prepare(new)
        now = self._now()

        def txn(conn: Conn) -> tuple[LeaseRow, bool]:
            row = self._insert(conn, new, spec_bytes, sealed, now)
            if row is not None:
                if also is not None:
                    also(conn, row)
                return row, True
            # The key is taken. (On PostgreSQL, by a transaction this one cannot see
            # yet: its INSERT failed serialization instead, and the call runs again.)
            existing = self._get(conn, new.lease_id)
            if existing is None:
                raise DatabaseError(f"lease {new.lease_id!r}: its id is taken but no row found")
            same = (
                existing.spec.SerializeToString(deterministic=True) == spec_bytes
                and existing.buyer == new.buyer
                and existing.pinned_node_id == new.pinned_node_id
                and existing.replace_on_lost == new.replace_on_lost
            )
            if not same:
                raise IdempotencyConflict(
                    f"idempotency key {new.lease_id!r} was already used for a different "
                    "lease request; use a new key"
                )
            return existing, False

        # A plain lease's Submit is writes the guards keep straight (the key's unique
        # index, the escrow's conditional UPDATE or its locked read): READ COMMITTED on
        # PostgreSQL, never run again for meeting the offers and updates of other leases.
        # A redundant run's copies are stored by the verifier's code: SERIALIZABLE.
        call = self.db.call_locked if also is None else self.db.call
        row, created = await call(txn)
        if created:
            self._count(None, PENDING)
        return row, created

    async def give_up(self, lease_id: str, reason: str) -> LeaseRow | None:
        """End a pending, unplaced lease as ``rejected`` (its escrow is released by the
        terminal hooks); None when it was placed or ended meanwhile."""
        now = self._now()

        def txn(conn: Conn) -> LeaseRow | None:
            row = self._get(conn, lease_id)
            if row is None or row.state != PENDING or row.node_id is not None:
                return None
            return self._transition(conn, lease_id, "rejected", reason, now)

        row = await self.db.call(txn)
        if row is not None:
            self._count(PENDING, row.state)
        return row

    async def set_waiting_reason(self, lease_id: str, reason: str) -> None:
        """Why a pending lease is not placed yet (shown to the buyer); no history event."""
        await self.db.call(
            lambda conn: conn.execute(
                "UPDATE leases SET reason = ? WHERE lease_id = ? AND state = ? AND node_id IS NULL",
                (reason, lease_id, PENDING),
            )
        )

    async def offer(
        self, lease_id: str, node_id: str, gpu_uuids: Sequence[str], ask_micros: int, reason: str
    ) -> LeaseRow | None:
        """Reserve the node's GPUs for an offer; None when the lease is no longer placeable
        (cancelled or placed meanwhile) or one of the GPUs was taken meanwhile."""
        now = self._now()

        def txn(conn: Conn) -> LeaseRow | None:
            # The node's lock orders offers to one node across replicas; under it, GPUs
            # another offer or lease holds now (placed by another replica since our
            # placement view was read) refuse this one: it waits for the next pass.
            # Not the node's row lock: every heartbeat flush updates that row, and an
            # offer that met one waited for it, then failed serialization and ran
            # again (fleet_replicas at 10k: offers of 70-110 ms, 23 retries in 50).
            lock_key(conn, OFFER_LOCKS, node_id)
            wanted = set(gpu_uuids)
            for (held,) in conn.execute(
                f"SELECT gpu_uuids_json FROM leases WHERE node_id = ? AND lease_id != ?"  # noqa: S608
                f" AND state NOT IN ({', '.join('?' * len(TERMINAL))})",
                (node_id, lease_id, *TERMINAL),
            ).fetchall():
                if wanted & set(json.loads(str(held))):
                    return None
            found = conn.execute(
                "UPDATE leases SET node_id = ?, gpu_uuids_json = ?,"  # noqa: S608 - constant columns
                " accepted_price_micros_per_gpu_hour = ?, placed_ns = ?, updated_ns = ?,"
                " attempts = attempts + 1, last_update_seq = 0, reason = ?"
                f" WHERE lease_id = ? AND state = ? AND node_id IS NULL RETURNING {_COLUMNS}",
                (
                    node_id,
                    json.dumps(list(gpu_uuids)),
                    ask_micros,
                    now,
                    now,
                    reason,
                    lease_id,
                    PENDING,
                ),
            ).fetchone()
            if found is None:
                return None
            self._attempt(conn, lease_id, node_id, "offered", reason, now)
            return LeaseRow.from_db(found)

        # READ COMMITTED on PostgreSQL: the GPU check reads after the node's lock is
        # held, so it sees the offer that held it before (SERIALIZABLE took its snapshot
        # at the lock statement, before the wait, and failed serialization instead), and
        # the guarded UPDATE lets one of two offers of one lease win.
        return await self.db.call_locked(txn)

    async def offer_failed(
        self, lease_id: str, node_id: str, outcome: str, reason: str, max_attempts: int
    ) -> LeaseRow | None:
        """The offer to ``node_id`` failed: back to pending, or ended when attempts are
        used up (or the lease is pinned). None when the offer was already settled."""
        now = self._now()

        def txn(conn: Conn) -> LeaseRow | None:
            row = self._get(conn, lease_id)
            if row is None or row.state != PENDING or row.node_id != node_id:
                return None
            return self._fail_offer(conn, row, outcome, reason, max_attempts, now)

        row = await self.db.call(txn)
        if row is not None:
            self._count(PENDING, row.state)
        return row

    def _fail_offer(
        self,
        conn: Conn,
        row: LeaseRow,
        outcome: str,
        reason: str,
        max_attempts: int,
        now: int,
    ) -> LeaseRow:
        assert row.node_id is not None
        self._attempt(conn, row.lease_id, row.node_id, outcome, reason, now)
        failures = conn.execute(
            f"SELECT COUNT(*) FROM placement_attempts WHERE lease_id = ?"  # noqa: S608
            f" AND outcome IN ({', '.join('?' * len(FAILED_OFFERS))})",
            (row.lease_id, *FAILED_OFFERS),
        ).fetchone()[0]
        cleared = {
            "node_id": None,
            "gpu_uuids_json": "[]",
            "accepted_price_micros_per_gpu_hour": None,
            "last_update_seq": 0,
        }
        text = f"{row.node_id} {'rejected it' if outcome == 'rejected' else outcome}: {reason}"
        if row.cancel_requested_ns is not None:
            return self._transition(
                conn,
                row.lease_id,
                "cancelled",
                f"cancelled before placement; {text}",
                now,
                event_node=row.node_id,
                columns=cleared,
            )
        if row.pinned_node_id or failures >= max_attempts:
            final = "rejected" if outcome == "rejected" else "failed"
            why = "pinned node" if row.pinned_node_id else f"{failures} placement attempts"
            return self._transition(
                conn,
                row.lease_id,
                final,
                f"gave up after {why}; last: {text}",
                now,
                event_node=row.node_id,
                columns=cleared,
            )
        # Still pending: an event so the buyer sees the attempt in the history.
        return self._transition(
            conn,
            row.lease_id,
            PENDING,
            f"retrying elsewhere; {text}",
            now,
            event_node=row.node_id,
            columns=cleared,
        )

    async def apply_update(
        self, node_id: str, update: leases_pb2.LeaseUpdate, max_attempts: int
    ) -> UpdateResult:
        """Store one LeaseUpdate from ``node_id``; idempotent by (lease_id, update_seq)."""
        now = self._now()
        state = state_name(update.state)

        def txn(conn: Conn) -> UpdateResult:
            row = self._get(conn, update.lease_id)
            if row is None:
                return UpdateResult(UpdateOutcome.UNKNOWN)
            if row.node_id != node_id:
                return UpdateResult(UpdateOutcome.FOREIGN, row, row.state)
            if update.update_seq <= row.last_update_seq:
                return UpdateResult(UpdateOutcome.DUPLICATE, row, row.state)
            if row.terminal:
                return UpdateResult(UpdateOutcome.ENDED, row, row.state)
            if state == "rejected":
                failed = self._fail_offer(
                    conn, row, "rejected", update.reason or "no reason given", max_attempts, now
                )
                return UpdateResult(UpdateOutcome.REJECTED, failed, row.state)
            columns: dict[str, object] = {"last_update_seq": update.update_seq}
            if update.HasField("outputs") and row.spec.outputs:
                # Checked against the node's key by the dispatcher (outputs_store.check).
                outputs_store.store(conn, update.outputs, now)
            if update.HasField("exit_code"):
                columns["exit_code"] = update.exit_code
            if update.log_tail:
                columns["log_tail"] = update.log_tail
            if update.container_id:
                columns["container_id"] = update.container_id
            if update.gpu_uuids:
                columns["gpu_uuids_json"] = json.dumps(list(update.gpu_uuids))
            if update.endpoints or update.restarts:
                # The agent's view of the ports; the url is the coordinator's to fill.
                held = leases_pb2.Lease(endpoints=update.endpoints)
                for endpoint in held.endpoints:
                    endpoint.url = ""
                columns["endpoints_pb"] = held.SerializeToString()
                columns["restarts"] = update.restarts
            if state == "running" and row.started_ns is None:
                columns["started_ns"] = now
                if row.max_duration_s:
                    columns["expires_at_ns"] = now + row.max_duration_s * 1_000_000_000
            if row.state == PENDING:
                self._attempt(conn, row.lease_id, node_id, "accepted", state, now)
            if state == row.state or state == "unspecified":
                # Same state again (e.g. a fresher log tail): no history event.
                assignments = ", ".join(f"{name} = ?" for name in columns)
                found = conn.execute(
                    f"UPDATE leases SET {assignments}, updated_ns = ? WHERE lease_id = ?"  # noqa: S608
                    f" RETURNING {_COLUMNS}",
                    (*columns.values(), now, row.lease_id),
                ).fetchone()
                new = LeaseRow.from_db(found) if found is not None else None
            else:
                new = self._transition(
                    conn, row.lease_id, state, update.reason, now, columns=columns
                )
            return UpdateResult(UpdateOutcome.APPLIED, new, row.state)

        result = await self.db.call(txn)
        if result.outcome in (UpdateOutcome.APPLIED, UpdateOutcome.REJECTED) and result.row:
            self._count(result.previous_state, result.row.state)
        return result

    async def cancel(
        self, lease_id: str, reason: str, connected: Collection[str]
    ) -> CancelResult | None:
        """Cancel: ends a pending lease (or one whose node is not connected) here and now;
        for a placed lease, marks the request and says which node to tell. None: no lease."""
        now = self._now()
        reason = reason or "cancelled by the buyer"

        def txn(conn: Conn) -> tuple[CancelResult, str] | None:
            row = self._get(conn, lease_id)
            if row is None:
                return None
            before = row.state
            if row.terminal:
                return CancelResult(row), before
            node = row.node_id
            if node is None or node not in connected:
                # Nobody to wait for: a disconnected node is told again when its Hello
                # lists the lease (reconciliation), so the lease ends now.
                ended = self._transition(
                    conn, lease_id, "cancelled", reason, now, columns={"cancel_requested_ns": now}
                )
                return CancelResult(ended, node), before
            conn.execute(
                "UPDATE leases SET cancel_requested_ns = COALESCE(cancel_requested_ns, ?),"
                " updated_ns = ? WHERE lease_id = ?",
                (now, now, lease_id),
            )
            self._event(conn, lease_id, row.state, f"cancel requested: {reason}", node, now)
            updated = self._get(conn, lease_id)
            assert updated is not None
            return CancelResult(updated, node), before

        result = await self.db.call(txn)
        if result is None:
            return None
        cancel, before = result
        self._count(before, cancel.row.state)
        return cancel

    async def node_lost(
        self, node_id: str, reason: str, keep: Iterable[str] = ()
    ) -> list[LeaseRow]:
        """End (as lost) or re-queue (``replace_on_lost``) the placed leases on ``node_id``.

        Offers still in flight (pending) are left to their own deadline; ``keep``
        lists lease ids the node still reports.
        """
        now = self._now()
        keep_ids = set(keep)
        terminal = tuple(TERMINAL)

        def txn(conn: Conn) -> list[tuple[str, LeaseRow]]:
            rows = [
                LeaseRow.from_db(r)
                for r in conn.execute(
                    f"SELECT {_COLUMNS} FROM leases WHERE node_id = ? AND state != ?"  # noqa: S608
                    f" AND state NOT IN ({', '.join('?' * len(terminal))})",
                    (node_id, PENDING, *terminal),
                )
            ]
            changed = []
            for row in rows:
                if row.lease_id in keep_ids:
                    continue
                self._attempt(conn, row.lease_id, node_id, "lost", reason, now)
                if row.cancel_requested_ns is not None:
                    new = self._transition(
                        conn, row.lease_id, "cancelled", f"cancelled; node lost: {reason}", now
                    )
                elif row.replace_on_lost:
                    self._event(conn, row.lease_id, "lost", reason, node_id, now)
                    new = self._transition(
                        conn,
                        row.lease_id,
                        PENDING,
                        f"re-placing: lost on {node_id}: {reason}",
                        now,
                        event_node=node_id,
                        columns={
                            "node_id": None,
                            "gpu_uuids_json": "[]",
                            "accepted_price_micros_per_gpu_hour": None,
                            "last_update_seq": 0,
                            "started_ns": None,
                            "expires_at_ns": 0,
                            "exit_code": None,
                            "container_id": "",
                        },
                    )
                else:
                    new = self._transition(conn, row.lease_id, "lost", reason, now)
                changed.append((row.state, new))
            return changed

        changed = await self.db.call(txn)
        for before, row in changed:
            self._count(before, row.state)
        return [row for _, row in changed]
