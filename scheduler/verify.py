"""Redundant runs (``verify: {replicas: N}``, docs/verification.md).

A verified lease is a *parent* that is never placed and N *copies*, each an ordinary
lease with its own escrow (reserved at submit, in the parent's transaction). Copies go
to nodes of distinct provider accounts on distinct hosts (``CopyPlacement``). When the
last copy ends, ``decide`` compares their output digests in one transaction, under
the parent's row lock, so two copies ending at once decide once:

- a majority (at least 2, and more than half of the copies) agrees: the parent
  succeeds; the majority is paid; a copy with another digest is not paid, flagged
  and slashed ``ledger.slash_verify_micros``; a copy without a digest (failed, lost,
  cancelled, no valid commitment) is not paid and not slashed;
- 2 copies and no majority, at least one digest: ONE tie-break copy on a third
  provider, then the same rule over the 3;
- otherwise the parent fails ``results_disagree``, nobody is paid, every copy's
  escrow goes back to the buyer.

Copies are held until then: their usage is billed but not paid (ledger.verify_hold).
Every payout is idempotent (ledger refs ``verify:<copy>``); the group's state changes
once (guarded UPDATE), so a re-sent update decides nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gpuagent.v1 import leases_pb2, nodes_pb2

from . import ledger, outputs_store, placement
from .leases_store import TERMINAL, LeaseRefused, LeaseRow, LeaseStore, NewLease, state_value
from .registry import Registry
from .storage import Conn

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Slashed = Callable[[str, "ledger.Collateral | None"], None]

# A copy that succeeded but whose terminal update never reached this scheduler's
# listener (a restart between the two): after this long its digest counts as absent.
SUCCEEDED_GRACE_S = 60.0


def provider_of(registry: Registry, node_id: str) -> str:
    """The provider account a node is bound to; an unbound node (open registration)
    stands for itself, so verification is only as strong as enrolment."""
    record = registry.nodes.get(node_id)
    owner = record.owner if record is not None else ""
    return owner or f"node:{node_id}"


def host_of(registry: Registry, node_id: str) -> str:
    record = registry.nodes.get(node_id)
    hostname = record.inventory.host.hostname if record is not None else ""
    return f"host:{hostname}" if hostname else f"node:{node_id}"


def copy_ids(parent_id: str, count: int, start: int = 1) -> list[str]:
    """Ids of a parent's copies: within the lease-id rule for any parent id."""
    tag = hashlib.sha256(parent_id.encode()).hexdigest()[:8]
    return [f"{parent_id[:100]}.{tag}.{n}" for n in range(start, start + count)]


def copy_spec(spec: leases_pb2.LeaseSpec) -> leases_pb2.LeaseSpec:
    """A copy runs the parent's spec without ``verify`` (the coordinator's, not the
    agent's)."""
    out = leases_pb2.LeaseSpec()
    out.CopyFrom(spec)
    out.ClearField("verify")
    return out


@dataclass
class Group:
    parent_id: str
    replicas: int
    state: str
    # copy id -> (role, ended, digest, outcome)
    copies: dict[str, tuple[str, bool, bytes | None, str]] = field(default_factory=dict)


@dataclass
class Decided:
    parent: LeaseRow | None = None  # the parent, ended (succeeded or failed)
    tiebreak: LeaseRow | None = None  # a tie-break copy stored
    slashed: list[tuple[str, ledger.Collateral | None]] = field(default_factory=list)


