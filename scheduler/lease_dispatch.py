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
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gpuagent.v1 import common_pb2, coordinator_pb2, inventory_pb2, leases_pb2

from . import placement
from .leases_store import (
    TERMINAL,
    CancelResult,
    LeaseRow,
    LeaseStore,
    UpdateOutcome,
    state_name,
)
from .liveness import Liveness
from .registry import NodeRecord, Registry, Session

log = logging.getLogger(__name__)

GpuEligible = Callable[[str, str], bool]  # (node_id, gpu_uuid) -> may take leases


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
    ask_micros: int
    generation: int = 0  # NodeRecord.generation it was built from
    isolation_block: str = ""  # placement.isolation_block of the node's inventory
    view: placement.NodeView | None = None  # the last pass's view, reused while it holds

    def same_as(self, other: _Capacity) -> bool:
        return (
            self.gpus == other.gpus
            and self.draining == other.draining
            and self.ask_micros == other.ask_micros
            and self.isolation_block == other.isolation_block
        )


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
        gpu_eligible: GpuEligible | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.observe_placement = observe_placement
        # Set by attestation once it exists: a GPU that fails it takes no lease.
        self.gpu_eligible = gpu_eligible
        self._wake = asyncio.Event()
        self._place_lock = asyncio.Lock()
        self._offers: dict[str, _Offer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, str] = {}  # lease -> last "why not placed", logged on change
        self._bad_price: set[tuple[str, str]] = set()
        self._capacities: dict[str, _Capacity] = {}  # node -> placement's view of it
        self._last_liveness: dict[str, Liveness] = {}  # at the node's last heartbeat
        # node -> session id whose first heartbeat completes the reconnect reconciliation
        self._reconcile: dict[str, Session] = {}
        # session id -> leases assigned on it before its reconciliation: not "missing".
        self._assigned_early: dict[str, set[str]] = {}

    # -- the loop ------------------------------------------------------------------

    # Several replicas (scheduler/replicas.py): nodes whose streams other replicas hold,
    # and how to ask the holder to send a LeaseCancel. None on a single scheduler.
    remote_nodes: Callable[[], Awaitable[set[str]]] | None = None
    forward_cancel: Callable[[str, str, str], Awaitable[None]] | None = None

    def kick(self) -> None:
        """Ask for a placement pass soon (coalesced)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Placement passes until ``stop``: when kicked, and every ``retry_interval``."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.place_pending()
                except Exception:  # one bad pass must not stop placement for good
                    log.exception("placement pass failed")
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    {woken, stopping},
                    timeout=self.settings.retry_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
        finally:
            stopping.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop waiting for offers; the store recovers in-flight offers on next start."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- placement -----------------------------------------------------------------

    def ask_price(self, record: NodeRecord) -> int:
        raw = record.labels.get(self.settings.price_label)
        if raw is None:
            return self.settings.default_ask_micros
        text = raw.strip()
        if text.isdigit():
            return int(text)
        if (record.node_id, raw) not in self._bad_price:
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
        return self.settings.default_ask_micros

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
        gpus = tuple(
            placement.GpuView(gpu.uuid, gpu.name, gpu.memory_total_bytes, gpu.index)
            for gpu in record.inventory.gpus
            if gpu.uuid in free
        )
        capacity = _Capacity(
            heartbeat=heartbeat,
            gpus=gpus,
            draining=hb.draining,
            ask_micros=self.ask_price(record),
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
        suspect_after = registry.policy.suspect_after
        eligible = self.gpu_eligible
        views: list[placement.NodeView] = []
        append = views.append
        capacities = self._capacities
        sessions = registry.sessions
        for node_id, record in registry.nodes.items():
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
                and seen is not None
                and now - seen <= suspect_after
                and eligible is None
                and node_id in sessions
                and not record.draining
                and not capacity.draining
                and node_id not in held
            ):
                # Most of a fleet on most passes: online, free, nothing held, nothing
                # filtered, and last pass's view says exactly that. Same outcome as
                # below, a fraction of the work (this loop runs over every node).
                append(view)
                continue
            connected = node_id in sessions
            # Inline liveness: ONLINE exactly when heard from within suspect_after
            # (liveness.evaluate); the full evaluation only for the reason text.
            seen = record.last_seen
            online = connected and seen is not None and now - seen <= suspect_after
            draining = record.draining or capacity.draining
            gpus = capacity.gpus
            if online and not draining and gpus:
                taken = held.get(node_id)
                if taken:
                    gpus = tuple(g for g in gpus if g.uuid not in taken)
                if eligible is not None:
                    gpus = tuple(g for g in gpus if eligible(node_id, g.uuid))
            offline_reason = "online"
            if not connected:
                offline_reason = "not connected"
            elif not online:
                offline_reason = registry.liveness(record).value
            if (
                view is None
                or view.online != online
                or view.draining != draining
                or view.offline_reason != offline_reason
                or view.free_gpus != gpus  # same objects: an identity check per GPU
                or view.isolation_block != capacity.isolation_block
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
                )
                capacity.view = view
            append(view)
        return views

    async def place_pending(self) -> int:
        """One placement pass; returns how many offers it sent."""
        async with self._place_lock:
            pending, holding, tried = await self.store.placement_view()
            waiting = {r.lease_id for r in pending}
            self._waiting = {k: v for k, v in self._waiting.items() if k in waiting}
            if not pending:
                return 0
            nodes = self.node_views(holding)
            offers = 0
            for row in pending:
                spec = row.spec
                request = placement.Request(
                    gpu_count=spec.gpu_count,
                    gpu_model=spec.gpu_model,
                    gpu_min_memory_bytes=spec.gpu_min_memory_bytes,
                    price_ceiling_micros=spec.price_micro_per_gpu_hour,
                    pinned_node_id=row.pinned_node_id,
                    excluded=frozenset(tried.get(row.lease_id, ())),
                )
                started = time.perf_counter()
                decision = placement.choose(nodes, request)
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
                self._waiting.pop(row.lease_id, None)
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
                        "skipped": decision.skipped_counts(),
                    },
                )
                nodes = placement.take(nodes, chosen)
                self._offers[row.lease_id] = _Offer(chosen.node_id)
                self._spawn(self._offer(offered), f"offer-{row.lease_id}")
                offers += 1
            return offers

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
        assign = leases_pb2.LeaseAssign(
            lease_id=row.lease_id, spec=self.store.assign_spec(row), gpu_uuids=row.gpu_uuids
        )
        try:
            await session.send(_message(lease_assign=assign))
        except Exception as exc:
            return "unreachable", f"sending the assignment failed: {exc!r}"
        if self._reconcile.get(offer.node_id) is session:
            self._assigned_early.setdefault(session.session_id, set()).add(row.lease_id)
        try:
            return await asyncio.wait_for(
                asyncio.shield(offer.answer), self.settings.assign_timeout
            )
        except TimeoutError:
            return "timeout", f"no answer within {self.settings.assign_timeout:g}s"

    # -- agent messages ------------------------------------------------------------

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
            if (
                row.cancel_requested_ns is not None
                and not row.terminal
                and result.previous_state == "pending"
            ):
                # Cancelled while the offer was in flight: the node accepted; stop it.
                await self._send_cancel(node, row.lease_id, "cancelled by the buyer")
        ack = leases_pb2.LeaseUpdateAck(lease_id=update.lease_id, update_seq=update.update_seq)
        await session.send(_message(lease_update_ack=ack))

    # -- sessions, heartbeats, liveness -----------------------------------------------

    async def known_lease_ids(self, node_id: str) -> list[str]:
        """For Welcome: leases the coordinator believes run on ``node_id``."""
        return [r.lease_id for r in await self.store.on_node(node_id) if r.state != "pending"]

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
        self._reconcile[session.node_id] = session
        if self.store.counts.get("pending", 0) > 0:
            # Only a waiting lease can use the new node; with none, a Hello storm
            # (a whole fleet reconnecting) must not queue a pass per Hello.
            self.kick()

    async def on_heartbeat(self, session: Session, heartbeat: coordinator_pb2.Heartbeat) -> None:
        if self._reconcile.get(session.node_id) is session:
            del self._reconcile[session.node_id]
            keep = {s.lease_id for s in heartbeat.leases}
            keep |= self._assigned_early.pop(session.session_id, set())
            lost = await self.store.node_lost(
                session.node_id, "the agent no longer runs it (missing after reconnect)", keep=keep
            )
            for row in lost:
                log.warning(
                    "lease lost: agent does not list it after reconnecting",
                    extra={
                        "lease_id": row.lease_id,
                        "node_id": session.node_id,
                        "state": row.state,
                    },
                )
            if lost:
                self.kick()
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
