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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuagent.aio import TaskSet, wait_any
from gpuagent.v1 import common_pb2, coordinator_pb2, leases_pb2

from . import outputs_store, placement
from .eligibility import Eligibility
from .leases_store import (
    TERMINAL,
    CancelResult,
    LeaseRow,
    LeaseStore,
    UpdateOutcome,
    state_name,
)
from .liveness import Liveness
from .market import Asks
from .node_views import IDLE_SLICE, UPTIME_SLICE, NodeViews
from .registry import NodeRecord, Registry, Session
from .verify import CopyPlacement, Verifier

log = logging.getLogger(__name__)

Placed = Callable[[str, int], None]  # (gpu model, ask per GPU-hour) of each lease placed


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
        self.views = NodeViews(registry, settings, eligibility)
        self._last_liveness: dict[str, Liveness] = {}  # at the node's last heartbeat
        # node -> the session whose first heartbeat has been reconciled (one per node): a
        # session's first heartbeat completes the reconnect reconciliation (the connect
        # hooks, on_connect among them, run before any heartbeat of it is read).
        self._reconciled: dict[str, str] = {}
        # node -> (session id, leases assigned on that session before its first heartbeat
        # was reconciled): never "missing", whatever that heartbeat lists. Keyed by node so
        # a session that ends unreconciled leaves nothing behind once its node returns.
        self._assigned_early: dict[str, tuple[str, set[str]]] = {}
        # Several replicas: lease -> when (monotonic) this replica may offer it too. A
        # lease submitted on another replica is that replica's to offer first, to the
        # nodes it holds; two replicas offering every lease at once wrote the same row
        # at once, and PostgreSQL ran one of them again (docs/scaling.md).
        self._not_before: dict[str, float] = {}
        self._home_here: set[str] = set()  # submitted here, not yet placed or released

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
    # Several replicas: tell the others that no node here fits a lease submitted here,
    # so they offer it at once instead of after ``home_first``.
    release_home: Callable[[str], Awaitable[None]] | None = None

    def kick(self) -> None:
        """Ask for a placement pass soon (coalesced)."""
        self._wake.set()

    def submitted(self, lease_id: str, home: bool, home_first: float) -> None:
        """A lease was submitted (on this replica when ``home``): a pass, now or, for
        another replica's lease, once ``home_first`` has passed, unless that replica
        releases it sooner (``released``)."""
        if home:
            self._home_here.add(lease_id)
        elif home_first > 0:
            self._not_before[lease_id] = time.monotonic() + home_first
            asyncio.get_running_loop().call_later(home_first, self.kick)
        self.kick()

    def released(self, lease_id: str) -> None:
        """Its home replica has no node for it: offer it now."""
        self._not_before.pop(lease_id, None)
        self.kick()

    async def run(self, stop: asyncio.Event) -> None:
        """Placement passes until ``stop``: when kicked, and every ``retry_interval``."""
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.place_pending()
                except Exception:  # one bad pass must not stop placement for good
                    log.exception("placement pass failed")
                if not self.store.counts.get("pending", 0):
                    await self._between_passes()  # kicked often, with nothing to place
                await wait_any(self._wake, stop, within=self.settings.retry_interval)
                await self._between_passes()
        finally:
            await self.shutdown()

    async def _between_passes(self) -> None:
        """Work no Submit waits on, in slices, until a pass is asked for: the uptime
        sweep (sized to end within its interval) and the views of what changed since
        the last pass (with no lease waiting no pass runs, and the first Submit after
        an idle hour must not evaluate all of it). It used to run whole after every
        wait, kicks included, so a Submit's pass waited behind 1,000 uptime reads."""
        per_wait = self.settings.retry_interval / self.views.uptime_every()
        uptimes = max(UPTIME_SLICE, math.ceil(len(self.registry.nodes) * per_wait))
        while uptimes > 0 and not self._wake.is_set():
            read = self.views.refresh_uptimes(min(IDLE_SLICE, uptimes))
            uptimes -= IDLE_SLICE
            await asyncio.sleep(0)  # a Submit's kick gets in between slices
            if not read:
                break
        for _ in range(math.ceil(len(self.registry.nodes) / IDLE_SLICE) + 1):
            if self._wake.is_set() or self.views.catch_up(IDLE_SLICE):
                break
            await asyncio.sleep(0)  # as above

    async def shutdown(self) -> None:
        """Stop waiting for offers; the store recovers in-flight offers on next start."""
        await self._tasks.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name=name)

    # -- placement -----------------------------------------------------------------

    def asks(self, record: NodeRecord) -> Asks:
        """The node's ask per GPU model: its offer, else its old label, else the default."""
        return self.views.asks(record)

    def ask_price(self, record: NodeRecord) -> int:
        """The node's lowest ask over its GPU models (what a node of one model asks)."""
        return self.views.ask_price(record)

    def offer_changed(self, node_id: str) -> None:
        """After an OfferUpdate: the node's prices and market view rebuild at the next
        pass (new leases pay the new ask; placed ones keep theirs)."""
        self.views.offer_changed(node_id)
        if self.store.counts.get("pending", 0) > 0:
            self.kick()

    def node_views(self, holding: Sequence[LeaseRow]) -> list[placement.NodeView]:
        """Every node's view for a pass (scheduler/node_views.py keeps them current)."""
        return self.views.current(holding)

    async def place_pending(self) -> int:
        """One placement pass; returns how many offers it sent."""
        async with self._place_lock:
            copies: CopyPlacement | None = None
            view = await self.store.placement_view()
            if self.verify is not None and view.copies_ended:
                # Redundant runs: copies that ended are judged first, and the view read
                # again (a tie-break copy this stores is placed by this very pass).
                await self.verify.sweep()
                view = await self.store.placement_view()
            pending, holding, tried = view.pending, view.holding, view.tried
            if self.verify is not None and view.copies:
                groups = await self.verify.placement_groups(
                    [r for r in pending if r.lease_id in view.copies]
                )
                if groups:
                    copies = CopyPlacement(self.registry, groups)
            waiting = {r.lease_id for r in pending}
            self._waiting = {k: v for k, v in self._waiting.items() if k in waiting}
            self._not_before = {k: v for k, v in self._not_before.items() if k in waiting}
            self._home_here &= waiting
            if not pending:
                return 0
            nodes, away = self.views.split(holding)
            offers = 0
            now = time.monotonic()
            for row in pending:
                if self._not_before.get(row.lease_id, now) > now and (
                    copies is None or not copies.is_copy(row.lease_id)
                ):
                    # Its home replica offers it first. Not a redundant run's copy: the
                    # copies need distinct providers, which one replica may not hold.
                    continue
                request = request_for(
                    row.spec, row.pinned_node_id, frozenset(tried.get(row.lease_id, ()))
                )
                started = time.perf_counter()
                if copies is not None and copies.is_copy(row.lease_id):
                    candidates, wait = copies.nodes_for(row.lease_id, [*nodes, *away], request)
                    if wait:
                        await self._copy_waits(row, wait, copies.parent_of[row.lease_id])
                        continue
                    decision = placement.choose(candidates, request)
                else:
                    # The nodes held elsewhere are rejected untested ("not connected").
                    decision = placement.choose(nodes, request, away)
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
                    if row.lease_id in self._home_here and self.release_home is not None:
                        self._home_here.discard(row.lease_id)
                        await self.release_home(row.lease_id)
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
        holding = (await self.store.placement_view()).holding
        return placement.choose(self.node_views(holding), request_for(spec, pinned))

    async def quote_copies(self, spec: leases_pb2.LeaseSpec, replicas: int) -> str:
        """Why a verified lease's ``replicas`` copies would wait now ("" = they would be
        placed): the same distinct-provider rule as a pass, reserving nothing."""
        holding = (await self.store.placement_view()).holding
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
        capacity_changed = self.views.heartbeat(record)
        liveness_changed = self._last_liveness.get(session.node_id) is not record.liveness
        self._last_liveness[session.node_id] = record.liveness
        # Kick only when this heartbeat can change a placement: the node's capacity
        # changed or it just came back online. At 10k nodes a pass per heartbeat
        # (1,000/s) kept the dispatcher busy re-reading the whole fleet.
        if self.store.counts.get("pending", 0) > 0 and (capacity_changed or liveness_changed):
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