class CopyPlacement:
    """One placement pass's view of the redundant runs: which providers and hosts each
    group already uses (updated as the pass offers copies), and the gang rule that a
    group's first copies wait until enough distinct providers are eligible."""

    def __init__(self, registry: Registry, groups: dict[str, tuple[str, int, list[str]]]) -> None:
        # copy id -> parent id; parent id -> (placed node ids, unplaced copy ids)
        self.registry = registry
        self.parent_of: dict[str, str] = {}
        self.used: dict[str, list[str]] = {}
        self.unplaced: dict[str, set[str]] = {}
        for copy_id, (parent_id, _n, sibling_nodes) in groups.items():
            self.parent_of[copy_id] = parent_id
            self.used.setdefault(parent_id, sibling_nodes)
            self.unplaced.setdefault(parent_id, set()).add(copy_id)

    def is_copy(self, lease_id: str) -> bool:
        return lease_id in self.parent_of

    def nodes_for(
        self, lease_id: str, nodes: Sequence[placement.NodeView], request: placement.Request
    ) -> tuple[list[placement.NodeView], str]:
        """(the nodes this copy may go to, "" or why it waits)."""
        parent_id = self.parent_of[lease_id]
        used = self.used[parent_id]
        providers = {provider_of(self.registry, n) for n in used}
        hosts = {host_of(self.registry, n) for n in used}
        allowed = [
            n
            for n in nodes
            if provider_of(self.registry, n.node_id) not in providers
            and host_of(self.registry, n.node_id) not in hosts
        ]
        eligible: set[str] = set()
        seen_hosts: set[str] = set()
        for n in allowed:
            if placement.why_not(n, request) is None:
                host = host_of(self.registry, n.node_id)
                provider = provider_of(self.registry, n.node_id)
                if provider not in eligible and host not in seen_hosts:
                    eligible.add(provider)
                    seen_hosts.add(host)
        needed = len(self.unplaced[parent_id])
        if len(eligible) < needed:
            total = len(providers) + needed
            return [], (
                f"needs {total} distinct providers, {len(providers) + len(eligible)} eligible"
                " (copies of a verified lease run on different provider accounts and hosts)"
            )
        return allowed, ""

    def placed(self, lease_id: str, node_id: str) -> None:
        parent_id = self.parent_of[lease_id]
        self.used[parent_id].append(node_id)
        self.unplaced[parent_id].discard(lease_id)


