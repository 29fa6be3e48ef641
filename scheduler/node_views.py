"""Placement's view of every node, kept current as nodes change, not rebuilt per pass.

A pass reads one ``placement.NodeView`` per registered node. Rebuilding them all on
every pass cost 16 ms p50 at 10,000 agents on two replicas (``fleet_replicas``): a
Python loop over every node, with cold caches, on every Submit. Here a node's view
is evaluated again only when something it is made of changed:

- its record or stream: a Hello, a heartbeat, an OfferUpdate, a drain, the session
  ending (``Registry.changes``);
- the GPUs that placed leases hold on it (each pass diffs the store's holding rows
  against the last pass's);
- whether its GPUs may take a lease: an attestation verdict stored, collateral moved
  (``Eligibility.changes``);
- its 30-day uptime (the slow sweep, ``refresh_uptimes``);
- time alone: a silent node stops being online ``suspect_after`` after it was last
  heard from, "suspect" turns "offline" after the grace, an attestation expires. Each
  view says when it next changes by itself, and a heap of those times brings it back.

``rebuilt`` builds every view from nothing, the same way: the tests hold the two to
the same answer after every kind of change.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gpuagent.v1 import coordinator_pb2, inventory_pb2

from . import placement, uptime
from .changes import EVERYTHING
from .eligibility import FOREVER, Eligibility
from .liveness import evaluate, is_online
from .market import Asks, node_asks
from .registry import NodeRecord, Registry

if TYPE_CHECKING:
    from .lease_dispatch import DispatchSettings
    from .leases_store import LeaseRow

log = logging.getLogger(__name__)

# How often placement re-reads nodes' 30-day uptime: it moves slowly, and reading it
# for every node on every pass is work a 1,000-node pass cannot spare. At most five
# heartbeat intervals, so a node that just joined (uptime 0 at its first Hello, near
# 1.0 a few heartbeats later: scheduler/uptime.py) is not held at 0 for long.
UPTIME_REFRESH_S = 60.0
UPTIME_REFRESH_HEARTBEATS = 5
# Nodes whose uptime one pass re-reads, at most (after the first pass, which reads all).
# A whole 10,000-node re-read in one pass stopped the event loop for over half a second
# (fleet_replicas at 10k: every Submit and heartbeat behind it waited); in slices, the
# rest is read between passes (``LeaseDispatcher.run``), so a sweep still ends within
# its interval.
UPTIME_SLICE = 256
# Nodes read (uptime) or evaluated (views) between two looks at whether a pass is
# wanted, between passes: about a millisecond of work.
IDLE_SLICE = 64
MONTH = dict(uptime.WINDOWS)["30d"]
# A due time this close is taken as reached: re-evaluating a view a microsecond early
# gives the same view (and a new due time), and float seconds against integer ns
# could otherwise leave an expired attestation counted for a pass.
_DUE_SLACK = 1e-6


@dataclass
class Capacity:
    """What placement reads from a node's last heartbeat, cached per node."""

    heartbeat: coordinator_pb2.Heartbeat | None
    gpus: tuple[placement.GpuView, ...]  # free, healthy, not cordoned
    draining: bool
    ask_micros: int  # the lowest ask of its free GPUs
    generation: int = 0  # NodeRecord.generation it was built from
    isolation_block: str = ""  # placement.isolation_block of the node's inventory
    uniform_price: bool = True
    market: placement.NodeMarket = placement.NO_MARKET

    def same_as(self, other: Capacity) -> bool:
        return (
            self.gpus == other.gpus
            and self.draining == other.draining
            and self.ask_micros == other.ask_micros
            and self.isolation_block == other.isolation_block
            and self.market == other.market
        )


def _not_connected(node_id: str) -> placement.NodeView:
    return placement.NodeView(
        node_id=node_id,
        online=False,
        draining=False,
        ask_micros=0,
        offline_reason="not connected",
    )


