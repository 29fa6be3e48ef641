"""The node registry: who is known, who is connected, what they last reported.

The database is the source of truth across restarts; this class keeps the
working copy in memory (a few KiB per node) so Nodes.List never waits on disk.
Hellos and session ends are written through before they are acknowledged.
Heartbeats are not: they take effect in memory at once (liveness, free GPUs for
placement) and are written behind, all nodes' latest in one transaction every
``HEARTBEAT_FLUSH_EVERY`` seconds and on shutdown (``flush``). A crash loses at
most that much of last-seen times and uptime coverage, which the restart grace
already covers; at 10,000 nodes it is 1,000 writes a second the heartbeat path
no longer waits on (docs/performance.md). Nomad and Consul keep heartbeat TTLs
in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gpuagent.v1 import common_pb2, coordinator_pb2, inventory_pb2, market_pb2, nodes_pb2

from . import uptime
from .changes import Changes
from .db import Database
from .group_commit import GroupCommit
from .liveness import Liveness, LivenessPolicy, evaluate, is_online
from .market import clean_offer
from .storage import Conn

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_EVERY = 1.0  # seconds between writes of the heartbeats taken meanwhile

Clock = Callable[[], float]
Sender = Callable[[coordinator_pb2.CoordinatorMessage], Awaitable[None]]

_LIVENESS_PB = {
    Liveness.ONLINE: nodes_pb2.LIVENESS_ONLINE,
    Liveness.SUSPECT: nodes_pb2.LIVENESS_SUSPECT,
    Liveness.OFFLINE: nodes_pb2.LIVENESS_OFFLINE,
}


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


class NameTaken(ValueError):
    """Another node of the same provider account already has this name."""


@dataclass
class NodeRecord:
    node_id: str
    public_key: bytes
    first_seen: float
    name: str = ""
    region: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""
    protocol_version: str = ""
    inventory: inventory_pb2.Inventory = field(default_factory=inventory_pb2.Inventory)
    last_heartbeat: coordinator_pb2.Heartbeat | None = None
    last_seen: float | None = None
    draining: bool = False
    acked_usage_seq: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)
    # start_ns of the last span exactly as stored: float seconds do not round-trip ns.
    last_span_key: int | None = None
    liveness: Liveness = Liveness.OFFLINE
    # Bumped by every Hello (the only time inventory and labels change), so caches
    # of what they imply know when to rebuild.
    generation: int = 0
    # Provider account the node is bound to (first Hello with an enrolment token);
    # "" for a node that joined under registration: open.
    owner: str = ""
    # Prices, location, measured bandwidth (Hello, then OfferUpdate): docs/market.md.
    offer: market_pb2.NodeOffer = field(default_factory=market_pb2.NodeOffer)


@dataclass
class Session:
    """One open Connect stream. ``closed`` is set to make its servicer end it."""

    session_id: str
    node_id: str
    peer: str
    started: float
    send: Sender
    last_heartbeat_seq: int = 0
    # When the servicer last read a message off this stream (time.monotonic_ns): the
    # start of that message's processing, for latency probes and debugging.
    last_read_mono_ns: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    # The ProtocolError code the agent gets when ``closed`` ends the stream.
    close_code: int = common_pb2.ProtocolError.SUPERSEDED


class Registry:
    def __init__(self, db: Database, policy: LivenessPolicy, clock: Clock = time.time) -> None:
        self.db = db
        self.policy = policy
        self.clock = clock
        self.started_at = clock()
        self.nodes: dict[str, NodeRecord] = {}
        self.sessions: dict[str, Session] = {}  # by node_id
        # Group commit for Hellos, heartbeats and session ends (docs/performance.md): at
        # 10k nodes one SQLite transaction each saturates the database thread, so writes
        # that arrive while a commit is in flight share the next transaction.
        self.writes = GroupCommit(db)
        # Written behind (flush): nodes whose heartbeat is newer than the database's,
        # and coverage spans a heartbeat extended: (node_id, start_ns) -> end_ns.
        self._dirty_nodes: dict[str, NodeRecord] = {}
        self._dirty_spans: dict[tuple[str, int], int] = {}
        # Nodes whose record or stream changed: a Hello, a heartbeat, an offer, a drain,
        # a session's end, a node read in (placement's views watch it).
        self.changes = Changes()

    async def load(self, *, end_open_sessions: bool = True) -> None:
        """Read every known node back; called once at startup. ``end_open_sessions``:
        false when other replicas run (the open sessions are theirs, and live)."""

        def read(conn: Conn) -> list[NodeRecord]:
            records = self._read_nodes(conn, None)
            if end_open_sessions:
                # Sessions that were open when the scheduler died ended then, not now.
                conn.execute(
                    "UPDATE sessions SET ended_ns = started_ns,"
                    " end_reason = 'scheduler restart' WHERE ended_ns IS NULL"
                )
            return records

        def read_offers(conn: Conn) -> list[tuple[str, bytes]]:
            return conn.execute(
                "SELECT node_id, offer FROM nodes WHERE offer IS NOT NULL"
            ).fetchall()

        for record in await self.db.call(read):
            self.nodes[record.node_id] = record
            record.liveness = self.liveness(record)
            self.changes.add(record.node_id)
        for node_id, blob in await self.db.call(read_offers):
            if node_id in self.nodes:
                self.nodes[node_id].offer.ParseFromString(blob)
        log.info("node registry loaded", extra={"nodes": len(self.nodes)})

    async def refresh_remote(self) -> int:
        """Several replicas: take in what the others wrote. Nodes first seen elsewhere
        are read in, and the last-seen time of every node whose stream is not here
        comes from the database (its replica's heartbeat flush), so a sweep on this
        replica judges the whole fleet. Returns how many nodes were new here."""

        def read(conn: Conn) -> tuple[list[tuple[str, int | None]], list[NodeRecord]]:
            seen = [
                (str(r[0]), r[1])
                for r in conn.execute("SELECT node_id, last_seen_ns FROM nodes").fetchall()
            ]
            unknown = [n for n, _ in seen if n not in self.nodes]
            return seen, self._read_nodes(conn, unknown) if unknown else []

        seen, new = await self.db.call(read)
        for record in new:
            if self.nodes.setdefault(record.node_id, record) is record:
                self.changes.add(record.node_id)
        for node_id, seen_ns in seen:
            known = self.nodes.get(node_id)
            if known is None or node_id in self.sessions or seen_ns is None:
                continue
            last = seen_ns / 1e9
            if known.last_seen is None or last > known.last_seen:
                known.last_seen = last
        return len(new)

    def _read_nodes(self, conn: Conn, only: list[str] | None) -> list[NodeRecord]:
        horizon = _ns(self.clock() - uptime.RETENTION)
        sql = (
            "SELECT node_id, public_key, name, region, labels_json, agent_version,"
            " protocol_version, inventory, last_heartbeat, first_seen_ns, last_seen_ns,"
            " draining, acked_usage_seq, owner FROM nodes"
        )
        batches: list[list[str]] = (
            [[]] if only is None else [only[i : i + 500] for i in range(0, len(only), 500)]
        )
        records = []
        for batch in batches:
            where = f" WHERE node_id IN ({', '.join('?' * len(batch))})" if batch else ""
            for row in conn.execute(sql + where, batch).fetchall():
                inventory = inventory_pb2.Inventory()
                if row[7]:
                    inventory.ParseFromString(row[7])
                heartbeat = None
                if row[8]:
                    heartbeat = coordinator_pb2.Heartbeat()
                    heartbeat.ParseFromString(row[8])
                rows = conn.execute(
                    "SELECT start_ns, end_ns FROM coverage WHERE node_id = ? AND end_ns >= ?"
                    " ORDER BY start_ns",
                    (row[0], horizon),
                ).fetchall()
                spans = [(s / 1e9, e / 1e9) for s, e in rows]
                last_key = rows[-1][0] if rows else None
                records.append(
                    NodeRecord(
                        node_id=row[0],
                        public_key=row[1],
                        name=row[2],
                        region=row[3],
                        labels=json.loads(row[4]),
                        agent_version=row[5],
                        protocol_version=row[6],
                        inventory=inventory,
                        last_heartbeat=heartbeat,
                        first_seen=row[9] / 1e9,
                        last_seen=row[10] / 1e9 if row[10] is not None else None,
                        draining=bool(row[11]),
                        acked_usage_seq=row[12],
                        owner=row[13],
                        spans=spans,
                        last_span_key=last_key,
                    )
                )
        return records

    def liveness(self, record: NodeRecord) -> Liveness:
        return evaluate(self.policy, record.last_seen, self.clock(), self.started_at)

    def sweep(self) -> list[tuple[str, Liveness, Liveness]]:
        """Re-evaluate every node; log and return the transitions."""
        changes = []
        now = self.clock()
        policy = self.policy
        online = Liveness.ONLINE
        started = self.started_at
        for record in self.nodes.values():
            seen = record.last_seen
            if record.liveness is online and is_online(policy, seen, now):
                # Most of a fleet, most of the time: no change, so no full evaluation
                # (10,000 nodes every half heartbeat interval, on the event loop).
                continue
            new = evaluate(self.policy, seen, now, started)
            if new is not record.liveness:
                changes.append((record.node_id, record.liveness, new))
                log.info(
                    "node %s",
                    new.value,
                    extra={
                        "node_id": record.node_id,
                        "from": record.liveness.value,
                        "to": new.value,
                        "last_seen": record.last_seen,
                    },
                )
                record.liveness = new
        return changes

    def _extend_coverage(self, record: NodeRecord, now: float) -> tuple[int, int]:
        before = len(record.spans)
        uptime.extend(record.spans, now, self.policy.heartbeat_interval)
        start, end = record.spans[-1]
        if len(record.spans) != before or record.last_span_key is None:
            record.last_span_key = _ns(start)
        return record.last_span_key, _ns(end)

    def name_taken(self, node_id: str, owner: str, name: str) -> str | None:
        """The id of another node of ``owner`` already called ``name``, if any."""
        if not owner or not name:
            return None
        for other in self.nodes.values():
            if other.owner == owner and other.name == name and other.node_id != node_id:
                return other.node_id
        return None

    async def register(
        self, hello: coordinator_pb2.Hello, peer: str, send: Sender, owner: str = ""
    ) -> tuple[NodeRecord, Session]:
        """Record a verified Hello and open its session, superseding an older one.

        ``owner`` binds a new (or unbound) node to a provider account; a bound node
        keeps its owner whatever it presents later."""
        now = self.clock()
        record = self.nodes.get(hello.node_id)
        if record is None:
            record = NodeRecord(hello.node_id, hello.public_key, first_seen=now)
        elif record.public_key != hello.public_key:
            # Cannot happen short of a SHA-256 collision; refuse rather than merge.
            raise ValueError("node id already registered with another public key")
        bound = record.owner or owner
        clash = self.name_taken(record.node_id, bound, hello.node_name)
        if clash is not None:
            raise NameTaken(
                f"node name {hello.node_name!r} is already used by node {clash} of account "
                f"{bound!r}: node names are unique per provider account (set node.name)"
            )
        record.owner = bound
        record.generation += 1
        record.name = hello.node_name
        record.region = hello.region
        record.labels = dict(hello.labels)
        record.agent_version = hello.agent_version
        record.protocol_version = hello.protocol_version
        record.inventory.CopyFrom(hello.inventory)
        record.offer, problems = clean_offer(hello.offer, record.inventory)
        if problems:
            log.warning(
                "node offer partly refused", extra={"node_id": record.node_id, "problems": problems}
            )
        if not record.offer.location.region and hello.region:
            # An older agent says where it is only in Hello.region.
            record.offer.location.region = hello.region
        record.region = record.offer.location.region
        record.last_heartbeat = coordinator_pb2.Heartbeat(
            gpu_health=hello.gpu_health,
            free_gpu_uuids=[g.uuid for g in hello.inventory.gpus],
            leases=hello.leases,
            draining=hello.draining,
        )
        record.last_seen = now
        span = self._extend_coverage(record, now)
        session = Session(uuid.uuid4().hex, record.node_id, peer, now, send)
        first_seen = record.first_seen

        def write(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO nodes (node_id, public_key, name, region, labels_json,"
                " agent_version, protocol_version, inventory, last_heartbeat, first_seen_ns,"
                " last_seen_ns, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(node_id) DO UPDATE SET name = excluded.name, owner = excluded.owner,"
                " region = excluded.region, labels_json = excluded.labels_json,"
                " agent_version = excluded.agent_version,"
                " protocol_version = excluded.protocol_version, inventory = excluded.inventory,"
                " last_heartbeat = excluded.last_heartbeat, last_seen_ns = excluded.last_seen_ns",
                (
                    record.node_id,
                    record.public_key,
                    record.name,
                    record.region,
                    json.dumps(record.labels),
                    record.agent_version,
                    record.protocol_version,
                    record.inventory.SerializeToString(),
                    record.last_heartbeat.SerializeToString() if record.last_heartbeat else None,
                    _ns(first_seen),
                    _ns(now),
                    record.owner,
                ),
            )
            conn.execute(
                "INSERT INTO sessions (session_id, node_id, peer, started_ns) VALUES (?, ?, ?, ?)",
                (session.session_id, record.node_id, peer, _ns(now)),
            )
            _write_span(conn, record.node_id, span)
            _write_offer(conn, record)

        await self.writes.write(write)
        self.nodes[record.node_id] = record
        old = self.sessions.get(record.node_id)
        if old is not None:
            old.close_reason = "superseded by a newer session of the same node"
            old.closed.set()
        self.sessions[record.node_id] = session
        record.liveness = self.liveness(record)
        self.changes.add(record.node_id)
        return record, session

    async def heartbeat(self, session: Session, heartbeat: coordinator_pb2.Heartbeat) -> None:
        """Take a heartbeat into account now; it reaches the database with the next flush."""
        record = self.nodes[session.node_id]
        now = self.clock()
        session.last_heartbeat_seq = heartbeat.seq
        record.last_heartbeat = heartbeat
        record.last_seen = now
        key, end = self._extend_coverage(record, now)
        spans = self._dirty_spans
        spans[(record.node_id, key)] = max(end, spans.get((record.node_id, key), 0))
        self._dirty_nodes[record.node_id] = record
        self.changes.add(record.node_id)
        if record.liveness is not Liveness.ONLINE:
            self.sweep()

    async def flush(self) -> int:
        """Write the heartbeats taken since the last flush, in one transaction."""
        if not self._dirty_nodes and not self._dirty_spans:
            return 0
        nodes, self._dirty_nodes = self._dirty_nodes, {}
        spans, self._dirty_spans = self._dirty_spans, {}
        rows = [
            (
                _ns(r.last_seen) if r.last_seen is not None else None,
                r.last_heartbeat.SerializeToString() if r.last_heartbeat else None,
                r.node_id,
            )
            for r in nodes.values()
        ]
        span_rows = [(node_id, start, end) for (node_id, start), end in spans.items()]

        def write(conn: Conn) -> None:
            # Few statements of many rows, not one per row: between statements the
            # database thread waits for the GIL, which the busy event loop holds.
            for chunk in _chunks(rows):
                values = ", ".join(["(?, ?, ?)"] * len(chunk))
                conn.execute(
                    # Only "(?, ?, ?)" placeholders are formatted in; values are bound.
                    "UPDATE nodes SET last_seen_ns = v.column1, last_heartbeat = v.column2"  # noqa: S608
                    f" FROM (VALUES {values}) AS v WHERE nodes.node_id = v.column3",
                    [x for row in chunk for x in row],
                )
            for chunk in _chunks(span_rows):
                values = ", ".join(["(?, ?, ?)"] * len(chunk))
                conn.execute(
                    f"INSERT INTO coverage (node_id, start_ns, end_ns) VALUES {values}"  # noqa: S608
                    " ON CONFLICT(node_id, start_ns)"
                    " DO UPDATE SET end_ns = CASE WHEN excluded.end_ns > coverage.end_ns"
                    " THEN excluded.end_ns ELSE coverage.end_ns END",
                    [x for row in chunk for x in row],
                )

        try:
            await self.writes.write(write)
        except BaseException:
            # Not lost: the next flush writes them (newer values taking precedence).
            for node_id, record in nodes.items():
                self._dirty_nodes.setdefault(node_id, record)
            for span, end in spans.items():
                self._dirty_spans[span] = max(end, self._dirty_spans.get(span, 0))
            raise
        return len(rows)

    async def flush_forever(self, stop: asyncio.Event, every: float) -> None:
        """``flush`` every ``every`` seconds until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            try:
                await self.flush()
            except Exception:
                log.exception("writing heartbeats to the database failed; retrying")

    async def update_offer(self, session: Session, offer: market_pb2.NodeOffer) -> list[str]:
        """An OfferUpdate: the node's new offer, written through; returns what was refused."""
        record = self.nodes[session.node_id]
        cleaned, problems = clean_offer(offer, record.inventory)
        if not cleaned.location.region and record.region:
            cleaned.location.region = record.region
        record.offer = cleaned
        record.region = cleaned.location.region
        record.generation += 1  # placement's caches of the node's prices rebuild
        self.changes.add(record.node_id)
        await self.writes.write(lambda conn: _write_offer(conn, record))
        return problems

    async def end_session(self, session: Session, reason: str) -> None:
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.changes.add(session.node_id)
        now = _ns(self.clock())
        await self.writes.write(
            lambda conn: conn.execute(
                "UPDATE sessions SET ended_ns = ?, end_reason = ? WHERE session_id = ?",
                (now, reason, session.session_id),
            )
        )

    async def set_draining(self, record: NodeRecord, draining: bool) -> None:
        record.draining = draining
        self.changes.add(record.node_id)
        await self.db.call(
            lambda conn: conn.execute(
                "UPDATE nodes SET draining = ? WHERE node_id = ?", (int(draining), record.node_id)
            )
        )

    async def prune_coverage(self) -> None:
        horizon = self.clock() - uptime.RETENTION
        for record in self.nodes.values():
            record.spans = [s for s in record.spans if s[1] >= horizon]
        await self.db.call(
            lambda conn: conn.execute("DELETE FROM coverage WHERE end_ns < ?", (_ns(horizon),))
        )

    def find(self, node_id_or_prefix: str) -> NodeRecord | None:
        """Exact id, else the single node whose id starts with the prefix."""
        if node_id_or_prefix in self.nodes:
            return self.nodes[node_id_or_prefix]
        matches = [r for k, r in self.nodes.items() if k.startswith(node_id_or_prefix)]
        return matches[0] if len(matches) == 1 and node_id_or_prefix else None

    def uptime(self, record: NodeRecord) -> dict[str, float]:
        now = self.clock()
        return {
            name: uptime.ratio(record.spans, now, window, record.first_seen)
            for name, window in uptime.WINDOWS
        }

    def to_proto(self, record: NodeRecord) -> nodes_pb2.Node:
        session = self.sessions.get(record.node_id)
        ratios = self.uptime(record)
        heartbeat = record.last_heartbeat or coordinator_pb2.Heartbeat()
        return nodes_pb2.Node(
            node_id=record.node_id,
            name=record.name,
            public_key=record.public_key,
            liveness=_LIVENESS_PB[self.liveness(record)],
            connected=session is not None,
            session_id=session.session_id if session else "",
            peer=session.peer if session else "",
            agent_version=record.agent_version,
            protocol_version=record.protocol_version,
            inventory=record.inventory,
            gpu_health=heartbeat.gpu_health,
            free_gpu_uuids=heartbeat.free_gpu_uuids,
            allocated_gpu_uuids=heartbeat.allocated_gpu_uuids,
            leases=heartbeat.leases,
            first_seen_unix_nanos=_ns(record.first_seen),
            last_heartbeat_unix_nanos=_ns(record.last_seen) if record.last_seen else 0,
            uptime=nodes_pb2.Uptime(
                ratio_1h=ratios["1h"], ratio_24h=ratios["24h"], ratio_30d=ratios["30d"]
            ),
            # Drained by an operator here, or locally on the host (`gpu-agent drain`).
            draining=record.draining or heartbeat.draining,
            region=record.region,
            labels=record.labels,
            owner=record.owner,
            registration="enrolled" if record.owner else "open",
        )


def _chunks(
    rows: Sequence[tuple[object, ...]], size: int = 500
) -> list[Sequence[tuple[object, ...]]]:
    """Rows in slices that stay under SQLite's bound-parameter limit (3 per row)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


_UPSERT_SPAN = (
    "INSERT INTO coverage (node_id, start_ns, end_ns) VALUES (?, ?, ?)"
    " ON CONFLICT(node_id, start_ns) DO UPDATE SET end_ns ="
    " CASE WHEN excluded.end_ns > coverage.end_ns THEN excluded.end_ns ELSE coverage.end_ns END"
)


def _write_span(conn: Conn, node_id: str, span: tuple[int, int]) -> None:
    conn.execute(_UPSERT_SPAN, (node_id, span[0], span[1]))


def _write_offer(conn: Conn, record: NodeRecord) -> None:
    conn.execute(
        "UPDATE nodes SET offer = ? WHERE node_id = ?",
        (record.offer.SerializeToString(), record.node_id),
    )