class Verifier:
    def __init__(
        self,
        store: LeaseStore,
        registry: Registry,
        policy: ledger.LedgerPolicy,
        clock: Clock = time.time,
        *,
        escrow: bool = True,
    ) -> None:
        self.store = store
        self.registry = registry
        self.policy = policy
        self.clock = clock
        self.escrow = escrow
        self.on_slashed: Slashed | None = None
        self.kick: Callable[[], None] = lambda: None

    def _now(self) -> int:
        return round(self.clock() * 1e9)

    # -- submit ----------------------------------------------------------------------

    def submit_copies(self, replicas: int) -> Callable[[Conn, LeaseRow], None]:
        """The ``also`` of a verified submit: the group and its copies, in its txn."""

        def also(conn: Conn, parent: LeaseRow) -> None:
            conn.execute(
                "INSERT INTO verify_groups (parent_id, replicas) VALUES (?, ?)",
                (parent.lease_id, replicas),
            )
            for copy_id in copy_ids(parent.lease_id, replicas):
                self._new_copy(conn, parent, copy_id, "copy")
            conn.execute(
                "UPDATE leases SET reason = ? WHERE lease_id = ?",
                (f"verifying: {replicas} copies, each on a provider of its own", parent.lease_id),
            )

        return also

    def _new_copy(self, conn: Conn, parent: LeaseRow, copy_id: str, role: str) -> LeaseRow:
        row = self.store.insert_in(
            conn,
            NewLease(
                lease_id=copy_id,
                buyer=parent.buyer,
                spec=copy_spec(parent.spec),
                replace_on_lost=parent.replace_on_lost,
            ),
        )
        conn.execute(
            "INSERT INTO verify_copies (copy_id, parent_id, role) VALUES (?, ?, ?)",
            (copy_id, parent.lease_id, role),
        )
        return row

    # -- reads -----------------------------------------------------------------------

    @staticmethod
    def _group(conn: Conn, parent_id: str, *, lock: bool = False) -> Group | None:
        row = conn.execute(
            "SELECT replicas, state FROM verify_groups WHERE parent_id = ?"  # noqa: S608
            + (" FOR UPDATE" if lock else ""),
            (parent_id,),
        ).fetchone()
        if row is None:
            return None
        group = Group(parent_id, int(row[0]), str(row[1]))
        for copy_id, role, ended, digest, outcome in conn.execute(
            "SELECT copy_id, role, ended, digest, outcome FROM verify_copies"
            " WHERE parent_id = ? ORDER BY role, copy_id",
            (parent_id,),
        ).fetchall():
            group.copies[str(copy_id)] = (
                str(role),
                bool(ended),
                bytes(digest) if digest is not None else None,
                str(outcome),
            )
        return group

    async def placement_groups(
        self, pending: Iterable[LeaseRow]
    ) -> dict[str, tuple[str, int, list[str]]]:
        """copy id -> (parent id, replicas, nodes its siblings are or were placed on),
        for the pending copies among ``pending``."""
        ids = [r.lease_id for r in pending]
        if not ids:
            return {}

        def read(conn: Conn) -> dict[str, tuple[str, int, list[str]]]:
            found: dict[str, tuple[str, int, list[str]]] = {}
            marks = ", ".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT c.copy_id, c.parent_id, g.replicas FROM verify_copies c"  # noqa: S608
                f" JOIN verify_groups g ON g.parent_id = c.parent_id WHERE c.copy_id IN ({marks})",
                ids,
            ).fetchall()
            siblings: dict[str, list[str]] = {}
            for copy_id, parent_id, replicas in rows:
                if parent_id not in siblings:
                    siblings[parent_id] = [
                        str(n)
                        for (n,) in conn.execute(
                            "SELECT l.node_id FROM verify_copies c JOIN leases l"
                            " ON l.lease_id = c.copy_id WHERE c.parent_id = ?"
                            " AND l.node_id IS NOT NULL",
                            (parent_id,),
                        ).fetchall()
                    ]
                found[str(copy_id)] = (str(parent_id), int(replicas), siblings[parent_id])
            return found

        return await self.store.db.call(read)

    async def describe(self, lease: leases_pb2.Lease) -> leases_pb2.Lease:
        """Fill the parent's copies (or a copy's parent id) into a lease answer."""

        def read(conn: Conn) -> tuple[Group | None, str, dict[str, LeaseRow]]:
            group = self._group(conn, lease.lease_id)
            parent = conn.execute(
                "SELECT parent_id FROM verify_copies WHERE copy_id = ?", (lease.lease_id,)
            ).fetchone()
            rows = {}
            if group is not None:
                for copy_id in group.copies:
                    got = LeaseStore._get(conn, copy_id)
                    if got is not None:
                        rows[copy_id] = got
            return group, str(parent[0]) if parent else "", rows

        group, parent_id, rows = await self.store.db.call(read)
        lease.parent_lease_id = parent_id
        if group is None:
            return lease
        lease.verify_state = group.state
        for copy_id, (role, _ended, digest, outcome) in group.copies.items():
            row = rows.get(copy_id)
            node = row.node_id if row is not None and row.node_id else ""
            lease.copies.append(
                leases_pb2.VerifyCopy(
                    lease_id=copy_id,
                    node_id=node,
                    state=state_value(row.state if row is not None else "unspecified"),
                    digest=digest or b"",
                    role=role,
                    outcome=outcome,
                    provider=provider_of(self.registry, node) if node else "",
                )
            )
        return lease

    async def copy_ids_of(self, parent_id: str) -> list[str]:
        return await self.store.db.call(
            lambda conn: [
                str(r[0])
                for r in conn.execute(
                    "SELECT copy_id FROM verify_copies WHERE parent_id = ? ORDER BY copy_id",
                    (parent_id,),
                ).fetchall()
            ]
        )

    async def flags(self, node_id: str) -> list[nodes_pb2.VerifyFlag]:
        return await self.store.db.call(
            lambda conn: [
                nodes_pb2.VerifyFlag(
                    lease_id=r[0],
                    parent_lease_id=r[1],
                    flagged_at_unix_nanos=r[2],
                    slashed_micros=r[3],
                    reason=r[4],
                )
                for r in conn.execute(
                    "SELECT copy_id, parent_id, flagged_ns, slashed_micros, reason"
                    " FROM verify_flags WHERE node_id = ? ORDER BY flagged_ns",
                    (node_id,),
                ).fetchall()
            ]
        )

    # -- copies ending -----------------------------------------------------------------

    def commitment_digest(self, row: LeaseRow, update: leases_pb2.LeaseUpdate) -> bytes | None:
        """The digest a copy's terminal update commits to, if the node really signed it
        for this copy; None (counts as not agreeing) otherwise."""
        if row.state != "succeeded" or not update.HasField("outputs") or row.node_id is None:
            return None
        c = update.outputs
        record = self.registry.nodes.get(row.node_id)
        try:
            # The one commitment rule (the dispatcher has already dropped a bad one;
            # checked again because a copy's pay rests on it).
            outputs_store.check(
                c,
                lease_id=row.lease_id,
                node_id=row.node_id,
                public_key=record.public_key if record is not None else b"",
            )
        except outputs_store.BadCommitment as exc:
            log.warning(
                "copy's output commitment refused: %s",
                exc,
                extra={"lease_id": row.lease_id, "node_id": row.node_id},
            )
            return None
        return bytes(c.digest)

    async def on_terminal_update(self, row: LeaseRow, update: leases_pb2.LeaseUpdate) -> None:
        """A lease ended by its node's update: if it is a copy, keep its digest and
        decide its parent when it was the last copy running."""
        digest = self.commitment_digest(row, update)

        def txn(conn: Conn) -> list[Decided]:
            found = conn.execute(
                "SELECT parent_id FROM verify_copies WHERE copy_id = ?", (row.lease_id,)
            ).fetchone()
            if found is None:
                return []
            parent_id = str(found[0])
            self._group(conn, parent_id, lock=True)  # serialize with sibling copies
            conn.execute(
                "UPDATE verify_copies SET ended = 1, digest = ? WHERE copy_id = ? AND ended = 0",
                (digest, row.lease_id),
            )
            return [self._decide(conn, parent_id)]

        self._after(await self.store.db.call(txn))

    async def sweep(self) -> None:
        """Copies that ended without an update carrying their result (lost, cancelled,
        an offer that failed for good; a success whose update this scheduler never saw)
        end with no digest; their groups are decided. A placement pass runs it first when
        its view has such a copy (``PlacementView.copies_ended``)."""
        now = self._now()
        grace = now - round(SUCCEEDED_GRACE_S * 1e9)
        terminal = tuple(TERMINAL)

        def txn(conn: Conn) -> list[Decided]:
            rows = conn.execute(
                "SELECT c.copy_id, c.parent_id, l.state, COALESCE(l.ended_ns, 0)"  # noqa: S608
                " FROM verify_copies c JOIN leases l ON l.lease_id = c.copy_id"
                f" WHERE c.ended = 0 AND l.state IN ({', '.join('?' * len(terminal))})",
                terminal,
            ).fetchall()
            parents = []
            for copy_id, parent_id, state, ended_ns in rows:
                if state == "succeeded" and ended_ns > grace:
                    continue  # its update's listener records the digest
                self._group(conn, str(parent_id), lock=True)
                conn.execute(
                    "UPDATE verify_copies SET ended = 1 WHERE copy_id = ? AND ended = 0",
                    (copy_id,),
                )
                parents.append(str(parent_id))
            # A parent cancelled with copies still pending: decided once they end.
            return [self._decide(conn, p) for p in dict.fromkeys(parents)]

        self._after(await self.store.db.call(txn))

    def _after(self, decisions: list[Decided]) -> None:
        for decided in decisions:
            if decided.tiebreak is not None:
                self.store.stored(1)
                self.kick()
            if decided.parent is not None:
                self.store._count("pending", decided.parent.state)
                self.kick()
            for node_id, found in decided.slashed:
                if self.on_slashed is not None:
                    self.on_slashed(node_id, found)

    # -- the decision ----------------------------------------------------------------

    def _decide(self, conn: Conn, parent_id: str) -> Decided:
        """Compare the copies once all have ended (inside the caller's txn, which holds
        the group's row lock)."""
        group = self._group(conn, parent_id, lock=True)
        if group is None or group.state != "verifying":
            return Decided()
        if not all(ended for _r, ended, _d, _o in group.copies.values()):
            return Decided()
        now = self._now()
        parent = LeaseStore._get(conn, parent_id)
        assert parent is not None
        rows = {c: LeaseStore._get(conn, c) for c in group.copies}
        if parent.terminal:
            # Cancelled by the buyer: every copy is paid the usage it ran, as any
            # cancelled lease is.
            for row in rows.values():
                if row is not None:
                    self._pay(conn, row, now)
            self._set_state(conn, group, "cancelled", now)
            return Decided()
        digests = Counter(d for _r, _e, d, _o in group.copies.values() if d is not None)
        total = len(group.copies)
        best, agree = digests.most_common(1)[0] if digests else (b"", 0)
        if agree >= 2 and agree * 2 > total:
            decided = Decided()
            for copy_id, (_role, _ended, digest, _o) in group.copies.items():
                row = rows[copy_id]
                assert row is not None
                if digest == best:
                    self._pay(conn, row, now)
                elif digest is not None:
                    decided.slashed.append(self._flag(conn, row, parent_id, best, now))
                else:
                    self._unpaid(conn, row, now, "not_paid", "copy ended without a result")
            state = "agreed" if agree == total else "majority"
            self._set_state(conn, group, state, now)
            decided.parent = self.store._transition(
                conn,
                parent_id,
                "succeeded",
                f"verified: {agree} of {total} copies agree on digest {best.hex()[:16]}",
                now,
            )
            return decided
        tiebreaks = sum(1 for r, _e, _d, _o in group.copies.values() if r == "tiebreak")
        if total == 2 and tiebreaks == 0 and digests:
            (copy_id,) = copy_ids(parent_id, 1, start=total + 1)
            # A savepoint: a refused reservation must leave no half-stored copy behind.
            conn.execute("SAVEPOINT tiebreak")
            try:
                tiebreak = self._new_copy(conn, parent, copy_id, "tiebreak")
            except LeaseRefused as exc:
                conn.execute("ROLLBACK TO SAVEPOINT tiebreak")
                why = f"the tie-break copy could not be reserved: {exc}"
            else:
                conn.execute("RELEASE SAVEPOINT tiebreak")
                conn.execute(
                    "UPDATE leases SET reason = ?, updated_ns = ? WHERE lease_id = ?",
                    (
                        "verifying: the 2 copies disagree; one tie-break copy runs on a "
                        "third provider",
                        now,
                        parent_id,
                    ),
                )
                return Decided(tiebreak=tiebreak)
        else:
            why = (
                f"no {'two' if total <= 3 else 'majority of'} of the {total} copies agree "
                f"({len(digests)} distinct digests, {total - digests.total()} without a result)"
            )
        for row in rows.values():
            assert row is not None
            self._unpaid(conn, row, now, "not_paid", "results disagree")
        self._set_state(conn, group, "results_disagree", now)
        return Decided(
            parent=self.store._transition(
                conn, parent_id, "failed", f"results_disagree: {why}", now
            )
        )

    @staticmethod
    def _set_state(conn: Conn, group: Group, state: str, now: int) -> None:
        cur = conn.execute(
            "UPDATE verify_groups SET state = ?, decided_ns = ? WHERE parent_id = ?"
            " AND state = 'verifying'",
            (state, now, group.parent_id),
        )
        assert cur.rowcount == 1, "the group lock makes the decision single"

    def _pay(self, conn: Conn, row: LeaseRow, now: int) -> None:
        conn.execute(
            "UPDATE verify_copies SET paid = 1, outcome = 'paid' WHERE copy_id = ?",
            (row.lease_id,),
        )
        ledger.pay_held(conn, row, now)
        ledger.lease_ended(conn, row, now)  # the rest of its escrow, as for any lease

    def _unpaid(self, conn: Conn, row: LeaseRow, now: int, outcome: str, why: str) -> None:
        conn.execute(
            "UPDATE verify_copies SET paid = 0, outcome = ? WHERE copy_id = ?",
            (outcome, row.lease_id),
        )
        ledger.release(conn, row.lease_id, now, f"verification: {why}")

    def _flag(
        self, conn: Conn, row: LeaseRow, parent_id: str, majority: bytes, now: int
    ) -> tuple[str, ledger.Collateral | None]:
        assert row.node_id is not None
        self._unpaid(conn, row, now, "flagged", "output disagreed with the majority")
        reason = (
            f"redundant run {parent_id}: copy {row.lease_id}'s output digest disagreed with "
            f"the majority's {majority.hex()[:16]}"
        )
        taken = ledger.slash(
            conn,
            row.node_id,
            self.policy.slash_verify_micros,
            now,
            reason,
            ref=f"verify:{row.lease_id}",
        )
        conn.execute(
            "INSERT OR IGNORE INTO verify_flags (copy_id, node_id, parent_id, flagged_ns,"
            " slashed_micros, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (row.lease_id, row.node_id, parent_id, now, taken, reason),
        )
        log.warning(
            "redundant-run copy outvoted: node flagged",
            extra={"lease_id": row.lease_id, "node_id": row.node_id, "slashed_micros": taken},
        )
        return row.node_id, ledger.collateral(conn, row.node_id)
