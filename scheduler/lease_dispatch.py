"""Moving leases between the store and the nodes' streams.

- **Placement passes** run on submit, when a node comes online or heartbeats
  while leases wait, when a lease ends (GPUs freed), and every
  ``retry_interval``. A pass reads pending leases and the GPUs placed leases
  hold, asks ``placement.choose`` for each lease, reserves the node's GPUs in
  the database (the offer) and sends ``LeaseAssign`` over the node's stream.
- **Offers** wait for the node's first ``LeaseUpdate`` about the lease, at most
  ``assign_timeout``: any state but rejected accepts it; rejected, no answer or
  no stream sends the lease back to pending (that node excluded) until
  ``max_attempts`` failed offers end it. A node that answers after its deadline
  is told to cancel, so a lease never runs twice.
- **LeaseUpdates** are stored once per (lease_id, update_seq) and always acked
  (duplicates too, so the agent stops re-sending); an update for a lease the
  node should not be running is answered with ``LeaseCancel``.
- **Node loss**: a node going offline loses its placed leases (or re-queues
  them when the lease asked for ``replace_on_lost``). On reconnect the agent's
  Hello lists what it runs: leases it should not run get ``LeaseCancel``;
  leases it no longer lists are lost once its first heartbeat shows they are
  still missing (the agent re-sends unacked updates right after Welcome, so a
  lease that finished while disconnected ends with its real state, not lost).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpuagent.aio import TaskSet, wait_any
from gpuagent.v1 import common_pb2, coordinator_pb2, inventory_pb2, leases_pb2

from . import outputs_store, placement, uptime
from .eligibility import Eligibility
from .leases_store import (
    TERMINAL,
    CancelResult,
    LeaseRow,
    LeaseStore,
    UpdateOutcome,
    state_name,
)
from .liveness import Liveness, is_online
from .market import Asks, node_asks
from .registry import NodeRecord, Registry, Session
from .verify import CopyPlacement, Verifier

log = logging.getLogger(__name__)

Placed = Callable[[str, int], None]  # (gpu model, ask per GPU-hour) of each lease placed

# How often placement re-reads nodes' 30-day uptime: it moves slowly, and reading it
# for every node on every pass is work a 1,000-node pass cannot spare. At most five
# heartbeat intervals, so a node that just joined (uptime 0 at its first Hello, near
# 1.0 a few heartbeats later: scheduler/uptime.py) is not held at 0 for long.
UPTIME_REFRESH_S = 60.0
UPTIME_REFRESH_HEARTBEATS = 5
# Nodes whose uptime one pass re-reads, at most (after the first pass, which reads all).
# A whole 10,000-node re-read in one pass stopped the event loop for over half a second
# (fleet_replicas at 10k: every Submit and heartbeat behind it waited); in slices, the
# rest is read between passes (``run``), so a sweep still ends within its interval.
UPTIME_SLICE = 256
MONTH = dict(uptime.WINDOWS)["30d"]


def request_for(
    spec: leases_pb2.LeaseSpec, pinned: str = "", excluded: frozenset[str] = frozenset()
) -> placement.Request:
    """What placement is asked for a lease spec (one home: passes and quotes)."""
    c = spec.constraints
    return placement.Request(
        gpu_count=spec.gpu_count,
        gpu_model=spec.gpu_model,
        gpu_min_memory_bytes=spec.gpu_min_memory_bytes,
        price_ceiling_micros=spec.price_micro_per_gpu_hour,
        pinned_node_id=pinned,
        excluded=excluded,
        region=c.region,
        countries=frozenset(x.upper() for x in c.countries),
        min_uptime=c.min_uptime_ratio,
        node_selector=tuple(sorted(c.node_selector.items())),
        min_bandwidth_bps=c.min_bandwidth_bits_per_second,
        scratch_bytes=spec.scratch_bytes,
    )


@dataclass(frozen=True)
class DispatchSettings:
    assign_timeout: float = 30.0
    max_attempts: int = 5
    retry_interval: float = 5.0
    default_ask_micros: int = 0
    price_label: str = "price_micros_per_gpu_hour"
    cancel_grace_seconds: int = 0
    require_isolation: bool | None = None  # placement.isolation_block


@dataclass
class _Offer:
    """An assignment waiting for the node's first answer: (outcome, reason)."""

    node_id: str
    answer: asyncio.Future[tuple[str, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def settle(self, outcome: str, reason: str = "") -> None:
        if not self.answer.done():
            self.answer.set_result((outcome, reason))


# Offer outcomes the update handler or a cancel already stored; the rest fail the offer.
_SETTLED = frozenset({"accepted", "rejected", "settled"})


@dataclass
class _Capacity:
    """What placement reads from a node's last heartbeat, cached per node."""

    heartbeat: coordinator_pb2.Heartbeat | None
    gpus: tuple[placement.GpuView, ...]  # free, healthy, not cordoned
    draining: bool
    ask_micros: int  # the lowest ask of its free GPUs
    generation: int = 0  # NodeRecord.generation it was built from
    isolation_block: str = ""  # placement.isolation_block of the node's inventory
    view: placement.NodeView | None = None  # the last pass's view, reused while it holds
    uniform_price: bool = True
    market: placement.NodeMarket = placement.NO_MARKET
    # The view's eligibility answer: built at this Eligibility.generation, good until then.
    eligible_generation: int = -1
    eligible_until_ns: int = 0

    def same_as(self, other: _Capacity) -> bool:
        return (
            self.gpus == other.gpus
            and self.draining == other.draining
            and self.ask_micros == other.ask_micros
            and self.isolation_block == other.isolation_block
            and self.market == other.market
        )


def agent_spec(spec: leases_pb2.LeaseSpec) -> leases_pb2.LeaseSpec:
    """The spec without its placement constraints: they are the coordinator's, already
    applied, and an agent rejects a spec with fields it does not know (unknown_field),
    as every agent before the market did."""
    if not spec.HasField("constraints"):
        return spec
    out = leases_pb2.LeaseSpec()
    out.CopyFrom(spec)
    out.ClearField("constraints")
    return out


def _only_tried(decision: placement.Decision) -> bool:
    """No node is left that could take the lease later: each was offered it before
    (or is not the node it is pinned to)."""
    kinds = set(decision.skipped_counts())
    return bool(kinds) and kinds <= {"already tried", "not pinned"}


def _message(**body: object) -> coordinator_pb2.CoordinatorMessage:
    return coordinator_pb2.CoordinatorMessage(**body)  # type: ignore[arg-type]


class LeaseDispatcher:
    def __init__(
        self,
        store: LeaseStore,
        registry: Registry,
        settings: DispatchSettings = DispatchSettings(),
        *,
        observe_placement: Callable[[float], None] | None = None,
        eligibility: Eligibility | None = None,
        on_placed: Placed | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.observe_placement = observe_placement
        # Attestation and collateral: a GPU that fails either takes no lease.
        self.eligibility = eligibility
        self._wake = asyncio.Event()
        self._place_lock = asyncio.Lock()
        self._offers: dict[str, _Offer] = {}
        self._tasks = TaskSet()
        self._waiting: dict[str, str] = {}  # lease -> last "why not placed", logged on change
        self.on_placed = on_placed
        self._bad_price: set[tuple[str, str]] = set()
        self._uptimes: dict[str, float] = {}  # node -> 30-day uptime, refreshed slowly
        self._uptimes_at = float("-inf")  # when the current sweep over the fleet began
        self._uptime_queue: deque[str] = deque()  # nodes the current sweep has still to read
        self._capacities: dict[str, _Capacity] = {}  # node -> placement's view of it
        self._away_views: dict[str, placement.NodeView] = {}  # nodes with no stream here
        self._last_liveness: dict[str, Liveness] = {}  # at the node's last heartbeat
        # node -> the session whose first heartbeat has been reconciled (one per node): a
        # session's first heartbeat completes the reconnect reconciliation (the connect
        # hooks, on_connect among them, run before any heartbeat of it is read).
        self._reconciled: dict[str, str] = {}
        # node -> (session id, leases assigned on that session before its first heartbeat
        # was reconciled): never "missing", whatever that heartbeat lists. Keyed by node so
        # a session that ends unreconciled leaves nothing behind once its node returns.
        self._assigned_early: dict[str, tuple[str, set[str]]] = {}

    # -- the loop ------------------------------------------------------------------

    # Several replicas (scheduler/replicas.py): nodes whose streams other replicas hold,
    # and how to ask the holder to send a LeaseCancel. None on a single scheduler.
    remote_nodes: Callable[[], Awaitable[set[str]]] | None = None
    # Redundant runs (scheduler/verify.py); None = no verified leases are placed.
    verify: Verifier | None = None
    forward_cancel: Callable[[str, str, str], Awaitable[None]] | None = None
    # A lease's endpoint token hash (EndpointTokens.hash_of), sent in LeaseAssign; and
    # how to ask the other replicas to push a rotated one to a node they hold.
    token_hash: Callable[[str], Awaitable[bytes]] | None = None
    forward_token: Callable[[str], Awaitable[None]] | None = None

    def kick(self) -> None:
        """Ask for a placement pass soon (coalesced)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Placement passes until ``stop``: when kicked, and every ``retry_interval``."""
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.place_pending()
                except Exception:  # one bad pass must not stop placement for good
                    log.exception("placement pass failed")
                await wait_any(self._wake, stop, within=self.settings.retry_interval)
                # Between passes, the uptime sweep goes on in slices sized to end in time.
                per_wait = self.settings.retry_interval / self._uptime_every()
                self._refresh_uptimes(
                    max(UPTIME_SLICE, math.ceil(len(self.registry.nodes) * per_wait))
                )
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop waiting for offers; the store recovers in-flight offers on next start."""
        await self._tasks.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name=name)

    # -- placement -----------------------------------------------------------------

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
            uptime_30d=self._uptimes.get(record.node_id, 0.0),
            bandwidth_bps=offer.bandwidth.bits_per_second,
            scratch_free_bytes=scratch.free_bytes if scratch is not None else None,
        )

    def _uptime_every(self) -> float:
        return min(
            UPTIME_REFRESH_S, UPTIME_REFRESH_HEARTBEATS * self.registry.policy.heartbeat_interval
        )

    def _refresh_uptimes(self, limit: int | None = UPTIME_SLICE) -> None:
        """Every UPTIME_REFRESH_S a sweep re-reads 30-day uptimes, ``limit`` nodes per
        call (all of them on the first call: a pass needs every node's uptime); a
        changed one updates its node's cached market view (and so its placement view)."""
        now = self.registry.clock()
        first = self._uptimes_at == float("-inf")
        if now - self._uptimes_at >= self._uptime_every():
            self._uptimes_at = now
            # Oldest first: a sweep still under way when the next is due goes on, so
            # under a steady stream of passes no node waits more than two intervals.
            queued = set(self._uptime_queue)
            self._uptime_queue.extend(n for n in self.registry.nodes if n not in queued)
        queue = self._uptime_queue
        count = len(queue) if first or limit is None else min(limit, len(queue))
        nodes = self.registry.nodes
        for node_id in (queue.popleft() for _ in range(count)):
            record = nodes.get(node_id)
            if record is None:
                continue
            ratio = uptime.ratio(record.spans, now, MONTH, record.first_seen)
            old = self._uptimes.get(node_id)
            self._uptimes[node_id] = ratio
            capacity = self._capacities.get(node_id)
            if capacity is not None and (old is None or abs(old - ratio) >= 1e-4):
                capacity.market = replace(capacity.market, uptime_30d=ratio)

    def offer_changed(self, node_id: str) -> None:
        """After an OfferUpdate: the node's prices and market view rebuild at the next
        pass (new leases pay the new ask; placed ones keep theirs)."""
        self._capacities.pop(node_id, None)
        if self.store.counts.get("pending", 0) > 0:
            self.kick()

    def _capacity(self, record: NodeRecord) -> _Capacity:
        """The node's free healthy GPUs and price, rebuilt only when its heartbeat changed
        them: a pass over a 10,000-node fleet must not re-read every heartbeat."""
        heartbeat = record.last_heartbeat
        cached = self._capacities.get(record.node_id)
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
            # in C), so nothing is rebuilt; at 10k nodes this runs 1,000 times a second.
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
        capacity = _Capacity(
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
        self._capacities[record.node_id] = capacity
        return capacity

    def node_views(self, holding: Sequence[LeaseRow]) -> list[placement.NodeView]:
        held: dict[str, set[str]] = {}
        for row in holding:
            if row.node_id is not None:
                held.setdefault(row.node_id, set()).update(row.gpu_uuids)
        registry = self.registry
        now = registry.clock()
        policy = registry.policy
        # None when no rule can refuse a GPU. Otherwise a node's last answer is reused
        # while no verdict or collateral changed and none of its verdicts expired, so
        # the fast path below still serves every unchanged node.
        eligibility = (
            self.eligibility
            if self.eligibility is not None and self.eligibility.restricts
            else None
        )
        generation = eligibility.generation if eligibility is not None else 0
        now_ns = round(now * 1e9)
        views: list[placement.NodeView] = []
        append = views.append
        capacities = self._capacities
        sessions = registry.sessions
        self._refresh_uptimes()
        away = self._away_views
        for node_id, record in registry.nodes.items():
            if node_id not in sessions:
                # No stream here: never a candidate, whatever its heartbeat says (with
                # replicas, half the fleet is held elsewhere). Its capacity is not read:
                # a pass that met 5,000 such nodes for the first time (the leader reads
                # in the other replicas' nodes) stopped the loop for 300 ms building
                # capacities nobody could use.
                view = away.get(node_id)
                if view is None:
                    view = away[node_id] = placement.NodeView(
                        node_id=node_id,
                        online=False,
                        draining=False,
                        ask_micros=0,
                        offline_reason="not connected",
                    )
                append(view)
                continue
            capacity = capacities.get(node_id)
            if capacity is None or capacity.heartbeat is not record.last_heartbeat:
                capacity = self._capacity(record)
            view = capacity.view
            seen = record.last_seen
            if (
                view is not None
                and view.online
                and not view.draining
                and view.free_gpus is capacity.gpus
                and view.market is capacity.market  # uptime refreshes replace it
                and is_online(policy, seen, now)
                and (
                    eligibility is None
                    or (
                        capacity.eligible_generation == generation
                        and now_ns < capacity.eligible_until_ns
                    )
                )
                and not record.draining
                and not capacity.draining
                and node_id not in held
            ):
                # Most of a fleet on most passes: online, free, nothing held, nothing
                # filtered, and last pass's view says exactly that. Same outcome as
                # below, a fraction of the work (this loop runs over every node).
                append(view)
                continue
            # The full evaluation only for the reason text.
            online = is_online(policy, seen, now)
            draining = record.draining or capacity.draining
            gpus = capacity.gpus
            if online and not draining and gpus:
                taken = held.get(node_id)
                if taken:
                    gpus = tuple(g for g in gpus if g.uuid not in taken)
                if eligibility is not None:
                    kept, until = eligibility.filter(node_id, gpus, now_ns)
                    gpus = tuple(kept) if kept is not gpus else gpus
                    capacity.eligible_generation = generation
                    capacity.eligible_until_ns = until
            offline_reason = "online" if online else registry.liveness(record).value
            if (
                view is None
                or view.online != online
                or view.draining != draining
                or view.offline_reason != offline_reason
                or view.free_gpus != gpus  # same objects: an identity check per GPU
                or view.isolation_block != capacity.isolation_block
                or view.market is not capacity.market
            ):
                # Building a frozen dataclass per node per pass is most of a pass's cost;
                # a node whose view did not change reuses last pass's.
                view = placement.NodeView(
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
                capacity.view = view
            append(view)
        return views

    async def place_pending(self) -> int:
        """One placement pass; returns how many offers it sent."""
        async with self._place_lock:
            copies: CopyPlacement | None = None
            if self.verify is not None:
                # Redundant runs: copies that ended are judged first (a tie-break copy
                # this stores is placed by this very pass).
                await self.verify.sweep()
            pending, holding, tried = await self.store.placement_view()
            if self.verify is not None:
                groups = await self.verify.placement_groups(pending)
                if groups:
                    copies = CopyPlacement(self.registry, groups)
            waiting = {r.lease_id for r in pending}
            self._waiting = {k: v for k, v in self._waiting.items() if k in waiting}
            if not pending:
                return 0
            nodes = self.node_views(holding)
            offers = 0
            for row in pending:
                request = request_for(
                    row.spec, row.pinned_node_id, frozenset(tried.get(row.lease_id, ()))
                )
                started = time.perf_counter()
                candidates: Sequence[placement.NodeView] = nodes
                if copies is not None and copies.is_copy(row.lease_id):
                    candidates, wait = copies.nodes_for(row.lease_id, nodes, request)
                    if wait:
                        await self._copy_waits(row, wait, copies.parent_of[row.lease_id])
                        continue
                decision = placement.choose(candidates, request)
                if self.observe_placement is not None:
                    self.observe_placement(time.perf_counter() - started)
                summary = decision.summary()
                chosen = decision.placement
                if chosen is None and request.excluded and _only_tried(decision):
                    # Every node it could go to was offered it and said no: waiting
                    # would hold its escrow forever for a node that will not come.
                    last = row.reason.removeprefix("retrying elsewhere; ")
                    ended = await self.store.give_up(
                        row.lease_id, f"rejected by every node it could go to; last: {last}"
                    )
                    if ended is not None:
                        log.warning(
                            "lease rejected by every eligible node",
                            extra={"lease_id": row.lease_id, "reason": ended.reason},
                        )
                        self._waiting.pop(row.lease_id, None)
                    continue
                if chosen is None:
                    if self._waiting.get(row.lease_id) != summary:
                        self._waiting[row.lease_id] = summary
                        log.info(
                            "lease waiting for a node: %s",
                            summary,
                            extra={
                                "lease_id": row.lease_id,
                                "skipped": decision.skipped_counts(),
                            },
                        )
                        await self.store.set_waiting_reason(row.lease_id, f"waiting: {summary}")
                    continue
                was_waiting = self._waiting.pop(row.lease_id, None)
                offered = await self.store.offer(
                    row.lease_id, chosen.node_id, chosen.gpu_uuids, chosen.ask_micros, summary
                )
                if offered is None:
                    continue  # cancelled, or its GPUs taken (another replica), meanwhile
                log.info(
                    "lease offered to node: %s",
                    summary,
                    extra={
                        "lease_id": row.lease_id,
                        "node_id": chosen.node_id,
                        "gpu_uuids": list(chosen.gpu_uuids),
                        "ask_micros": chosen.ask_micros,
                        "attempt": offered.attempts,
                        # A count, not the kinds: wording why each of 10,000 nodes was
                        # passed over cost more than the rest of a placement (py-spy at
                        # 10k agents). A waiting lease still logs the kinds.
                        "skipped": len(decision.rejected),
                    },
                )
                nodes = placement.take(nodes, chosen)
                if copies is not None and copies.is_copy(row.lease_id):
                    copies.placed(row.lease_id, chosen.node_id)
                    if was_waiting is not None:
                        # The parent no longer waits for providers.
                        await self.store.set_waiting_reason(
                            copies.parent_of[row.lease_id],
                            "verifying: copies placed on distinct providers",
                        )
                if self.on_placed is not None:
                    self.on_placed(chosen.gpu_model, chosen.ask_micros)
                self._offers[row.lease_id] = _Offer(chosen.node_id)
                self._spawn(self._offer(offered), f"offer-{row.lease_id}")
                offers += 1
            return offers

    async def _copy_waits(self, row: LeaseRow, why: str, parent_id: str) -> None:
        """A verified lease's copy waits for distinct providers: the copy and its parent
        say so (the buyer looks at the parent)."""
        if self._waiting.get(row.lease_id) == why:
            return
        self._waiting[row.lease_id] = why
        log.info("verified lease copy waiting: %s", why, extra={"lease_id": row.lease_id})
        await self.store.set_waiting_reason(row.lease_id, f"waiting: {why}")
        await self.store.set_waiting_reason(parent_id, f"verifying; waiting: {why}")

    async def quote(self, spec: leases_pb2.LeaseSpec, pinned: str = "") -> placement.Decision:
        """What a pass would decide for ``spec`` now, reserving nothing (Leases.Quote).

        Read-only: the same views and the same ``choose`` as a pass; leases already
        waiting ahead of it are not counted against the nodes it finds."""
        _pending, holding, _tried = await self.store.placement_view()
        return placement.choose(self.node_views(holding), request_for(spec, pinned))

    async def quote_copies(self, spec: leases_pb2.LeaseSpec, replicas: int) -> str:
        """Why a verified lease's ``replicas`` copies would wait now ("" = they would be
        placed): the same distinct-provider rule as a pass, reserving nothing."""
        _pending, holding, _tried = await self.store.placement_view()
        plan = CopyPlacement(
            self.registry, {f"quote.{n}": ("quote", replicas, []) for n in range(replicas)}
        )
        _nodes, wait = plan.nodes_for("quote.0", self.node_views(holding), request_for(spec))
        return wait

    async def _offer(self, row: LeaseRow) -> None:
        assert row.node_id is not None
        node = row.node_id
        offer = self._offers[row.lease_id]
        try:
            outcome, reason = await self._send_and_wait(row, offer)
        finally:
            if self._offers.get(row.lease_id) is offer:
                del self._offers[row.lease_id]
        if outcome in _SETTLED:
            return
        failed = await self.store.offer_failed(
            row.lease_id, node, outcome, reason, self.settings.max_attempts
        )
        if failed is None:
            return  # an update won the race: the node accepted after all
        log.warning(
            "lease offer failed (%s): %s",
            outcome,
            reason,
            extra={"lease_id": row.lease_id, "node_id": node, "state": failed.state},
        )
        if outcome == "timeout":
            # The node may still act on the late assignment: make sure it stops.
            await self._send_cancel(node, row.lease_id, f"offer expired: {reason}")
        self.kick()

    async def _send_and_wait(self, row: LeaseRow, offer: _Offer) -> tuple[str, str]:
        session = self.registry.sessions.get(offer.node_id)
        if session is None:
            return "unreachable", "node has no open stream"
        assign = await self._assign_message(row)
        try:
            await session.send(_message(lease_assign=assign))
        except Exception as exc:
            return "unreachable", f"sending the assignment failed: {exc!r}"
        if self._reconciled.get(offer.node_id) != session.session_id:
            # Also before on_connect has finished (the session is registered, and a pass
            # can offer to it, while on_connect still awaits): the agent's first
            # heartbeat may be a snapshot from before it took this lease on, and the
            # lease would be ended "missing" while the agent runs it, unbilled.
            early = self._assigned_early.get(offer.node_id)
            if early is None or early[0] != session.session_id:
                early = self._assigned_early[offer.node_id] = (session.session_id, set())
            early[1].add(row.lease_id)
        try:
            return await asyncio.wait_for(
                asyncio.shield(offer.answer), self.settings.assign_timeout
            )
        except TimeoutError:
            return "timeout", f"no answer within {self.settings.assign_timeout:g}s"

    # -- agent messages ------------------------------------------------------------

    async def _assign_message(self, row: LeaseRow) -> leases_pb2.LeaseAssign:
        spec = agent_spec(self.store.assign_spec(row))
        assign = leases_pb2.LeaseAssign(lease_id=row.lease_id, spec=spec, gpu_uuids=row.gpu_uuids)
        if spec.ports and not spec.public and self.token_hash is not None:
            # An agent in direct mode checks buyers against it (docs/services.md).
            assign.endpoint_token_sha256 = await self.token_hash(row.lease_id)
        return assign

    def push_token(self, lease_id: str, *, forward: bool = True) -> None:
        """A rotated endpoint token: its hash to the lease's node, as a repeat of the
        LeaseAssign (a duplicate to the agent but for the hash it replaces). With
        ``forward``, a node held by another replica is asked of that replica."""
        self._spawn(self._push_token(lease_id, forward), f"push-token-{lease_id}")

    async def _push_token(self, lease_id: str, forward: bool) -> None:
        row = await self.store.get(lease_id)
        if row is None or row.terminal or not row.node_id:
            return
        session = self.registry.sessions.get(row.node_id)
        if session is None:
            if forward and self.forward_token is not None:
                await self.forward_token(lease_id)  # the holder pushes (not forwarding)
                return
            # Not connected anywhere we know of: the node keeps the old hash until the
            # lease is assigned again; the relay has the new one at once.
            log.info(
                "rotated token not pushed: node not connected to this replica",
                extra={"lease_id": lease_id, "node_id": row.node_id},
            )
            return
        try:
            await session.send(_message(lease_assign=await self._assign_message(row)))
        except Exception as exc:
            log.warning(
                "rotated token not pushed",
                extra={"lease_id": lease_id, "node_id": row.node_id, "error": repr(exc)},
            )

    async def _send_cancel(self, node_id: str, lease_id: str, reason: str) -> bool:
        session = self.registry.sessions.get(node_id)
        if session is None:
            return False
        cancel = leases_pb2.LeaseCancel(
            lease_id=lease_id, reason=reason, grace_seconds=self.settings.cancel_grace_seconds
        )
        try:
            await session.send(_message(lease_cancel=cancel))
        except Exception as exc:
            log.warning(
                "could not send LeaseCancel",
                extra={"lease_id": lease_id, "node_id": node_id, "error": repr(exc)},
            )
            return False
        log.info(
            "LeaseCancel sent", extra={"lease_id": lease_id, "node_id": node_id, "reason": reason}
        )
        return True

    async def on_update(self, session: Session, update: leases_pb2.LeaseUpdate) -> None:
        """``coordinator.on("lease_update", ...)``: store, ack, settle offers."""
        node = session.node_id
        if not update.lease_id or update.update_seq == 0:
            error = common_pb2.ProtocolError(
                code=common_pb2.ProtocolError.MALFORMED,
                message="lease_update needs lease_id and update_seq >= 1",
                in_reply_to="lease_update",
            )
            await session.send(_message(error=error))
            return
        if update.HasField("outputs"):
            await self._check_outputs(session, update)
        state = state_name(update.state)
        result = await self.store.apply_update(node, update, self.settings.max_attempts)
        extra = {
            "lease_id": update.lease_id,
            "node_id": node,
            "update_seq": update.update_seq,
            "state": state,
            "outcome": result.outcome.value,
        }
        outcome = result.outcome
        if outcome in (UpdateOutcome.UNKNOWN, UpdateOutcome.FOREIGN, UpdateOutcome.ENDED):
            log.warning("lease update ignored: %s", outcome.value, extra=extra)
            if state not in TERMINAL:
                why = {
                    UpdateOutcome.UNKNOWN: "unknown lease",
                    UpdateOutcome.FOREIGN: "lease is not placed on this node",
                    UpdateOutcome.ENDED: "lease already ended at the coordinator",
                }[outcome]
                await self._send_cancel(node, update.lease_id, why)
        elif outcome is UpdateOutcome.DUPLICATE:
            log.debug("duplicate lease update acked again", extra=extra)
        else:
            row = result.row
            assert row is not None
            extra["lease_state"] = row.state
            log.info("lease update stored: %s -> %s", result.previous_state, row.state, extra=extra)
            offer = self._offers.get(update.lease_id)
            if offer is not None and offer.node_id == node:
                offer.settle("rejected" if outcome is UpdateOutcome.REJECTED else "accepted")
            if outcome is UpdateOutcome.REJECTED or row.terminal:
                self.kick()
            if row.terminal and self.verify is not None:
                # The terminal update carries the copy's output commitment; only the
                # update has it in hand, so redundant runs listen here.
                try:
                    await self.verify.on_terminal_update(row, update)
                except Exception:  # the sweep before the next pass decides it instead
                    log.exception("judging a redundant-run copy failed", extra=extra)
            if (
                row.cancel_requested_ns is not None
                and not row.terminal
                and result.previous_state == "pending"
            ):
                # Cancelled while the offer was in flight: the node accepted; stop it.
                await self._send_cancel(node, row.lease_id, "cancelled by the buyer")
        ack = leases_pb2.LeaseUpdateAck(lease_id=update.lease_id, update_seq=update.update_seq)
        await session.send(_message(lease_update_ack=ack))

    async def _check_outputs(self, session: Session, update: leases_pb2.LeaseUpdate) -> None:
        """A commitment that is not the node's signed word on this lease is dropped (and
        the agent told): the rest of the update still counts, or the lease would wedge."""
        record = self.registry.nodes.get(session.node_id)
        try:
            outputs_store.check(
                update.outputs,
                lease_id=update.lease_id,
                node_id=session.node_id,
                public_key=record.public_key if record is not None else b"",
            )
        except outputs_store.BadCommitment as exc:
            log.warning(
                "lease outputs refused: %s",
                exc,
                extra={"lease_id": update.lease_id, "node_id": session.node_id},
            )
            update.ClearField("outputs")
            error = common_pb2.ProtocolError(
                code=common_pb2.ProtocolError.REJECTED,
                message=f"lease_update.{exc}",
                in_reply_to="lease_update",
            )
            await session.send(_message(error=error))

    # -- sessions, heartbeats, liveness -----------------------------------------------

    async def on_connect(self, session: Session, record: NodeRecord) -> None:
        """After Welcome: cancel what the node should not run; reconcile the rest at the
        first heartbeat."""
        # register() stored the Hello's lease list as the node's last heartbeat.
        listed = list(record.last_heartbeat.leases) if record.last_heartbeat else []
        running = [s.lease_id for s in listed if state_name(s.state) not in TERMINAL]
        rows = await self.store.get_many(running)
        for lease_id in running:
            row = rows.get(lease_id)
            why = None
            if row is None:
                why = "unknown lease"
            elif row.node_id != session.node_id:
                why = "lease is not placed on this node"
            elif row.terminal:
                why = f"lease already ended at the coordinator ({row.state})"
            elif row.cancel_requested_ns is not None:
                why = "cancelled by the buyer"
            if why is not None:
                await self._send_cancel(session.node_id, lease_id, why)
            elif row is not None and row.spec.ports and not row.spec.public:
                # A token rotated while the node was away: its hash, or a revoked token
                # would keep working at an agent in direct mode.
                self.push_token(lease_id, forward=False)
        if self.store.counts.get("pending", 0) > 0:
            # Only a waiting lease can use the new node; with none, a Hello storm
            # (a whole fleet reconnecting) must not queue a pass per Hello.
            self.kick()

    async def on_heartbeat(self, session: Session, heartbeat: coordinator_pb2.Heartbeat) -> None:
        if self._reconciled.get(session.node_id) != session.session_id:
            self._reconciled[session.node_id] = session.session_id
            early = self._assigned_early.pop(session.node_id, None)
            keep = {s.lease_id for s in heartbeat.leases}
            if early is not None and early[0] == session.session_id:
                keep |= early[1]
            await self._lose_missing(session, keep)
        record = self.registry.nodes.get(session.node_id)
        if record is None:
            return
        # Refreshed here, spread over heartbeats, so a pass finds every node's view ready.
        before = self._capacities.get(session.node_id)
        after = self._capacity(record)
        liveness_changed = self._last_liveness.get(session.node_id) is not record.liveness
        self._last_liveness[session.node_id] = record.liveness
        # Kick only when this heartbeat can change a placement: the node's capacity
        # changed or it just came back online. At 10k nodes a pass per heartbeat
        # (1,000/s) kept the dispatcher busy re-reading the whole fleet.
        if self.store.counts.get("pending", 0) > 0 and (before is not after or liveness_changed):
            self.kick()

    async def _lose_missing(self, session: Session, keep: set[str]) -> None:
        lost = await self.store.node_lost(
            session.node_id, "the agent no longer runs it (missing after reconnect)", keep=keep
        )
        for row in lost:
            log.warning(
                "lease lost: agent does not list it after reconnecting",
                extra={"lease_id": row.lease_id, "node_id": session.node_id, "state": row.state},
            )
            # Should the agent run it after all (a list older than its work), it stops:
            # the coordinator no longer bills it, and a re-queued copy may run elsewhere.
            await self._send_cancel(
                session.node_id,
                row.lease_id,
                "not yours any more: the coordinator "
                + ("re-queued it" if row.state == "pending" else f"ended it ({row.state})")
                + " as missing after your reconnect",
            )
        if lost:
            self.kick()

    async def on_liveness(self, changes: Sequence[tuple[str, Liveness, Liveness]]) -> None:
        """After ``Registry.sweep()``: kick for nodes back online; fail offers to nodes gone
        offline; lose (or re-queue) leases on every offline node.

        Offline nodes are found by evaluating liveness, not only from ``changes``: a
        sweep that runs inside a heartbeat reports its transitions to nobody, and a
        node can be offline since before a restart.
        """
        for node_id, _old, new in changes:
            if new is Liveness.ONLINE:
                self.kick()
            elif new is Liveness.OFFLINE:
                for offer in self._offers.values():
                    if offer.node_id == node_id:
                        offer.settle("unreachable", "node went offline")
        for node_id in sorted(await self.store.nodes_with_leases()):
            record = self.registry.nodes.get(node_id)
            if record is not None and self.registry.liveness(record) is not Liveness.OFFLINE:
                continue
            lost = await self.store.node_lost(
                node_id, f"node {node_id} went offline (no heartbeat within the grace)"
            )
            for row in lost:
                log.warning(
                    "lease re-queued: its node went offline"
                    if row.state == "pending"
                    else "lease ended: its node went offline",
                    extra={"lease_id": row.lease_id, "node_id": node_id, "state": row.state},
                )
            if lost:
                self.kick()

    # -- buyer actions ----------------------------------------------------------------

    async def cancel(self, lease_id: str, reason: str) -> CancelResult | None:
        connected = frozenset(self.registry.sessions)
        if self.remote_nodes is not None:
            # Several replicas: a node another live replica holds is connected too.
            connected |= await self.remote_nodes()
        result = await self.store.cancel(lease_id, reason, connected)
        if result is None:
            return None
        row = result.row
        offer = self._offers.get(lease_id)
        if row.terminal and offer is not None:
            offer.settle("settled")
        if result.notify_node is not None:
            text = reason or "cancelled by the buyer"
            sent = await self._send_cancel(result.notify_node, lease_id, text)
            if not sent and self.forward_cancel is not None:
                await self.forward_cancel(result.notify_node, lease_id, text)
        log.info("lease cancel requested", extra={"lease_id": lease_id, "state": row.state})
        if row.terminal:
            self.kick()
        return result
