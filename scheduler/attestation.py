"""Attestation policy and orchestration: who gets challenged when, and what a verdict means.

Flow per challenge (docs/attestation.md): the scheduler issues a challenge for a node's
GPUs (SKU from each GPU's NVML name in the inventory), starts ``Verifier.prepare`` in a
worker thread while the agent computes, answers each commitment that passes with the
row reveal, judges the openings, stores every verdict with its figures and sends the
agent an AttestationResult. A watchdog fails whatever is still open at the deadline.

Policy:

* A node is challenged when it connects and any free GPU lacks a current verdict, then
  every ``interval`` (up to ``jitter`` earlier, so a fleet does not align), plus at
  unannounced random times (``random_mean``), and after a failure within
  ``retry_after``. Operators trigger one with ``Nodes.Attest``.
* With ``required``, placement takes only GPUs whose latest verdict passed and has not
  expired (``gpu_eligible``); a failure or expiry removes the GPU from placement at once.
* GPUs the agent marks simulated fail with ``simulated`` unless ``accept_simulated``
  (demos): then they are checked for correctness exactly as real ones — signature,
  nonce, identity, every opened entry — but timed against a lenient band instead of the
  datasheet, since the CPU is no GPU. The SKU is stored as ``<sku>@simulated``.
* Only one challenge per node is in flight: two would share the GPUs and both read slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gpuagent import attestation_wire as wire
from gpuagent.aio import TaskSet, wait_any
from gpuagent.attest.skus import SKUS, AcceptanceBand, SkuSpec, sku_for_name
from gpuagent.attest.verifier import AttestationRejected, Verifier
from gpuagent.v1 import attestation_pb2, common_pb2, coordinator_pb2, inventory_pb2

from . import attestation_store as store
from .attestation_store import AttestationRecord
from .config import AttestationConfig
from .coordinator_service import CoordinatorService
from .db import Database
from .eligibility import FOREVER
from .registry import Clock, NodeRecord, Registry, Session

log = logging.getLogger(__name__)

Error = common_pb2.ProtocolError
Listener = Callable[[str], None]

# Reasons beside the verifier's RejectReason values.
UNKNOWN_SKU = "unknown_sku"
SIMULATED = "simulated"
AGENT_ERROR = "agent_error"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
# Failures a retry cannot fix until the node changes: retried at the normal interval.
_PERMANENT = frozenset({UNKNOWN_SKU, SIMULATED})
SIMULATED_SUFFIX = "@simulated"
_NS = 1_000_000_000


class AttestError(Exception):
    """An attestation cannot be started; the message says why (for Nodes.Attest)."""


class NotConnected(AttestError):
    pass


class InFlight(AttestError):
    pass


def sku_for_gpu(reported_name: str) -> SkuSpec | None:
    """The reference-table SKU whose reported product name this is, or None."""
    return sku_for_name(reported_name)


def simulated_variant(sku: SkuSpec, time_limit_s: float) -> SkuSpec:
    """``sku`` with identity rules intact and a band of [~0, time_limit_s] to commit.

    The peak is set absurdly high so the matmul term vanishes and the band is the fixed
    overhead alone: any honest CPU fits, and the figure stored is the CPU's throughput.
    """
    return replace(
        sku,
        sku_id=sku.sku_id + SIMULATED_SUFFIX,
        fp16_tensor_tflops=1e12,
        bf16_tensor_tflops=1e12,
        band=AcceptanceBand(
            low=0.6, high=1.15, fixed_overhead_s=time_limit_s, host_hash_bytes_per_second=math.inf
        ),
    )


@dataclass
class _Gpu:
    uuid: str
    sku: str
    elapsed_ns: int = 0
    revealed_at: float | None = None  # monotonic


@dataclass
class _Flight:
    challenge_id: str
    node_id: str
    session: Session
    gpus: dict[str, _Gpu]  # not yet judged
    issued_at: float  # monotonic
    prepared: asyncio.Future[None]
    results: list[AttestationRecord]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    watchdog: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Attempt:
    """A started attestation: ``results`` fills in as verdicts arrive, then ``done`` is set."""

    challenge_id: str  # "" when no GPU could be challenged
    results: list[AttestationRecord]
    done: asyncio.Event


class AttestationManager:
    def __init__(
        self,
        config: AttestationConfig,
        registry: Registry,
        db: Database,
        *,
        clock: Clock = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.db = db
        self.clock = clock
        self.monotonic = monotonic
        # Schedule jitter only; the verifier draws rows and nonces from its own CSPRNG.
        self._rng = rng or random.Random()  # noqa: S311 - timing jitter, not a secret
        skus = dict(SKUS)
        skus.update(
            (v.sku_id, v)
            for v in (simulated_variant(s, config.simulated_time_limit) for s in SKUS.values())
        )
        self.verifier = Verifier(
            skus=skus,
            open_rows=config.open_rows,
            sample_columns=config.sample_columns,
            open_timeout_s=config.open_timeout,
            clock=monotonic,
        )
        self._latest: dict[tuple[str, str], AttestationRecord] = {}
        self._flights: dict[str, _Flight] = {}
        self._by_node: dict[str, str] = {}  # node_id -> challenge_id in flight
        self._next_due: dict[str, float] = {}  # node_id -> wall clock
        self._rtt: dict[str, float] = {}  # node_id -> last reveal -> openings round trip
        self._listeners: list[Listener] = []
        self._tasks = TaskSet()
        self._wake = asyncio.Event()
        if config.accept_simulated:
            log.warning(
                "attestation.accept_simulated is on: GPUs marked simulated pass on a lenient "
                "timing band. Demo only: never run a real network like this."
            )

    # -- wiring --------------------------------------------------------------------

    async def load(self) -> None:
        """Read the latest verdict per GPU back from the database (startup)."""
        for record in await store.latest(self.db):
            self._latest[(record.node_id, record.gpu_uuid)] = record
        log.info("attestations loaded", extra={"gpus": len(self._latest)})

    def install(self, coordinator: CoordinatorService) -> None:
        coordinator.on("attestation_commit", self._on_commit)
        coordinator.on("attestation_open", self._on_open)
        coordinator.on_connect(self._on_connect)
        coordinator.on_agent_error(self._on_agent_error)

    def add_listener(self, listener: Listener) -> None:
        """Called with a node id whenever one of its verdicts is stored (e.g. to re-place)."""
        self._listeners.append(listener)

    async def close(self) -> None:
        tasks: list[asyncio.Future[Any]] = list(self._tasks)
        for flight in self._flights.values():
            if flight.watchdog is not None:
                tasks.append(flight.watchdog)
            tasks.append(flight.prepared)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- policy queries ------------------------------------------------------------

    def _now_ns(self) -> int:
        return round(self.clock() * _NS)

    def latest(self, node_id: str) -> list[AttestationRecord]:
        """The latest verdict per GPU of the node's inventory, in NVML index order."""
        record = self.registry.nodes.get(node_id)
        if record is None:
            return []
        found = (self._latest.get((node_id, g.uuid)) for g in record.inventory.gpus)
        return [r for r in found if r is not None]

    def gpu_eligible(self, node_id: str, gpu_uuid: str) -> bool:
        """May a new lease use this GPU? (Always, unless ``required``.)"""
        if not self.config.required:
            return True
        record = self._latest.get((node_id, gpu_uuid))
        return record is not None and record.valid(self._now_ns())

    def valid_until(self, node_id: str, gpu_uuid: str, now_ns: int) -> int | None:
        """Until when (ns) a new lease may use this GPU without a new verdict; None when
        it may not now. ``FOREVER`` unless ``required``."""
        if not self.config.required:
            return FOREVER
        record = self._latest.get((node_id, gpu_uuid))
        if record is None or not record.valid(now_ns):
            return None
        return record.expires_ns

    def attested(self, node_id: str) -> bool:
        """Every GPU of the node holds a passed, unexpired verdict (policy aside)."""
        record = self.registry.nodes.get(node_id)
        if record is None or not record.inventory.gpus:
            return False
        now = self._now_ns()
        return all(
            (r := self._latest.get((node_id, g.uuid))) is not None and r.valid(now)
            for g in record.inventory.gpus
        )

    def attested_nodes(self) -> set[str]:
        return {node_id for node_id in self.registry.nodes if self.attested(node_id)}

    def _needs(self, node_id: str, gpu_uuid: str, now_s: float) -> bool:
        record = self._latest.get((node_id, gpu_uuid))
        if record is None:
            return True
        age = now_s - record.created_ns / _NS
        if record.passed:
            return not record.valid(round(now_s * _NS)) or age >= self.config.interval
        if record.reason in _PERMANENT:
            return age >= self.config.interval
        return age >= self.config.retry_after

    def _next_interval(self) -> float:
        wait = self.config.interval - self._rng.uniform(0.0, self.config.jitter)
        if self.config.random_mean > 0:
            wait = min(wait, self._rng.expovariate(1.0 / self.config.random_mean))
        return max(wait, 1.0)

    # -- starting challenges ---------------------------------------------------------

    async def attest(
        self, node_id: str, gpu_uuids: Sequence[str] = (), *, automatic: bool = False
    ) -> Attempt:
        """Challenge the node's GPUs (``gpu_uuids``, default all); see ``Attempt``.

        ``automatic`` (the scheduler's own rounds) skips GPUs held by leases: a matmul
        beside a buyer's workload would read too slow and steal the buyer's GPU time.
        """
        record = self.registry.nodes.get(node_id)
        if record is None:
            raise AttestError(f"no node {node_id!r}")
        session = self.registry.sessions.get(node_id)
        if session is None:
            raise NotConnected(f"node {node_id} is not connected")
        if node_id in self._by_node:
            raise InFlight(f"node {node_id} has challenge {self._by_node[node_id]} in flight")
        inventory = {g.uuid: g for g in record.inventory.gpus}
        unknown = [u for u in gpu_uuids if u not in inventory]
        if unknown:
            raise AttestError(f"node {node_id} has no GPU {', '.join(unknown)}")
        gpus = [inventory[u] for u in gpu_uuids] if gpu_uuids else list(inventory.values())
        if automatic and record.last_heartbeat is not None:
            free = set(record.last_heartbeat.free_gpu_uuids)
            gpus = [g for g in gpus if g.uuid in free]
        challenged, immediate = self._plan(node_id, gpus)
        for failed in immediate:
            await self._store(failed)
        if not challenged:
            done = asyncio.Event()
            done.set()
            self._schedule(node_id, immediate)
            return Attempt("", immediate, done)
        return await self._issue(record, session, challenged, immediate)

    def _plan(
        self, node_id: str, gpus: Iterable[inventory_pb2.GpuInfo]
    ) -> tuple[list[tuple[str, str]], list[AttestationRecord]]:
        gpus = list(gpus)
        has_real = any(not g.simulated for g in gpus)
        challenged: list[tuple[str, str]] = []
        failed: list[AttestationRecord] = []
        now = self._now_ns()

        def fail(gpu: inventory_pb2.GpuInfo, sku: str, reason: str, message: str) -> None:
            failed.append(
                AttestationRecord(
                    node_id, gpu.uuid, "", sku, False, reason, message, 0.0, 0, now, now
                )
            )

        for gpu in gpus:
            sku = sku_for_gpu(gpu.name)
            if sku is None:
                known = ", ".join(n for s in SKUS.values() for n in s.reported_names)
                fail(gpu, "", UNKNOWN_SKU, f"no SKU has the name {gpu.name!r} (known: {known})")
            elif gpu.simulated and not self.config.accept_simulated:
                fail(
                    gpu, sku.sku_id, SIMULATED,
                    "the agent reports this GPU as simulated; only a demo scheduler "
                    "(attestation.accept_simulated: true) accepts those",
                )  # fmt: skip
            elif gpu.simulated and has_real:
                fail(
                    gpu, sku.sku_id, SIMULATED,
                    "simulated and real GPUs on one node: the simulated ones are not judged",
                )  # fmt: skip
            elif gpu.simulated:
                challenged.append((gpu.uuid, sku.sku_id + SIMULATED_SUFFIX))
            else:
                challenged.append((gpu.uuid, sku.sku_id))
        return challenged, failed

    def _allowance(self, node_id: str) -> float:
        # A prover can inflate its measured round trip by answering slowly; the cap
        # bounds what that buys.
        measured = self._rtt.get(node_id, self.config.network_allowance)
        return min(max(measured, self.config.network_allowance), self.config.max_network_allowance)

    async def _issue(
        self,
        record: NodeRecord,
        session: Session,
        gpus: list[tuple[str, str]],
        immediate: list[AttestationRecord],
    ) -> Attempt:
        node_id = record.node_id
        simulated = gpus[0][1].endswith(SIMULATED_SUFFIX)
        size = self.config.simulated_size if simulated else self.config.size
        challenge = self.verifier.issue(
            Ed25519PublicKey.from_public_bytes(record.public_key),
            gpus,
            network_allowance_s=self._allowance(node_id),
            sizes=(size.n, size.inner) if size is not None else None,
            dtype=self.config.dtype,
            target_seconds=self.config.target_seconds,
        )
        issued_at = self.monotonic()
        cid = challenge.challenge_id
        flight = _Flight(
            challenge_id=cid,
            node_id=node_id,
            session=session,
            gpus={uuid: _Gpu(uuid, sku) for uuid, sku in gpus},
            issued_at=issued_at,
            # The expected entries take (k + s) * K generations: seconds for a big GPU,
            # done while the agent computes so the openings check is just a comparison.
            prepared=asyncio.ensure_future(asyncio.to_thread(self.verifier.prepare, cid)),
            results=list(immediate),
        )
        self._flights[cid] = flight
        self._by_node[node_id] = cid
        log.info(
            "attestation challenge issued",
            extra={
                "node_id": node_id,
                "challenge": cid,
                "gpus": len(gpus),
                "skus": sorted({s for _, s in gpus}),
                "sizes": sorted({(t.n, t.inner) for t in challenge.tasks}),
            },
        )
        ttl = max(0.0, challenge.expires_unix_s - self.clock())
        flight.watchdog = asyncio.create_task(
            self._watch(flight, ttl + self.config.open_timeout), name=f"attest-watch-{cid}"
        )
        try:
            await session.send(
                coordinator_pb2.CoordinatorMessage(
                    attestation_challenge=wire.challenge_to_pb(challenge)
                )
            )
        except Exception as exc:
            await self._fail_pending(flight, UNREACHABLE, f"challenge could not be sent: {exc!r}")
        return Attempt(cid, flight.results, flight.done)

    async def _watch(self, flight: _Flight, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flight.done.wait(), within)
            return
        await self._fail_pending(
            flight, TIMEOUT, f"no commitment or openings within {within:.1f}s of the challenge"
        )

    # -- the schedule ----------------------------------------------------------------

    def _schedule(self, node_id: str, results: Sequence[AttestationRecord]) -> None:
        now = self.clock()
        retry = any(not r.passed and r.reason not in _PERMANENT for r in results)
        self._next_due[node_id] = now + (
            self.config.retry_after if retry or not results else self._next_interval()
        )
        self._wake.set()

    def _due(self, node_id: str, now: float) -> bool:
        due = self._next_due.get(node_id)
        if due is not None:
            return now >= due
        # First look at this node since the scheduler started: due if any GPU is.
        record = self.registry.nodes[node_id]
        if any(self._needs(node_id, g.uuid, now) for g in record.inventory.gpus):
            return True
        oldest = min(
            (r.created_ns / _NS for r in self.latest(node_id)), default=now - self.config.interval
        )
        self._next_due[node_id] = oldest + self._next_interval()
        return now >= self._next_due[node_id]

    async def tick(self) -> list[str]:
        """Start every attestation that is due; returns the challenge ids started."""
        self.verifier.expire()
        if not self.config.enabled:
            return []
        now = self.clock()
        started = []
        for node_id in list(self.registry.sessions):
            if node_id in self._by_node or not self._due(node_id, now):
                continue
            try:
                attempt = await self.attest(node_id, automatic=True)
            except AttestError as exc:
                log.info("attestation not started: %s", exc, extra={"node_id": node_id})
                continue
            if attempt.challenge_id:
                started.append(attempt.challenge_id)
        return started

    async def run(self, stop: asyncio.Event) -> None:
        """Periodic attestation until ``stop``."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("attestation round failed")
            self._wake.clear()
            wait = min(60.0, self.config.retry_after, self.config.interval / 4)
            await wait_any(self._wake, stop, within=wait)

    # -- agent messages --------------------------------------------------------------

    async def _on_connect(self, session: Session, record: NodeRecord) -> None:
        if not self.config.enabled or record.node_id in self._by_node:
            return
        if not self._due(record.node_id, self.clock()):
            return
        # The hook must return at once: the session's reader starts after it.
        self._tasks.spawn(self._attest_quietly(record.node_id), name="attest-connect")

    async def _attest_quietly(self, node_id: str) -> None:
        try:
            await self.attest(node_id, automatic=True)
        except AttestError as exc:
            log.info("attestation not started: %s", exc, extra={"node_id": node_id})

    async def _on_agent_error(self, session: Session, error: common_pb2.ProtocolError) -> None:
        if error.in_reply_to not in ("attestation_challenge", "attestation_reveal"):
            return
        cid = self._by_node.get(session.node_id)
        flight = self._flights.get(cid) if cid else None
        if flight is None:
            return
        await self._fail_pending(
            flight,
            AGENT_ERROR,
            f"agent refused {error.in_reply_to}: {Error.Code.Name(error.code)}: {error.message}",
            revealed_only=error.in_reply_to == "attestation_reveal",
        )

    async def _lookup(
        self, session: Session, challenge_id: str, gpu_uuid: str, kind: str
    ) -> tuple[_Flight, _Gpu] | None:
        flight = self._flights.get(challenge_id)
        gpu = flight.gpus.get(gpu_uuid) if flight is not None else None
        if flight is None or flight.node_id != session.node_id or gpu is None:
            text = (
                f"no attestation of GPU {gpu_uuid!r} in challenge {challenge_id!r} is "
                "awaiting this message from this node"
            )
            log.warning("attestation message out of order: %s", text)
            error = Error(code=Error.OUT_OF_ORDER, message=text, in_reply_to=kind)
            with contextlib.suppress(Exception):
                await session.send(coordinator_pb2.CoordinatorMessage(error=error))
            return None
        return flight, gpu

    async def _on_commit(self, session: Session, pb: attestation_pb2.AttestationCommit) -> None:
        found = await self._lookup(session, pb.challenge_id, pb.gpu_uuid, "attestation_commit")
        if found is None:
            return
        flight, gpu = found
        if gpu.revealed_at is not None:
            await self._judge(flight, gpu, False, "replayed", "second commitment for this GPU")
            return
        gpu.elapsed_ns = round((self.monotonic() - flight.issued_at) * _NS)
        if pb.error:
            await self._judge(flight, gpu, False, AGENT_ERROR, pb.error)
            return
        try:
            reveal = self.verifier.check_commitment(wire.commitment_from_pb(pb))
        except AttestationRejected as exc:
            await self._judge(flight, gpu, False, exc.reason.value, exc.message)
            return
        gpu.revealed_at = self.monotonic()
        # Answer on the stream the commit came over: a newer session of the same node
        # (the agent reconnected mid-challenge) carries on where the old one stopped.
        flight.session = session
        await session.send(
            coordinator_pb2.CoordinatorMessage(attestation_reveal=wire.reveal_to_pb(reveal))
        )

    async def _on_open(self, session: Session, pb: attestation_pb2.AttestationOpen) -> None:
        found = await self._lookup(session, pb.challenge_id, pb.gpu_uuid, "attestation_open")
        if found is None:
            return
        flight, gpu = found
        if gpu.revealed_at is None:
            await self._judge(flight, gpu, False, "malformed", "openings before any reveal")
            return
        self._rtt[flight.node_id] = self.monotonic() - gpu.revealed_at
        try:
            await flight.prepared
        except Exception:
            # check_openings computes the expected entries itself when prepare failed.
            log.exception("attestation prepare failed", extra={"challenge": flight.challenge_id})
        try:
            verdict = self.verifier.check_openings(wire.openings_from_pb(pb))
        except AttestationRejected as exc:
            await self._judge(flight, gpu, False, exc.reason.value, exc.message)
            return
        await self._judge(flight, gpu, True, "ok", verdict.message, verdict.measured_tflops)

    # -- verdicts --------------------------------------------------------------------

    async def _fail_pending(
        self, flight: _Flight, reason: str, message: str, *, revealed_only: bool = False
    ) -> None:
        for gpu in list(flight.gpus.values()):
            if not revealed_only or gpu.revealed_at is not None:
                await self._judge(flight, gpu, False, reason, message)

    async def _judge(
        self,
        flight: _Flight,
        gpu: _Gpu,
        passed: bool,
        reason: str,
        message: str,
        measured_tflops: float = 0.0,
    ) -> None:
        if flight.gpus.pop(gpu.uuid, None) is None:
            return  # judged already (a watchdog and a late message racing)
        now = self._now_ns()
        expires = now + round(self.config.validity * _NS) if passed else now
        record = AttestationRecord(
            flight.node_id, gpu.uuid, flight.challenge_id, gpu.sku, passed, reason, message,
            measured_tflops, gpu.elapsed_ns, now, expires,
        )  # fmt: skip
        flight.results.append(record)
        await self._store(record)
        if not flight.gpus:
            # Bookkeeping before telling the agent: once the last verdict is stored the
            # node is no longer "in flight" (a manual or periodic attestation right now
            # must not be refused while the result message is still being written).
            self._finish(flight)
        result = attestation_pb2.AttestationResult(
            challenge_id=flight.challenge_id,
            gpu_uuid=gpu.uuid,
            passed=passed,
            reason=reason,
            measured_tflops=measured_tflops,
            message=message,
            sku=gpu.sku,
            elapsed_ns=gpu.elapsed_ns,
        )
        session = self.registry.sessions.get(flight.node_id)
        if session is not None:
            with contextlib.suppress(Exception):
                await session.send(coordinator_pb2.CoordinatorMessage(attestation_result=result))

    def in_flight(self, node_id: str) -> bool:
        """Is a challenge of this node outstanding (some GPU not judged yet)?"""
        return node_id in self._by_node

    def _finish(self, flight: _Flight) -> None:
        self._flights.pop(flight.challenge_id, None)
        if self._by_node.get(flight.node_id) == flight.challenge_id:
            del self._by_node[flight.node_id]
        flight.done.set()
        if flight.watchdog is not None and flight.watchdog is not asyncio.current_task():
            flight.watchdog.cancel()
        self._schedule(flight.node_id, flight.results)

    async def _store(self, record: AttestationRecord) -> None:
        await store.insert(self.db, record)
        self._latest[(record.node_id, record.gpu_uuid)] = record
        extra = {
            "node_id": record.node_id,
            "gpu": record.gpu_uuid,
            "challenge": record.challenge_id,
            "sku": record.sku,
            "reason": record.reason,
            "measured_tflops": round(record.measured_tflops, 3),
            "elapsed_s": round(record.elapsed_ns / _NS, 3),
        }
        if record.passed:
            log.info("GPU attested", extra=extra)
        else:
            log.warning("GPU failed attestation: %s", record.message, extra=extra)
        for listener in self._listeners:
            try:
                listener(record.node_id)
            except Exception:
                log.exception("attestation listener failed")
