"""The lease manager: from an assignment to a finished, cleaned-up container.

The link calls ``assign``/``cancel``; ``run`` watches Docker events and expiry
deadlines; ``reconcile`` (run once at start) makes Docker and the state DB agree
after a restart. Every state change is stored in the state DB together with the
``LeaseUpdate`` reporting it, then published: updates queue in order and one
delivery task hands each to ``on_update`` outside every lease lock, so a slow
consumer (a gRPC write, an outbox write) never stalls a lease transition, and a
consumer may call back into the manager. If delivery fails, the update stays in
the DB (``pending_updates``) until ``ack_update``.

Work on one lease is serialised by a per-lease lock; different leases proceed
concurrently. Nothing a lease does may crash the manager: unexpected errors fail
that lease with a reason and are logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import sqlite3
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil
from pydantic import ValidationError

from gpuagent import leaserules
from gpuagent.aio import TaskSet, wait_any
from gpuagent.units import format_size

from ..config import AgentConfig, RuntimeConfig
from . import restarts
from .allocator import AllocationError, GpuAllocator
from .docker_runtime import (
    RESYNC,
    ContainerExists,
    ContainerInfo,
    DockerRuntime,
    RuntimeFailure,
    parse_docker_time,
)
from .endpoints import ServiceTarget
from .health import ServiceMonitor
from .output_keeper import OutputKeeper
from .output_pack import PackFailed
from .records import EndpointStatus, LeaseRecord, LeaseUpdate, bound_log_tail
from .spec import (
    FreeCapacity,
    GpuDescription,
    ImageRef,
    LeaseRejected,
    LeaseSpec,
    RejectCode,
    check_spec,
    effective_cpus,
    effective_memory,
    effective_scratch,
    parse_spec,
    validate_lease_id,
)
from .statedb import StateDB
from .states import LeaseState, check_transition

log = logging.getLogger(__name__)

UpdateCallback = Callable[[LeaseUpdate], Awaitable[None]]
# Endpoint-only updates (readiness flips) go out at most this often per lease: a
# flapping server must not flood the coordinator; the latest state always goes out.
ENDPOINT_REPORT_MIN_S = 1.0


class ServiceObserver(Protocol):
    """Where health-check results and restarts are counted (agent metrics)."""

    def health_check(self, lease_id: str, kind: str, passed: bool) -> None: ...

    def restarted(self, lease_id: str, cause: str) -> None: ...

    def lease_ended(self, lease_id: str) -> None: ...


class EndpointPublisher(Protocol):
    """Where an agent in direct mode serves service leases itself (agent/direct/)."""

    async def publish(
        self, lease_id: str, ports: Sequence[leaserules.Port], public: bool
    ) -> None: ...

    async def withdraw(self, lease_id: str) -> None: ...

    async def retain(self, lease_ids: Iterable[str]) -> None: ...

    def address_of(self, lease_id: str, name: str) -> tuple[str, bool]: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class HostCapacity:
    """What the host has in total; leases share it minus the configured reserves."""

    memory_bytes: int
    cpus: float

    @classmethod
    def detect(cls) -> HostCapacity:
        return cls(memory_bytes=psutil.virtual_memory().total, cpus=float(os.cpu_count() or 1))


@dataclass(frozen=True)
class LeaseView:
    lease_id: str
    state: LeaseState
    gpu_uuids: tuple[str, ...]
    container_id: str | None
    expires_at: float | None


@dataclass(frozen=True)
class LeasesSnapshot:
    leases: tuple[LeaseView, ...]
    allocations: Mapping[str, str]  # GPU UUID -> lease id


@dataclass(frozen=True)
class RunningLease:
    lease_id: str
    container_id: str
    gpu_uuids: tuple[str, ...]
    started_monotonic: float


def _free_under(path: Path) -> int | None:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class LeaseManager:
    def __init__(
        self,
        config: AgentConfig,
        runtime: DockerRuntime,
        statedb: StateDB,
        allocator: GpuAllocator,
        node_id: str,
        gpu_uuids_source: Callable[[], list[str]],
        on_update: UpdateCallback,
        simulated_gpus: bool = False,
        clock: Clock | None = None,
        gpu_details_source: Callable[[], Mapping[str, GpuDescription]] | None = None,
        host: HostCapacity | None = None,
        gpu_gate: Callable[[], str | None] | None = None,
        service_observer: ServiceObserver | None = None,
        before_cleanup: UpdateCallback | None = None,
        outputs: OutputKeeper | None = None,
        publisher: EndpointPublisher | None = None,
    ) -> None:
        self._config = config
        self._policy = config.runtime
        self._runtime = runtime
        self._db = statedb
        self._allocator = allocator
        self.node_id = node_id
        self._gpu_source = gpu_uuids_source
        self._gpu_details = gpu_details_source
        self._on_update = on_update
        self._simulated = simulated_gpus
        self._clock: Clock = clock or SystemClock()
        self._host = host or HostCapacity.detect()
        # Why GPU leases are refused on this host now (isolation.toolkit), or None.
        self._gpu_gate = gpu_gate
        # Awaited with an ended lease's terminal update while its container and network
        # still exist: the usage sampler's last reading of the network's counters, which
        # go with the network (see _end).
        self._before_cleanup = before_cleanup
        # Batch outputs: packed in _end, before the terminal state is recorded, because
        # an archive over its limit changes that state (PROTOCOL.md "Lease outputs").
        self.outputs = outputs
        self._active: dict[str, LeaseRecord] = {}  # non-terminal leases only
        self._specs: dict[str, LeaseSpec] = {}
        # Weak: a lease's lock lives while a task holds or awaits it, so the map
        # does not grow with every lease ever seen.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._launches: dict[str, asyncio.Task[None]] = {}
        self._tasks = TaskSet()
        self._started_mono: dict[str, float] = {}
        # Leases whose container Docker reported dead but whose end is still being
        # recorded (inspect, log tail, state DB): no longer "running" for metering,
        # so a sampler tick in that window does not bill past the container's death.
        self._exited: set[str] = set()
        # Service leases: the running monitor of each lease with ports, the container's
        # address on its lease network, restarts waiting out their backoff, and the
        # endpoint reports waiting out ENDPOINT_REPORT_MIN_S.
        self._monitors: dict[str, tuple[ServiceMonitor, asyncio.Task[None]]] = {}
        self._addresses: dict[str, str] = {}
        self._restart_tasks: dict[str, asyncio.Task[None]] = {}
        self._report_due: set[str] = set()
        self._last_report: dict[str, float] = {}
        self.service_observer = service_observer
        self.publisher = publisher
        self._deadlines_changed = asyncio.Event()
        # Published updates not yet handed to on_update, oldest first (see _notify).
        self._published: collections.deque[LeaseUpdate] = collections.deque()
        self._delivery: asyncio.Task[None] | None = None
        self._loaded = False
        self._reconciled = False

    # -- public API -------------------------------------------------------------

    async def assign(
        self,
        lease_id: str,
        spec: Mapping[str, Any] | LeaseSpec,
        expires_at: float | None = None,
        gpu_uuids: Sequence[str] | None = None,
    ) -> None:
        """Take on a lease; idempotent by ``lease_id`` (a repeat is logged and ignored).

        ``expires_at`` is unix seconds (None: only ``max_duration_seconds`` bounds
        it); ``gpu_uuids`` is the coordinator's choice of GPUs, or None.
        """
        await self._load()
        if not isinstance(lease_id, str):
            log.error(
                "lease assignment without a string id ignored", extra={"lease_id": repr(lease_id)}
            )
            return
        async with self._lock(lease_id):
            known = lease_id in self._active
            if not known:
                known = await asyncio.to_thread(self._db.get, lease_id) is not None
            if known:
                stored_record = self._active.get(lease_id) or await asyncio.to_thread(
                    self._db.get, lease_id
                )
                if stored_record is not None and stored_record.extra.get("tombstone"):
                    log.warning(
                        "assignment of a lease cancelled before it arrived ignored",
                        extra={"lease_id": lease_id},
                    )
                else:
                    log.info("duplicate lease assignment ignored", extra={"lease_id": lease_id})
                return
            now = self._clock.time()
            stored: dict[str, Any] = {}
            try:
                validate_lease_id(lease_id)
                parsed = parse_spec(spec)
                stored = parsed.stored()
                await self._check_disk(effective_scratch(parsed, self._policy))
                ref = check_spec(parsed, self._policy, self._free_capacity())
                self._check_outputs(parsed)
                refusal = self._gpu_gate() if parsed.gpu_count and self._gpu_gate else None
                if refusal:
                    raise LeaseRejected(RejectCode.TOOLKIT_VULNERABLE, refusal)
                try:
                    gpus = self._allocator.allocate(
                        lease_id, parsed.gpu_count, self._gpu_source(), gpu_uuids
                    )
                except AllocationError as exc:
                    raise LeaseRejected(RejectCode.GPU_CONFLICT, str(exc)) from None
            except LeaseRejected as exc:
                await self._reject(lease_id, stored, exc, now)
                return
            deadlines = [t for t in (expires_at,) if t]
            if parsed.max_duration_seconds:
                deadlines.append(now + parsed.max_duration_seconds)
            record = LeaseRecord(
                lease_id=lease_id,
                state=LeaseState.ASSIGNED,
                spec=stored,
                created_at=now,
                updated_at=now,
                gpu_uuids=gpus,
                expires_at=min(deadlines) if deadlines else None,
                update_seq=1,
            )
            update = self._update_for(record, now)
            if not await asyncio.to_thread(self._db.insert_new, record, update):
                self._allocator.release(lease_id)
                return
            self._active[lease_id] = record
            self._specs[lease_id] = parsed
            log.info(
                "lease assigned",
                extra={"lease_id": lease_id, "image": parsed.image, "gpus": list(gpus)},
            )
            await self._notify(update)
            self._launches[lease_id] = asyncio.create_task(
                self._launch(lease_id, parsed, ref), name=f"lease-{lease_id}"
            )
            self._deadlines_changed.set()

    async def cancel(self, lease_id: str, reason: str = "", grace: float | None = None) -> None:
        """Stop a lease (SIGTERM, then SIGKILL after ``grace``); idempotent."""
        await self._stop_lease(
            lease_id, LeaseState.CANCELLED, reason or "cancelled by the coordinator", grace
        )

    async def reconcile(self) -> None:
        """Make Docker and the state DB agree; run once at start, before new work."""
        await self._load()
        containers = await self._runtime.list_managed()
        self._runtime.note_networks(containers)
        by_lease: dict[str, ContainerInfo] = {}
        for info in containers:
            record = self._active.get(info.lease_id)
            claimed = record is not None and record.container_id in (None, info.id)
            if not claimed or info.lease_id in by_lease:
                known = await asyncio.to_thread(self._db.get, info.lease_id)
                log.warning(
                    "removing container no active lease claims",
                    extra={
                        "container_id": info.id,
                        "lease_id": info.lease_id,
                        "recorded_state": known.state if known else None,
                    },
                )
                await self._runtime.remove(info.id)
                await self._runtime.remove_scratch(info.lease_id)
                continue
            by_lease[info.lease_id] = info
        for lease_id, record in list(self._active.items()):
            async with self._lock(lease_id):
                await self._reconcile_one(record, by_lease.get(lease_id))
        await self._runtime.sweep_networks(set(self._active), containers)
        if self.publisher is not None:
            await self.publisher.retain(set(self._active))
        self._reconciled = True
        self._deadlines_changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch Docker events and expiry deadlines until ``stop``. Leases keep running."""
        if not self._reconciled:
            await self.reconcile()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_events(stop), name="lease-events")
                tg.create_task(self._expiry_loop(stop), name="lease-expiry")
                tg.create_task(self._runtime.keep_spares(stop), name="lease-networks")
                if self._runtime.scratch.mode == "measured":
                    tg.create_task(self._scratch_watch(stop), name="lease-scratch")
        finally:
            # Launches and stops in flight end here; what they left half done is
            # in the state DB and the next reconcile finishes it.
            # Updates not yet delivered are in the state DB and go out after the restart.
            delivery = [self._delivery] if self._delivery is not None else []
            pending = [
                *self._launches.values(),
                *self._tasks,
                *self._restart_tasks.values(),
                *delivery,
            ]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def update_policy(self, runtime: RuntimeConfig) -> None:
        """New admission limits and allow-lists (SIGHUP); running leases keep theirs."""
        self._policy = runtime
        self._runtime.update_config(runtime)

    def snapshot(self) -> LeasesSnapshot:
        views = tuple(
            LeaseView(r.lease_id, r.state, r.gpu_uuids, r.container_id, r.expires_at)
            for r in self._active.values()
        )
        return LeasesSnapshot(views, self._allocator.allocations())

    def running_leases(self) -> list[RunningLease]:
        return [
            RunningLease(
                r.lease_id, r.container_id or "", r.gpu_uuids, self._started_mono[r.lease_id]
            )
            for r in self._active.values()
            if r.state is LeaseState.RUNNING
            and r.lease_id in self._started_mono
            and r.lease_id not in self._exited
        ]

    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        """``endpoints.ServiceTargets``: where the tunnel reaches ``port`` of a running lease.

        None for an unknown, ended, stopping or not-yet-running lease, an undeclared
        port or a udp one (never relayed); ``ready`` is False until the port's check
        passes, while it fails, and while the container waits to be restarted.
        """
        record = self._active.get(lease_id)
        if record is None or record.state is not LeaseState.RUNNING or record.stop_state:
            return None
        spec = self._spec_of(record)
        declared = leaserules.find_port(spec.service_ports(), port) if spec else None
        host = self._addresses.get(lease_id)
        if declared is None or host is None:
            return None
        protocol = leaserules.port_protocol(declared)
        if protocol not in ("http", "tcp"):
            return None
        name = leaserules.port_name(declared)
        monitor = self._monitors.get(lease_id)
        ready = (
            monitor is not None and monitor[0].ready(name) and lease_id not in self._restart_tasks
        )
        return ServiceTarget(
            lease_id=lease_id,
            name=name,
            host=host,
            port=declared.container_port,
            protocol="http" if protocol == "http" else "tcp",
            ready=ready,
        )

    def endpoints(self, lease_id: str) -> tuple[EndpointStatus, ...]:
        """The lease's declared ports and their health now (``gpu-agent leases``, updates)."""
        record = self._active.get(lease_id)
        return self._endpoint_statuses(record) if record is not None else ()

    def holds(self, lease_id: str) -> bool:
        """Whether the lease is one this node runs now (not ended, not refused)."""
        return lease_id in self._active

    def endpoint_readiness(self) -> dict[tuple[str, str], bool]:
        """(lease id, port name) -> ready, for every declared port of a lease this node
        holds (``gpu_agent_lease_endpoint_ready``, read at scrape time: an ended lease
        is simply absent)."""
        return {
            (record.lease_id, status.name): status.ready
            for record in list(self._active.values())
            for status in self._endpoint_statuses(record)
        }

    async def pending_updates(self) -> list[LeaseUpdate]:
        """Updates the coordinator has not acknowledged: re-send them after a reconnect."""
        return await asyncio.to_thread(self._db.pending_updates)

    async def ack_update(self, lease_id: str, seq: int) -> None:
        await asyncio.to_thread(self._db.ack_update, lease_id, seq)

    # -- lifecycle --------------------------------------------------------------

    async def _launch(self, lease_id: str, spec: LeaseSpec, ref: ImageRef) -> None:
        try:
            async with self._lock(lease_id):
                if not await self._advance(lease_id, LeaseState.PULLING):
                    return
            try:
                await self._runtime.ensure_image(spec.image, ref, spec.registry_auth)
            except RuntimeFailure as exc:
                await self._fail_unstarted(lease_id, str(exc))
                return
            async with self._lock(lease_id):
                if not await self._advance(lease_id, LeaseState.STARTING):
                    return
                record = self._active[lease_id]
                try:
                    container_id = await self._runtime.create(
                        lease_id, spec, record.gpu_uuids, record.expires_at, not self._simulated
                    )
                except ContainerExists as exc:
                    # Only an earlier attempt at this very lease can hold the name.
                    container_id = exc.container_id
                except RuntimeFailure as exc:
                    await self._end(record, LeaseState.FAILED, reason=str(exc))
                    return
                record = record.evolve(container_id=container_id)
                await self._save(record)
                if record.stop_state is not None:
                    await self._finish_stopped(record)
                    return
                try:
                    docker_started = await self._runtime.start(container_id)
                except RuntimeFailure as exc:
                    await self._end(record, LeaseState.FAILED, reason=str(exc))
                    return
                now_wall, now_mono = self._clock.time(), self._clock.monotonic()
                started_wall = docker_started if docker_started is not None else now_wall
                # Docker's start instant on our monotonic clock (never in the future).
                self._started_mono[lease_id] = now_mono - max(0.0, now_wall - started_wall)
                record = self._active[lease_id]
                if record.state is LeaseState.STARTING:
                    await self._publish(lease_id)  # the running update carries the address
                    await self._transition(record, LeaseState.RUNNING, started_at=started_wall)
                    log.info(
                        "lease running", extra={"lease_id": lease_id, "container_id": container_id}
                    )
                    await self._start_monitor(lease_id)
            # A very short job may already have exited before the events watcher
            # looked; checking once here closes that gap.
            self._spawn(self._finalize(lease_id), f"lease-check-{lease_id}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("lease launch failed", extra={"lease_id": lease_id})
            await self._fail_unstarted(lease_id, f"internal agent error: {exc}")
        finally:
            self._launches.pop(lease_id, None)

    async def _advance(self, lease_id: str, state: LeaseState) -> bool:
        """Move a live lease to ``state``; False if it has ended or is being stopped."""
        record = self._active.get(lease_id)
        if record is None or record.stop_state is not None:
            return False
        await self._transition(record, state)
        return True

    async def _fail_unstarted(self, lease_id: str, reason: str) -> None:
        async with self._lock(lease_id):
            record = self._active.get(lease_id)
            if record is not None:
                if record.container_id:
                    await self._runtime.remove(record.container_id)
                await self._end(record, LeaseState.FAILED, reason=reason)

    async def _stop_lease(
        self, lease_id: str, state: LeaseState, reason: str, grace: float | None
    ) -> None:
        await self._load()
        grace = self._policy.stop_grace if grace is None or grace <= 0 else grace
        async with self._lock(lease_id):
            record = self._active.get(lease_id)
            if record is None:
                if state is LeaseState.CANCELLED and await self._tombstone(lease_id, reason):
                    return
                log.info("stop for a lease not running ignored", extra={"lease_id": lease_id})
                return
            if record.stop_state is None:
                record = record.evolve(stop_state=state, stop_reason=reason)
                await self._save(record)
            launch = self._launches.get(lease_id)
            if record.state in (LeaseState.ASSIGNED, LeaseState.PULLING) and launch is not None:
                # Nothing runs yet: abandoning the pull is the whole stop.
                launch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await launch
                await self._end(record, record.stop_state or state, reason=record.stop_reason)
                return
            container_id = record.container_id
        if container_id:
            log.info("stopping lease", extra={"lease_id": lease_id, "state": state, "grace": grace})
            try:
                await self._runtime.stop(container_id, grace)
            except RuntimeFailure as exc:
                log.error("stop failed; removing", extra={"lease_id": lease_id, "error": str(exc)})
                await self._runtime.remove(container_id)
            self._exited.add(lease_id)
            await self._finalize(lease_id)
        elif record.state is not LeaseState.STARTING:
            async with self._lock(lease_id):
                current = self._active.get(lease_id)
                if current is not None:
                    await self._end(
                        current, current.stop_state or state, reason=current.stop_reason
                    )
        # STARTING without a container: the launch sees stop_state and ends it.

    async def _finalize(self, lease_id: str, *, startup: bool = False) -> None:
        """Turn an exited (or vanished) container into its terminal state; idempotent."""
        async with self._lock(lease_id):
            record = self._active.get(lease_id)
            if record is None or not record.container_id:
                return
            info = await self._runtime.inspect(record.container_id)
            if info is not None and info.status in ("running", "paused", "restarting"):
                self._exited.discard(lease_id)  # restarted outside the agent: still running
                return
            if info is not None and info.status == "created" and not startup:
                return  # the launch is about to start it
            await self._finalize_locked(record, info)

    async def _finalize_locked(self, record: LeaseRecord, info: ContainerInfo | None) -> None:
        if info is None:
            await self._end(
                record,
                record.stop_state or LeaseState.LOST,
                reason=record.stop_reason or "container vanished (removed outside the agent)",
            )
            return
        if info.status == "created":
            await self._end(
                record,
                record.stop_state or LeaseState.LOST,
                reason=record.stop_reason or "agent restarted before the container started",
            )
            return
        if record.state is LeaseState.STARTING:
            # It ran, however briefly: say so before saying how it ended.
            record = await self._transition(
                record,
                LeaseState.RUNNING,
                container_id=info.id,
                started_at=parse_docker_time(info.started_at) or self._clock.time(),
            )
        if record.stop_state is None and record.lease_id in self._restart_tasks:
            return  # exited, counted, and waiting out its backoff: nothing to decide again
        tail = bound_log_tail(await self._runtime.logs_tail(info.id))
        exit_code = info.exit_code
        if record.stop_state is not None:
            state, reason = record.stop_state, record.stop_reason
        elif info.oom_killed:
            spec_memory = effective_memory(LeaseSpec.model_validate(record.spec), self._policy)
            state = LeaseState.FAILED
            reason = f"out of memory: the container exceeded its {spec_memory} byte memory limit"
        elif exit_code == 0:
            state, reason = LeaseState.SUCCEEDED, ""
        else:
            state = LeaseState.FAILED
            reason = f"container exited with code {exit_code}"
            if info.error:
                reason += f": {info.error}"
        if record.stop_state is None:
            decision = self._restart_decision(record, info, reason)
            if decision is not None and decision.restart:
                await self._schedule_restart(record, decision)
                return
            if decision is not None:
                state, reason = LeaseState.FAILED, decision.reason
        extra = dict(record.extra)
        if info.finished_at is not None:
            # The container's real end: if it exited while the agent was down, the
            # final usage record must stop there, not when the agent came back.
            extra["ended_at"] = info.finished_at
        await self._end(
            record, state, reason=reason, exit_code=exit_code, log_tail=tail, extra=extra
        )

    async def _finish_stopped(self, record: LeaseRecord) -> None:
        if record.container_id:
            await self._runtime.remove(record.container_id)
        await self._end(
            record, record.stop_state or LeaseState.CANCELLED, reason=record.stop_reason
        )

    def _check_outputs(self, spec: LeaseSpec) -> None:
        if not spec.outputs:
            return
        if self.outputs is None:
            raise LeaseRejected(
                RejectCode.INVALID_SPEC, "outputs: this agent keeps no lease outputs"
            )
        self.outputs.check(spec)

    async def _keep_outputs(
        self, record: LeaseRecord, state: LeaseState, changes: dict[str, Any]
    ) -> LeaseState:
        """Pack a batch lease's declared outputs while its scratch dir exists; the
        commitment goes in its record (and so in its terminal update). A pack that
        fails (over output_max, required paths missing, disk floor) fails the lease."""
        if (
            self.outputs is None
            or state not in (LeaseState.SUCCEEDED, LeaseState.FAILED)
            or record.started_at is None
        ):
            return state
        spec = self._spec_of(record)
        if spec is None or not spec.outputs:
            return state
        try:
            commitment = await self.outputs.keep(
                record.lease_id, spec, self._runtime.scratch_dir(record.lease_id)
            )
        except Exception as exc:
            why = exc.reason if isinstance(exc, PackFailed) else f"outputs_failed: {exc}"
            if not isinstance(exc, PackFailed):
                log.exception("packing outputs failed", extra={"lease_id": record.lease_id})
            earlier = changes.get("reason") or ""
            changes["reason"] = f"{why} (and before that: {earlier})" if earlier else why
            return LeaseState.FAILED
        extra = dict(changes.get("extra", record.extra))
        extra["outputs"] = commitment.to_json()
        changes["extra"] = extra
        return state

    async def _end(self, record: LeaseRecord, state: LeaseState, **changes: Any) -> None:
        """Record the terminal state first, then clean up: a crash in between leaves a
        container that reconcile removes, never a lease that looks alive."""
        # Before anything is recorded: a crash during or after the pack repeats this end
        # on restart (the container is still there), and the pack is idempotent.
        state = await self._keep_outputs(record, state, changes)
        self._stop_monitor(record.lease_id)
        restart = self._restart_tasks.pop(record.lease_id, None)
        if restart is not None and restart is not asyncio.current_task():
            restart.cancel()
        self._addresses.pop(record.lease_id, None)
        self._last_report.pop(record.lease_id, None)
        if self.service_observer is not None:
            self.service_observer.lease_ended(record.lease_id)
        ended = await self._transition(record, state, notify=False, stop_state=None, **changes)
        if self.publisher is not None:
            await self.publisher.withdraw(record.lease_id)
        update = self._update_for(ended, ended.updated_at)
        self._allocator.release(record.lease_id)
        self._specs.pop(record.lease_id, None)
        self._started_mono.pop(record.lease_id, None)
        self._exited.discard(record.lease_id)
        if self._before_cleanup is not None and update.container_id:
            # The sampler stopped reading the lease at its container's death and its final
            # reading (on the published update) comes after the removal below: without
            # this one, a lease that ended within a sample interval of its last closed
            # record would have a final record with its network flagged unmeasured.
            try:
                await self._before_cleanup(update)
            except Exception:
                log.exception(
                    "reading an ended lease's usage failed", extra={"lease_id": record.lease_id}
                )
        try:
            if record.container_id:
                await self._runtime.remove(record.container_id)
            await self._runtime.remove_network(record.lease_id)
            await self._runtime.remove_scratch(record.lease_id)
        except RuntimeFailure as exc:
            log.warning(
                "lease cleanup failed", extra={"lease_id": record.lease_id, "error": str(exc)}
            )
        log.info(
            "lease ended",
            extra={
                "lease_id": record.lease_id,
                "state": state,
                "reason": changes.get("reason", ""),
            },
        )
        # Reported only now, so a coordinator that sees the end can reuse the GPUs.
        await self._notify(update)

    async def _reconcile_one(self, record: LeaseRecord, info: ContainerInfo | None) -> None:
        lease_id = record.lease_id
        if info is None:
            reason = (
                "container vanished while the agent was down"
                if record.state is LeaseState.RUNNING
                else "agent restarted before the container started"
            )
            await self._end(
                record, record.stop_state or LeaseState.LOST, reason=record.stop_reason or reason
            )
            return
        record = record.evolve(container_id=info.id)
        await self._save(record)
        if info.status not in ("running", "paused", "restarting"):
            await self._finalize_locked(record, info)
            return
        self._allocator.restore(lease_id, info.gpu_uuids or record.gpu_uuids)
        # Docker's StartedAt when the agent died before recording the start itself.
        started_at = record.started_at or parse_docker_time(info.started_at) or self._clock.time()
        self._started_mono[lease_id] = self._clock.monotonic() - max(
            0.0, self._clock.time() - started_at
        )
        if record.stop_state is None:
            await self._publish(lease_id)  # the same host ports as before the restart
        if record.state is not LeaseState.RUNNING:
            record = await self._transition(record, LeaseState.RUNNING, started_at=started_at)
        log.info("lease re-adopted", extra={"lease_id": lease_id, "container_id": info.id})
        if record.stop_state is None:
            await self._start_monitor(lease_id)
        expires_at = record.expires_at
        # Expired while the agent was down: stop it now, not at the next tick.
        if (
            record.stop_state is None
            and expires_at is not None
            and expires_at <= self._clock.time()
        ):
            record = record.evolve(
                stop_state=LeaseState.EXPIRED,
                stop_reason=f"lease expired at {_iso(expires_at)}",
            )
            await self._save(record)
        if record.stop_state is not None:
            # Expired while down, or the agent died while stopping it: finish the job.
            self._spawn(
                self._stop_lease(lease_id, record.stop_state, record.stop_reason, None),
                f"lease-stop-{lease_id}",
            )

    # -- watchers ---------------------------------------------------------------

    async def _watch_events(self, stop: asyncio.Event) -> None:
        async for event in self._runtime.events(stop):
            if event.action == RESYNC:
                # A reconnect is how a Docker restart shows here, and a restarting
                # Docker rewrites the filter table: check the egress policy now.
                self._runtime.recheck_firewall()
                for lease_id, record in list(self._active.items()):
                    if record.container_id and record.state is LeaseState.RUNNING:
                        self._spawn(self._finalize(lease_id), f"lease-check-{lease_id}")
            elif event.action == "oom":
                log.warning(
                    "lease container hit its memory limit", extra={"lease_id": event.lease_id}
                )
            elif event.action in ("die", "destroy") and event.lease_id in self._active:
                self._exited.add(event.lease_id)
                self._spawn(self._finalize(event.lease_id), f"lease-exit-{event.lease_id}")

    async def _scratch_watch(self, stop: asyncio.Event) -> None:
        """Measured scratch mode: stop a lease that wrote more than its quota.

        Loop mode needs none of this: the filesystem is the quota.
        """
        while not stop.is_set():
            for lease_id, record in list(self._active.items()):
                if record.state is not LeaseState.RUNNING or record.stop_state is not None:
                    continue
                spec = self._specs.get(lease_id) or LeaseSpec.model_validate(record.spec)
                quota = effective_scratch(spec, self._policy)
                try:
                    used = await self._runtime.scratch_used(lease_id)
                except OSError:
                    continue
                if used > quota:
                    reason = (
                        f"scratch_quota_exceeded: /scratch holds {format_size(used)}, over "
                        f"the lease's {format_size(quota)} quota"
                    )
                    log.warning("lease over its scratch quota", extra={"lease_id": lease_id})
                    self._spawn(
                        self._stop_lease(lease_id, LeaseState.FAILED, reason, None),
                        f"lease-scratch-{lease_id}",
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._policy.scratch_check_interval)

    async def _expiry_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = self._clock.time()
            upcoming = []
            for lease_id, record in list(self._active.items()):
                if record.expires_at is None or record.stop_state is not None:
                    continue
                if record.expires_at <= now:
                    reason = f"lease expired at {_iso(record.expires_at)}"
                    self._spawn(
                        self._stop_lease(lease_id, LeaseState.EXPIRED, reason, None),
                        f"lease-expire-{lease_id}",
                    )
                else:
                    upcoming.append(record.expires_at)
            # Sleep to the next deadline, but wake when leases come and go, and
            # at least once a minute so a wall-clock jump is noticed.
            timeout = min([60.0, *(t - now for t in upcoming)])
            self._deadlines_changed.clear()
            await wait_any(stop, self._deadlines_changed, within=max(timeout, 0.01))

    # -- helpers ----------------------------------------------------------------

    async def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for record in await asyncio.to_thread(self._db.leases, active_only=True):
            self._active[record.lease_id] = record
            if record.state is not LeaseState.RUNNING:
                # Re-adopted leases get their GPUs from container labels in reconcile.
                self._allocator.restore(record.lease_id, record.gpu_uuids)

    def _lock(self, lease_id: str) -> asyncio.Lock:
        lock = self._locks.get(lease_id)
        if lock is None:
            lock = self._locks[lease_id] = asyncio.Lock()
        return lock

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease task failed", extra={"task": name})

        self._tasks.spawn(guarded(), name=name)

    def _free_capacity(self) -> FreeCapacity:
        used_memory = 0
        used_cpus = 0.0
        for lease_id, record in self._active.items():
            spec = self._specs.get(lease_id) or LeaseSpec.model_validate(record.spec)
            used_memory += effective_memory(spec, self._policy)
            used_cpus += effective_cpus(spec, self._policy)
        return FreeCapacity(
            gpus=self._allocator.free(self._gpu_source()),
            memory_bytes=self._host.memory_bytes - self._policy.memory_reserve - used_memory,
            cpus=self._host.cpus - self._policy.cpu_reserve - used_cpus,
            gpu_details=self._gpu_details() if self._gpu_details else None,
        )

    async def _reject(
        self, lease_id: str, stored: dict[str, Any], exc: LeaseRejected, now: float
    ) -> None:
        rejection = exc.rejection
        log.warning(
            "lease rejected",
            extra={"lease_id": lease_id, "code": rejection.code, "reason": rejection.message},
        )
        record = LeaseRecord(
            lease_id=lease_id,
            state=LeaseState.REJECTED,
            spec=stored,
            created_at=now,
            updated_at=now,
            reason=str(rejection),
            update_seq=1,
            extra={"reject_code": rejection.code.value},
        )
        update = self._update_for(record, now)
        try:
            inserted = await asyncio.to_thread(self._db.insert_new, record, update)
        except (sqlite3.Error, OSError) as exc:
            # Disk full, say: the refusal is still worth telling (nothing runs, nothing
            # is billed), it just will not be re-sent after a restart.
            log.error(
                "cannot store a lease rejection; reporting it anyway",
                extra={"lease_id": lease_id, "error": str(exc)},
            )
            inserted = True
        if inserted:
            await self._notify(update)

    async def _check_disk(self, scratch_quota: int) -> None:
        """Refuse a lease while the state dir is nearly full: its state changes and
        usage records could not be stored, so it would run unbilled and untracked; and
        one whose scratch quota, filled, would take the host below that floor."""
        state_dir = self._config.node.state_dir
        need = self._policy.min_free_state_disk
        try:
            free = (await asyncio.to_thread(shutil.disk_usage, state_dir)).free
        except OSError as exc:
            raise LeaseRejected(
                RejectCode.INSUFFICIENT_DISK, f"cannot read free space under {state_dir}: {exc}"
            ) from None
        if free < need:
            raise LeaseRejected(
                RejectCode.INSUFFICIENT_DISK,
                f"only {free} bytes free under the agent's state dir {state_dir} "
                f"(runtime.min_free_state_disk is {need})",
            )
        scratch_free = await asyncio.to_thread(_free_under, self._runtime.scratch_root)
        if scratch_free is not None and scratch_quota > scratch_free - need:
            raise LeaseRejected(
                RejectCode.INSUFFICIENT_DISK,
                f"scratch quota {format_size(scratch_quota)} does not fit: "
                f"{format_size(max(scratch_free - need, 0))} free for scratch on this host",
            )

    async def _tombstone(self, lease_id: str, reason: str) -> bool:
        """Remember a cancel that overtook its assignment; False if the lease is known.

        Messages can be reordered across a reconnect (the cancel on a new session, the
        assign re-sent late): without this, the late assign would start a lease the
        coordinator already cancelled. The lease ends CANCELLED before it began, the
        coordinator is told so, and a later assign of the id is ignored.
        """
        try:
            validate_lease_id(lease_id)
        except LeaseRejected:
            return False
        now = self._clock.time()
        record = LeaseRecord(
            lease_id=lease_id,
            state=LeaseState.CANCELLED,
            spec={},
            created_at=now,
            updated_at=now,
            reason=f"cancelled before it was assigned: {reason}",
            update_seq=1,
            extra={"tombstone": True},
        )
        update = self._update_for(record, now)
        if not await asyncio.to_thread(self._db.insert_new, record, update):
            return False
        log.warning(
            "cancel for a lease not yet assigned; a later assignment of it will be ignored",
            extra={"lease_id": lease_id, "reason": reason},
        )
        await self._notify(update)
        return True

    def _update_for(self, record: LeaseRecord, now: float) -> LeaseUpdate:
        return LeaseUpdate(
            lease_id=record.lease_id,
            seq=record.update_seq,
            state=record.state,
            at=now,
            reason=record.reason if record.state.terminal else "",
            exit_code=record.exit_code,
            # Every ended lease with output: the buyer reads it with `gpu-scheduler logs`.
            log_tail=record.log_tail if record.state.terminal else "",
            container_id=record.container_id or "",
            gpu_uuids=record.gpu_uuids,
            ended_at=_float_or_none(record.extra.get("ended_at")),
            started_at=record.started_at,
            endpoints=self._endpoint_statuses(record),
            restarts=restarts.counts(record.extra)[0],
            outputs=record.extra.get("outputs") if record.state.terminal else None,
        )

    async def _transition(
        self, record: LeaseRecord, state: LeaseState, *, notify: bool = True, **changes: Any
    ) -> LeaseRecord:
        check_transition(record.state, state)
        now = self._clock.time()
        new = record.evolve(
            state=state, updated_at=now, update_seq=record.update_seq + 1, **changes
        )
        update = self._update_for(new, now)
        await asyncio.to_thread(self._db.save, new, update)
        if state.terminal:
            self._active.pop(new.lease_id, None)
        else:
            self._active[new.lease_id] = new
        if notify:
            await self._notify(update)
        return new

    async def _save(self, record: LeaseRecord) -> None:
        """Store a change that is not a state transition (container id, stop intent)."""
        await asyncio.to_thread(self._db.save, record, None)
        if not record.state.terminal:
            self._active[record.lease_id] = record

    async def _notify(self, update: LeaseUpdate) -> None:
        """Publish ``update`` (called under the lease's lock: it only queues)."""
        self._published.append(update)
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver(), name="lease-updates"
            )

    async def _deliver(self) -> None:
        """Hand published updates to ``on_update`` one at a time, in order, holding no lock."""
        while self._published:
            update = self._published.popleft()
            try:
                await self._on_update(update)
            except Exception:
                # The update is in the state DB; the link re-sends it from there.
                log.exception(
                    "lease update callback failed",
                    extra={"lease_id": update.lease_id, "seq": update.seq},
                )

    # -- service leases: health, restarts, endpoints ------------------------------------

    def _spec_of(self, record: LeaseRecord) -> LeaseSpec | None:
        spec = self._specs.get(record.lease_id)
        if spec is not None or not record.spec:
            return spec
        try:
            spec = LeaseSpec.model_validate(record.spec)
        except ValidationError:
            return None  # a rejected lease's spec: nothing of it runs
        if record.lease_id in self._active:
            # Re-adopted after a restart: parsed once, not on every tunnel lookup.
            self._specs[record.lease_id] = spec
        return spec

    async def _publish(self, lease_id: str) -> None:
        """Direct mode: listen for the lease's ports before it is reported running."""
        record = self._active.get(lease_id)
        spec = self._spec_of(record) if record is not None else None
        if self.publisher is None or spec is None or not spec.ports:
            return
        try:
            await self.publisher.publish(lease_id, spec.service_ports(), spec.public)
        except Exception:  # the relay still serves it; a listener is no reason to fail
            log.exception("direct endpoints not published", extra={"lease_id": lease_id})

    def _with_direct(
        self, lease_id: str, statuses: Iterable[EndpointStatus]
    ) -> tuple[EndpointStatus, ...]:
        if self.publisher is None:
            return tuple(statuses)
        out = []
        for status in statuses:
            address, tls = self.publisher.address_of(lease_id, status.name)
            out.append(dataclasses.replace(status, direct_address=address, direct_tls=tls))
        return tuple(out)

    def _endpoint_statuses(self, record: LeaseRecord) -> tuple[EndpointStatus, ...]:
        return self._with_direct(record.lease_id, self._checked_statuses(record))

    def _checked_statuses(self, record: LeaseRecord) -> tuple[EndpointStatus, ...]:
        spec = self._spec_of(record)
        if spec is None or not spec.ports:
            return ()
        total = restarts.counts(record.extra)[0]
        monitor = self._monitors.get(record.lease_id)
        if (
            monitor is not None
            and record.state is LeaseState.RUNNING
            and record.lease_id not in self._restart_tasks
        ):
            return monitor[0].statuses(total)
        return tuple(
            EndpointStatus(
                name=leaserules.port_name(p),
                protocol=leaserules.port_protocol(p),
                container_port=p.container_port,
                ready=False,
                last_result="" if record.state is LeaseState.RUNNING else str(record.state),
                restarts=total,
            )
            for p in spec.service_ports()
        )

    async def _start_monitor(self, lease_id: str) -> None:
        """Start checking the lease's ports (caller holds the lease lock, container runs)."""
        self._stop_monitor(lease_id)
        record = self._active.get(lease_id)
        spec = self._spec_of(record) if record is not None else None
        if record is None or spec is None or not spec.ports or not record.container_id:
            return
        address = await self._runtime.container_address(record.container_id)
        if address is None:
            log.warning(
                "lease container has no address on its network; ports not checked",
                extra={"lease_id": lease_id},
            )
            return
        self._addresses[lease_id] = address
        observer = self.service_observer
        monitor = ServiceMonitor(
            lease_id=lease_id,
            host=address,
            ports=spec.service_ports(),
            health=spec.health_check(),
            on_change=lambda: self._endpoints_changed(lease_id),
            on_liveness_failure=lambda why: self._liveness_failed(lease_id, why),
            on_result=(
                (lambda kind, passed: observer.health_check(lease_id, kind, passed))
                if observer is not None
                else None
            ),
            wall=self._clock.time,
        )

        async def guarded() -> None:
            try:
                await monitor.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease health monitor failed", extra={"lease_id": lease_id})

        task = self._tasks.spawn(guarded(), name=f"lease-health-{lease_id}")
        self._monitors[lease_id] = (monitor, task)

    def _stop_monitor(self, lease_id: str) -> None:
        entry = self._monitors.pop(lease_id, None)
        if entry is not None and entry[1] is not asyncio.current_task():
            entry[1].cancel()

    def _endpoints_changed(self, lease_id: str) -> None:
        if lease_id not in self._report_due:
            self._report_due.add(lease_id)
            self._spawn(self._report_endpoints(lease_id), f"lease-endpoints-{lease_id}")

    async def _report_endpoints(self, lease_id: str) -> None:
        """A same-state update carrying the endpoints now (the coordinator keeps no
        history event for it), at most one per ENDPOINT_REPORT_MIN_S per lease."""
        try:
            last = self._last_report.get(lease_id)
            if last is not None:
                wait = last + ENDPOINT_REPORT_MIN_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            self._report_due.discard(lease_id)
        async with self._lock(lease_id):
            record = self._active.get(lease_id)
            if record is None or record.state is not LeaseState.RUNNING:
                return
            await self._report_same_state(record)
        self._last_report[lease_id] = time.monotonic()

    async def _report_same_state(self, record: LeaseRecord) -> LeaseRecord:
        now = self._clock.time()
        new = record.evolve(updated_at=now, update_seq=record.update_seq + 1)
        update = self._update_for(new, now)
        # Kept in the record too: `gpu-agent leases` reads the state DB, not the daemon.
        extra = dict(new.extra)
        extra["endpoints"] = [dataclasses.asdict(e) for e in update.endpoints]
        new = new.evolve(extra=extra)
        await asyncio.to_thread(self._db.save, new, update)
        self._active[new.lease_id] = new
        await self._notify(update)
        return new

    async def _liveness_failed(self, lease_id: str, why: str) -> None:
        """The monitor gave up on the container: stop it; its exit decides what next."""
        async with self._lock(lease_id):
            record = self._active.get(lease_id)
            if (
                record is None
                or record.state is not LeaseState.RUNNING
                or record.stop_state is not None
                or not record.container_id
            ):
                return
            extra = dict(record.extra)
            extra[restarts.LIVENESS] = why
            record = record.evolve(extra=extra)
            await self._save(record)
            container_id = record.container_id or ""
        self._spawn(self._stop_for_liveness(lease_id, container_id), f"lease-liveness-{lease_id}")

    async def _stop_for_liveness(self, lease_id: str, container_id: str) -> None:
        try:
            await self._runtime.stop(container_id, self._policy.stop_grace)
        except RuntimeFailure as exc:
            # As for a cancel: a container that cannot be stopped is removed; the lease
            # then ends (its container is gone) rather than run on unchecked.
            log.error("stop failed; removing", extra={"lease_id": lease_id, "error": str(exc)})
            await self._runtime.remove(container_id)

    def _restart_decision(
        self, record: LeaseRecord, info: ContainerInfo, reason: str
    ) -> restarts.Decision | None:
        spec = self._spec_of(record)
        if spec is None:
            return None
        policy, budget = spec.restart_policy()
        total, streak = restarts.counts(record.extra)
        if record.extra.get(restarts.PENDING):
            # Counted before the agent went down mid-backoff: start it, do not count again.
            return restarts.Decision(
                True, leaserules.restart_backoff(streak), "resumed after an agent restart",
                total, streak,
            )  # fmt: skip
        started = parse_docker_time(info.started_at)
        ran_for = info.finished_at - started if info.finished_at and started else None
        ended = restarts.Exit(info.exit_code, info.oom_killed, ran_for, reason)
        return restarts.decide(policy, budget, ended, record.extra)

    async def _schedule_restart(self, record: LeaseRecord, decision: restarts.Decision) -> None:
        """Count the restart, report it, and start the container after its backoff."""
        lease_id = record.lease_id
        cause = "liveness" if record.extra.get(restarts.LIVENESS) else "exit"
        extra = dict(record.extra)
        extra.pop(restarts.LIVENESS, None)
        extra.update(
            {
                restarts.RESTARTS: decision.restarts,
                restarts.STREAK: decision.streak,
                restarts.PENDING: True,
            }
        )
        self._stop_monitor(lease_id)
        # The lease keeps its GPUs (and stays billed) through the backoff: it is the
        # buyer's server, down for a moment, not a finished lease.
        self._allocator.restore(lease_id, record.gpu_uuids)
        self._exited.discard(lease_id)
        if lease_id not in self._started_mono and record.started_at is not None:
            # Found exited at reconcile (the agent died mid-backoff): metered from the
            # lease's first start, as a re-adopted running one is.
            self._started_mono[lease_id] = self._clock.monotonic() - max(
                0.0, self._clock.time() - record.started_at
            )
        if record.container_id:
            self._restart_tasks[lease_id] = asyncio.create_task(
                self._restart_later(lease_id, record.container_id, decision.delay),
                name=f"lease-restart-{lease_id}",
            )
        log.warning(
            "restarting lease container",
            extra={
                "lease_id": lease_id,
                "why": decision.reason,
                "restarts": decision.restarts,
                "streak": decision.streak,
                "delay": decision.delay,
            },
        )
        if self.service_observer is not None and not record.extra.get(restarts.PENDING):
            self.service_observer.restarted(lease_id, cause)
        await self._report_same_state(record.evolve(extra=extra))

    async def _restart_later(self, lease_id: str, container_id: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            async with self._lock(lease_id):
                record = self._active.get(lease_id)
                if (
                    record is None
                    or record.stop_state is not None
                    or record.container_id != container_id
                ):
                    return
                self._restart_tasks.pop(lease_id, None)
                try:
                    await self._runtime.start(container_id)
                except RuntimeFailure as exc:
                    await self._end(record, LeaseState.FAILED, reason=f"restart failed: {exc}")
                    return
                extra = dict(record.extra)
                extra.pop(restarts.PENDING, None)
                await self._save(record.evolve(extra=extra))
                log.info("lease container restarted", extra={"lease_id": lease_id})
                await self._start_monitor(lease_id)
            # It may have died again before the events watcher looked.
            self._spawn(self._finalize(lease_id), f"lease-check-{lease_id}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease restart failed", extra={"lease_id": lease_id})
        finally:
            if self._restart_tasks.get(lease_id) is asyncio.current_task():
                del self._restart_tasks[lease_id]