class NodeViews:
    def __init__(
        self,
        registry: Registry,
        settings: DispatchSettings,
        eligibility: Eligibility | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        # Attestation and collateral: a GPU that fails either takes no lease.
        self.eligibility = eligibility
        self.capacities: dict[str, Capacity] = {}
        self.uptimes: dict[str, float] = {}  # node -> 30-day uptime, refreshed slowly
        self._uptimes_at = float("-inf")  # when the current sweep over the fleet began
        self._uptime_queue: deque[str] = deque()  # nodes the current sweep has still to read
        self._bad_price: set[tuple[str, str]] = set()
        # Node -> view: the nodes whose streams this scheduler holds, and the rest
        # (never a candidate here: "not connected").
        self._here: dict[str, placement.NodeView] = {}
        self._away: dict[str, placement.NodeView] = {}
        # Nodes whose view is to be evaluated again (EVERYTHING: all of them).
        self._changed = registry.changes.watch()
        self._eligibility_changed = (
            eligibility.changes.watch() if eligibility is not None else set()
        )
        self._restricts: bool | None = None  # eligibility.restricts at the last read
        # (when, node): when the node's view changes with time alone; _due_at holds each
        # node's current time, so entries a later evaluation replaced are skipped.
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        self._held: dict[str, set[str]] = {}  # node -> GPUs placed leases hold on it

    # -- prices and market ---------------------------------------------------------

    def asks(self, record: NodeRecord) -> Asks:
        """The node's ask per GPU model: its offer, else its old label, else the default."""
        asks = node_asks(
            record.offer, record.labels, self.settings.default_ask_micros, self.settings.price_label
        )
        raw = record.labels.get(self.settings.price_label)
        if (
            asks.source == "default"
            and raw is not None
            and (record.node_id, raw) not in self._bad_price
        ):
            # An old agent's label that is not a whole number would silently ask the default.
            self._bad_price.add((record.node_id, raw))
            log.warning(
                "node price label is not a whole number of micro-units; using the default ask",
                extra={
                    "node_id": record.node_id,
                    "label": self.settings.price_label,
                    "value": raw[:64],
                    "default_ask": self.settings.default_ask_micros,
                },
            )
        return asks

    def ask_price(self, record: NodeRecord) -> int:
        """The node's lowest ask over its GPU models (what a node of one model asks)."""
        asks = self.asks(record)
        models = {g.name for g in record.inventory.gpus}
        return min((asks.for_model(m) for m in models), default=asks.default)

    def _market(self, record: NodeRecord) -> placement.NodeMarket:
        """Built with the node's capacity (each Hello, OfferUpdate, capacity change)."""
        offer = record.offer
        scratch = record.inventory.scratch if record.inventory.HasField("scratch") else None
        return placement.NodeMarket(
            region=offer.location.region,
            country=offer.location.country,
            labels=record.labels,
            uptime_30d=self._uptime(record),
            bandwidth_bps=offer.bandwidth.bits_per_second,
            scratch_free_bytes=scratch.free_bytes if scratch is not None else None,
        )

    def offer_changed(self, node_id: str) -> None:
        """After an OfferUpdate: the node's prices and market view rebuild."""
        # Its view is evaluated again: Registry.update_offer marked the node changed.
        self.capacities.pop(node_id, None)

    # -- uptime --------------------------------------------------------------------

    def uptime_every(self) -> float:
        return min(
            UPTIME_REFRESH_S, UPTIME_REFRESH_HEARTBEATS * self.registry.policy.heartbeat_interval
        )

    def _uptime(self, record: NodeRecord) -> float:
        """The node's 30-day uptime as last swept; read now for a node no sweep has
        reached yet (one that just joined), so it is never taken for 0 until the next
        sweep and no pass has to read the whole fleet at once."""
        ratio = self.uptimes.get(record.node_id)
        if ratio is None:
            ratio = self.uptimes[record.node_id] = _month_uptime(record, self.registry.clock())
        return ratio

    def refresh_uptimes(self, limit: int | None = UPTIME_SLICE) -> int:
        """Every UPTIME_REFRESH_S a sweep re-reads 30-day uptimes, ``limit`` nodes per
        call; a changed one updates its node's cached market view (and so its placement
        view). A node's first uptime is read with its market view (``_uptime``), so no
        call reads the whole fleet: a first sweep of 10,000 inside a Submit's pass held
        it for 250 ms (fleet_replicas). Returns how many it read."""
        now = self.registry.clock()
        if now - self._uptimes_at >= self.uptime_every():
            first = self._uptimes_at == float("-inf")
            self._uptimes_at = now
            if first:
                return 0  # each node's first uptime comes with its view (``_uptime``)
            # Oldest first: a sweep still under way when the next is due goes on, so
            # under a steady stream of passes no node waits more than two intervals.
            queued = set(self._uptime_queue)
            self._uptime_queue.extend(n for n in self.registry.nodes if n not in queued)
        queue = self._uptime_queue
        count = len(queue) if limit is None else min(limit, len(queue))
        nodes = self.registry.nodes
        for node_id in (queue.popleft() for _ in range(count)):
            record = nodes.get(node_id)
            if record is None:
                continue
            ratio = _month_uptime(record, now)
            old = self.uptimes.get(node_id)
            self.uptimes[node_id] = ratio
            capacity = self.capacities.get(node_id)
            if capacity is not None and (old is None or abs(old - ratio) >= 1e-4):
                capacity.market = replace(capacity.market, uptime_30d=ratio)
                self._changed.add(node_id)
        return count

    # -- capacity ------------------------------------------------------------------

    def capacity(self, record: NodeRecord) -> Capacity:
        """The node's free healthy GPUs and price, rebuilt only when its heartbeat changed
        them: a 10,000-node fleet sends 1,000 heartbeats a second."""
        heartbeat = record.last_heartbeat
        cached = self.capacities.get(record.node_id)
        # Registry.register (the only place labels and inventory change) and load always
        # store a new heartbeat object, so its identity is the whole cache key.
        if cached is not None and cached.heartbeat is heartbeat:
            return cached
        old = cached.heartbeat if cached is not None else None
        if (
            cached is not None
            and old is not None
            and heartbeat is not None
            and cached.generation == record.generation
            and heartbeat.free_gpu_uuids == old.free_gpu_uuids
            and heartbeat.gpu_health == old.gpu_health
            and heartbeat.draining == old.draining
        ):
            # Nearly every heartbeat: the fields placement reads are as before (compared
            # in C), so nothing is rebuilt.
            cached.heartbeat = heartbeat
            return cached
        hb = heartbeat or coordinator_pb2.Heartbeat()
        usable = {
            h.uuid
            for h in hb.gpu_health
            if h.state == inventory_pb2.GpuHealth.HEALTHY and not h.cordoned
        }
        free = set(hb.free_gpu_uuids) & usable
        asks = self.asks(record)
        gpus = tuple(
            placement.GpuView(
                gpu.uuid, gpu.name, gpu.memory_total_bytes, gpu.index, asks.for_model(gpu.name)
            )
            for gpu in record.inventory.gpus
            if gpu.uuid in free
        )
        prices = {g.ask_micros for g in gpus}
        capacity = Capacity(
            heartbeat=heartbeat,
            gpus=gpus,
            draining=hb.draining,
            ask_micros=min(prices) if prices else self.ask_price(record),
            uniform_price=len(prices) <= 1,
            market=self._market(record),
            generation=record.generation,
            # Inventory changes only with a Hello, which bumps the generation.
            isolation_block=placement.isolation_block(
                record.inventory, self.settings.require_isolation
            ),
        )
        if cached is not None and cached.same_as(capacity):
            cached.heartbeat = heartbeat  # same capacity, newer heartbeat: keep the entry
            cached.generation = record.generation
            return cached
        self.capacities[record.node_id] = capacity
        return capacity

    def heartbeat(self, record: NodeRecord) -> bool:
        """After the node's heartbeat: its view, now (a pass then finds it ready);
        whether its capacity changed."""
        before = self.capacities.get(record.node_id)
        self._update(record.node_id, self.registry.clock())
        self._changed.discard(record.node_id)
        return self.capacities.get(record.node_id) is not before

    # -- views ---------------------------------------------------------------------

    def current(self, holding: Sequence[LeaseRow]) -> list[placement.NodeView]:
        """Every node's view, with the GPUs ``holding`` leases hold taken out."""
        here, away = self.split(holding)
        return here + away

    def split(
        self, holding: Sequence[LeaseRow]
    ) -> tuple[list[placement.NodeView], list[placement.NodeView]]:
        """``current``'s views in two: the nodes whose streams are here, and the others
        (no candidates: ``placement.choose`` takes them as ``unavailable`` and does
        not test them; with replicas, half of every pass)."""
        self.refresh_uptimes()
        now = self.registry.clock()
        changed = self._changes(now)
        held = _held_by_node(holding)
        old = self._held
        for node_id in held.keys() | old.keys():
            if held.get(node_id) != old.get(node_id):
                changed.add(node_id)
        self._held = held
        for node_id in changed:
            self._update(node_id, now)
        return list(self._here.values()), list(self._away.values())

    def catch_up(self, limit: int | None = None) -> bool:
        """Evaluate what changed since the last pass, ``limit`` nodes at most, between
        passes: the next pass (a Submit waiting on it) finds less to do, however long
        no pass ran. Whether nothing is left."""
        now = self.registry.clock()
        changed = list(self._changes(now))
        if limit is not None and len(changed) > limit:
            self._changed.update(changed[limit:])  # the next call's
            changed = changed[:limit]
        for node_id in changed:
            self._update(node_id, now)
        return not self._changed

    def rebuilt(self, holding: Sequence[LeaseRow]) -> list[placement.NodeView]:
        """Every node's view built from nothing, as ``current`` builds a changed one
        (for tests: what ``current`` must equal, whatever happened before)."""
        fresh = NodeViews(self.registry, self.settings, self.eligibility)
        fresh.uptimes = self.uptimes
        fresh._uptimes_at = float("inf")  # no sweep: the same uptimes as this one
        self.registry.changes.unwatch(fresh._changed)
        if self.eligibility is not None:
            self.eligibility.changes.unwatch(fresh._eligibility_changed)
        fresh._held = _held_by_node(holding)
        now = self.registry.clock()
        for node_id in self.registry.nodes:
            fresh._update(node_id, now)
        return list(fresh._here.values()) + list(fresh._away.values())

    def _changes(self, now: float) -> set[str]:
        """The nodes whose views are to be evaluated again (not counting held GPUs)."""
        changed = set(self._changed)
        self._changed.clear()
        eligibility = self.eligibility
        if eligibility is not None:
            changed |= self._eligibility_changed
            self._eligibility_changed.clear()
            restricts = eligibility.restricts
            if restricts != self._restricts:
                self._restricts = restricts
                changed.add(EVERYTHING)
        due, due_at, limit = self._due, self._due_at, now + _DUE_SLACK
        while due and due[0][0] <= limit:
            _when, node_id = heapq.heappop(due)
            at = due_at.get(node_id)
            if at is None:
                continue  # nothing due any more (it went away, or is offline for good)
            if at <= limit:
                del due_at[node_id]
                changed.add(node_id)
            else:
                heapq.heappush(due, (at, node_id))  # heard from since: due later
        nodes = self.registry.nodes
        here, away = self._here, self._away
        if len(here) + len(away) != len(nodes):
            # A node this never heard of (the first pass: all of them).
            changed.update(n for n in nodes if n not in here and n not in away)
        if EVERYTHING in changed:
            changed = set(nodes) | set(here) | set(away)
        return changed

    def _update(self, node_id: str, now: float) -> None:
        """Evaluate ``node_id``'s view again, and when it next changes with time alone."""
        registry = self.registry
        record = registry.nodes.get(node_id)
        here, away = self._here, self._away
        if record is None:
            here.pop(node_id, None)
            away.pop(node_id, None)
            self._schedule(node_id, None)
            return
        if node_id not in registry.sessions:
            # No stream here: never a candidate, whatever its heartbeat says (with
            # replicas, half the fleet is held elsewhere), so its capacity is not read:
            # a leader taking in 5,000 such nodes must not build 5,000 capacities.
            here.pop(node_id, None)
            if node_id not in away:
                away[node_id] = _not_connected(node_id)
            self._schedule(node_id, None)
            return
        away.pop(node_id, None)
        old = here.get(node_id)
        capacity = self.capacity(record)
        policy = registry.policy
        seen = record.last_seen
        online = is_online(policy, seen, now)
        draining = record.draining or capacity.draining
        gpus = capacity.gpus
        due = self._liveness_due(seen, online, now)
        eligibility = self.eligibility
        if online and not draining and gpus:
            taken = self._held.get(node_id)
            if taken:
                gpus = tuple(g for g in gpus if g.uuid not in taken)
            if eligibility is not None and eligibility.restricts:
                kept, until = eligibility.filter(node_id, gpus, round(now * 1e9))
                gpus = tuple(kept) if kept is not gpus else gpus
                if until < FOREVER:
                    due = until / 1e9 if due is None else min(due, until / 1e9)
        offline_reason = (
            "online" if online else evaluate(policy, seen, now, registry.started_at).value
        )
        if (
            old is None
            or old.online != online
            or old.draining != draining
            or old.offline_reason != offline_reason
            or old.free_gpus != gpus  # same objects: an identity check per GPU
            or old.ask_micros != capacity.ask_micros
            or old.isolation_block != capacity.isolation_block
            or old.market is not capacity.market
            or old.uniform_price != capacity.uniform_price
        ):
            here[node_id] = placement.NodeView(
                node_id=node_id,
                online=online,
                draining=draining,
                ask_micros=capacity.ask_micros,
                free_gpus=gpus,
                offline_reason=offline_reason,
                isolation_block=capacity.isolation_block,
                market=capacity.market,
                uniform_price=capacity.uniform_price,
            )
        self._schedule(node_id, due)

    def _schedule(self, node_id: str, due: float | None) -> None:
        """Bring the node back at ``due``. The heap holds, for each node, an entry no
        later than its due time; a later due time (every heartbeat moves it) pushes
        nothing, and the entry that pops too early is pushed again at the real time,
        so the heap stays at about one entry per node however often nodes are heard
        from (a push per heartbeat grew it by 1,000 entries a second at 10,000 nodes)."""
        due_at = self._due_at
        if due is None:
            due_at.pop(node_id, None)
            return
        current = due_at.get(node_id)
        due_at[node_id] = due
        if current is None or due < current:
            heapq.heappush(self._due, (due, node_id))

    def _liveness_due(self, seen: float | None, online: bool, now: float) -> float | None:
        """When liveness.evaluate's answer for a node last heard from at ``seen`` next
        changes by time alone (None: never, until it is heard from again)."""
        if seen is None:
            return None
        policy = self.registry.policy
        if online:
            return seen + policy.suspect_after
        offline_at = seen + policy.offline_grace
        started = self.registry.started_at
        if seen < started:
            offline_at = max(offline_at, started + policy.restart_grace)
        return offline_at if offline_at >= now else None


def _month_uptime(record: NodeRecord, now: float) -> float:
    """The node's uptime over the last 30 days (since first seen, if later)."""
    return uptime.ratio(record.spans, now, MONTH, record.first_seen)


def _held_by_node(holding: Sequence[LeaseRow]) -> dict[str, set[str]]:
    held: dict[str, set[str]] = {}
    for row in holding:
        if row.node_id is not None:
            held.setdefault(row.node_id, set()).update(row.gpu_uuids)
    return held
