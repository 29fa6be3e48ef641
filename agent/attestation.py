"""The agent's end of benchmark attestation: answer challenges over the coordinator link.

Challenge -> (compute C per GPU, Merkle root, sign) -> AttestationCommit per GPU ->
AttestationReveal -> AttestationOpen -> AttestationResult (docs/attestation.md).

Why the shape:

* The link runs handlers one at a time in arrival order, and a challenge holds each GPU
  for seconds, so a challenge runs as its own task; reveals and results stay inline
  (cheap) and are never stuck behind a matmul.
* The coordinator times each GPU from issue to commit, so all tasks of one challenge run
  at once (one worker thread per GPU; each Prover drives its own device). Challenges are
  serialized: two at once would share the GPUs and make both read too slow; a few may
  wait, more are refused so a hostile coordinator cannot queue unbounded work.
* Nothing from the coordinator is trusted: the Prover bounds sizes before allocating,
  and any task it refuses is answered with a commit carrying ``error``, so the
  coordinator fails it at once instead of waiting for a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeGuard, cast

from gpuagent import attestation_wire as wire
from gpuagent.aio import TaskSet
from gpuagent.attest.errors import ProverError
from gpuagent.attest.messages import Challenge, GpuIdentity, MatmulTask
from gpuagent.attest.skus import get_sku
from gpuagent.v1 import attestation_pb2, common_pb2, coordinator_pb2, inventory_pb2

from .link.session import NotConnected

if TYPE_CHECKING:  # numpy comes with it: imported on the first challenge, not at startup
    from gpuagent.attest.backend import Backend
    from gpuagent.attest.prover import Prover

log = logging.getLogger(__name__)

Error = common_pb2.ProtocolError
# Unopened results are dropped this long after the challenge's deadline, in case the
# coordinator never reveals or never sends a result (C can be GiBs of host memory).
FORGET_MARGIN_S = 60.0
DEFAULT_MAX_WAITING = 2


class AttestationLink(Protocol):
    """What the responder needs of ``CoordinatorLink``."""

    def on(self, kind: str, handler: Callable[[Any], Awaitable[None]]) -> None: ...

    async def send(self, message: coordinator_pb2.AgentMessage) -> None: ...


@dataclass(frozen=True)
class GpuResult:
    """The coordinator's latest verdict on one GPU, as the agent last heard it."""

    gpu_uuid: str
    challenge_id: str
    passed: bool
    reason: str
    message: str
    measured_tflops: float
    sku: str
    elapsed_seconds: float  # challenge sent -> commit received, coordinator clock
    received_unix_s: float  # agent wall clock when the verdict arrived


def throughput_score(result: GpuResult) -> float:
    """Measured fp16 throughput as a share of the SKU's datasheet peak, 0..1 (0 when the
    SKU is unknown), for the ``gpu_agent_attestation_score`` gauge."""
    try:
        peak = get_sku(result.sku.partition("@")[0]).peak_flops("fp16") / 1e12
    except (KeyError, ValueError):
        return 0.0
    return min(1.0, result.measured_tflops / peak) if peak else 0.0


ProverSource: TypeAlias = "Prover | Callable[[str], Prover]"
ResultHook = Callable[[GpuResult], None]


def identity_from_inventory(
    gpus: Iterable[inventory_pb2.GpuInfo],
) -> Callable[[str], GpuIdentity]:
    """A Prover ``identity`` callback answering from an inventory (NVML read at startup).

    Unknown UUIDs raise ProverError, so a challenge for a GPU this node does not have
    is refused with a reason rather than answered with an empty identity.
    """
    by_uuid = {
        g.uuid: GpuIdentity(g.uuid, g.name, g.serial, g.pci_bus_id, g.memory_total_bytes)
        for g in gpus
    }

    def identity(uuid: str) -> GpuIdentity:
        try:
            return by_uuid[uuid]
        except KeyError:
            raise ProverError(f"GPU {uuid!r} is not on this node") from None

    return identity


class AttestationResponder:
    """Answers attestation challenges arriving on ``link``.

    ``prover`` is one Prover for every GPU, or a function from GPU UUID to the Prover
    bound to that GPU's device (what a multi-GPU host needs). ``clock`` must be the
    Prover's clock: the moment a challenge arrives is passed to it as ``received_at``.
    """

    def __init__(
        self,
        link: AttestationLink,
        prover: ProverSource,
        *,
        on_result: ResultHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_waiting: int = DEFAULT_MAX_WAITING,
        forget_margin_s: float = FORGET_MARGIN_S,
    ) -> None:
        self._link = link
        self._prover_for: Callable[[str], Prover]
        if _is_prover(prover):
            single = prover
            self._prover_for = lambda _uuid: single
        else:
            self._prover_for = cast("Callable[[str], Prover]", prover)
        self._on_result = on_result
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_waiting = max_waiting
        self._forget_margin_s = forget_margin_s
        self._busy = asyncio.Lock()
        self._waiting = 0
        self._tasks = TaskSet()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._committed: dict[tuple[str, str], Prover] = {}  # awaiting a reveal
        self._used: dict[str, list[Prover]] = {}  # per challenge, to forget its results
        self._awaiting_result: dict[str, set[str]] = {}
        self._results: dict[str, GpuResult] = {}
        self.challenges_answered = 0

    def register(self) -> None:
        """Route the attestation messages of ``link`` here."""
        self._link.on("attestation_challenge", self._on_challenge)
        self._link.on("attestation_reveal", self._on_reveal)
        self._link.on("attestation_result", self._on_result_message)

    def results(self) -> dict[str, GpuResult]:
        """The latest verdict per GPU UUID (for metrics and the status API)."""
        return dict(self._results)

    async def aclose(self) -> None:
        """Cancel challenges in progress and drop held results; idempotent."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        await self._tasks.cancel()
        for cid in list(self._used):
            self._forget(cid)

    # -- challenge -----------------------------------------------------------------

    async def _on_challenge(self, pb: attestation_pb2.AttestationChallenge) -> None:
        received_at = self._clock()
        try:
            challenge = wire.challenge_from_pb(pb)
        except wire.WireError as exc:
            log.warning("malformed attestation challenge: %s", exc)
            await self._protocol_error(Error.MALFORMED, str(exc), "attestation_challenge")
            return
        if self._waiting >= self._max_waiting:
            log.warning(
                "attestation challenge refused: too many waiting",
                extra={"challenge": challenge.challenge_id, "waiting": self._waiting},
            )
            await self._fail_all(challenge, f"busy: {self._waiting} challenges already waiting")
            return
        log.info(
            "attestation challenge received",
            extra={
                "challenge": challenge.challenge_id,
                "gpus": [t.gpu_uuid for t in challenge.tasks],
                "sizes": sorted({(t.n, t.inner, t.dtype) for t in challenge.tasks}),
            },
        )
        self._waiting += 1
        self._tasks.spawn(
            self._run(challenge, received_at), name=f"attest-{challenge.challenge_id}"
        )

    async def _run(self, challenge: Challenge, received_at: float) -> None:
        try:
            await self._busy.acquire()
        finally:
            # Counted while waiting for the lock, also when cancelled while waiting.
            self._waiting -= 1
        cid = challenge.challenge_id
        try:
            if self._wall_clock() > challenge.expires_unix_s:
                await self._fail_all(challenge, "challenge expired before it could start")
                return
            self._awaiting_result[cid] = {t.gpu_uuid for t in challenge.tasks}
            await asyncio.gather(
                *(self._commit(challenge, t, received_at) for t in challenge.tasks)
            )
            self.challenges_answered += 1
        finally:
            self._busy.release()
            self._schedule_forget(challenge)

    async def _commit(self, challenge: Challenge, task: MatmulTask, received_at: float) -> None:
        cid, uuid = challenge.challenge_id, task.gpu_uuid
        try:
            # A lazy factory may import a backend (numpy, torch) on first use: off the loop.
            prover = await asyncio.to_thread(self._prover_for, uuid)
            self._used.setdefault(cid, []).append(prover)
            commitment = await asyncio.to_thread(prover.commit, challenge, task, received_at)
        except ProverError as exc:
            log.warning("attestation task refused: %s", exc, extra={"challenge": cid, "gpu": uuid})
            await self._send(attestation_commit=wire.commit_error_pb(cid, uuid, str(exc)))
            return
        except Exception as exc:
            # A backend failure (CUDA error, out of memory) fails this GPU's task only.
            log.exception("attestation task failed", extra={"challenge": cid, "gpu": uuid})
            await self._send(
                attestation_commit=wire.commit_error_pb(cid, uuid, f"agent error: {exc!r}")
            )
            return
        self._committed[(cid, uuid)] = prover
        await self._send(attestation_commit=wire.commitment_to_pb(commitment))

    async def _fail_all(self, challenge: Challenge, error: str) -> None:
        for t in challenge.tasks:
            await self._send(
                attestation_commit=wire.commit_error_pb(challenge.challenge_id, t.gpu_uuid, error)
            )

    # -- reveal --------------------------------------------------------------------

    async def _on_reveal(self, pb: attestation_pb2.AttestationReveal) -> None:
        reveal = wire.reveal_from_pb(pb)
        prover = self._committed.pop((reveal.challenge_id, reveal.gpu_uuid), None)
        if prover is None:
            await self._protocol_error(
                Error.OUT_OF_ORDER,
                f"no commitment for challenge {reveal.challenge_id!r} GPU {reveal.gpu_uuid!r}",
                "attestation_reveal",
            )
            return
        try:
            # Copies k rows and builds their proofs: milliseconds, but off the loop anyway.
            openings = await asyncio.to_thread(prover.open, reveal)
        except ProverError as exc:
            log.warning(
                "attestation reveal refused: %s",
                exc,
                extra={"challenge": reveal.challenge_id, "gpu": reveal.gpu_uuid},
            )
            await self._protocol_error(Error.REJECTED, str(exc), "attestation_reveal")
            return
        await self._send(attestation_open=wire.openings_to_pb(openings))

    # -- result --------------------------------------------------------------------

    async def _on_result_message(self, pb: attestation_pb2.AttestationResult) -> None:
        result = GpuResult(
            gpu_uuid=pb.gpu_uuid,
            challenge_id=pb.challenge_id,
            passed=pb.passed,
            reason=pb.reason,
            message=pb.message,
            measured_tflops=pb.measured_tflops,
            sku=pb.sku,
            elapsed_seconds=pb.elapsed_ns / 1e9,
            received_unix_s=self._wall_clock(),
        )
        self._results[result.gpu_uuid] = result
        extra = {
            "challenge": result.challenge_id,
            "gpu": result.gpu_uuid,
            "sku": result.sku,
            "reason": result.reason,
            "measured_tflops": round(result.measured_tflops, 3),
            "elapsed_s": round(result.elapsed_seconds, 3),
        }
        if result.passed:
            log.info("attestation passed", extra=extra)
        else:
            log.warning("attestation failed: %s", result.message or result.reason, extra=extra)
        # A failed commit is never revealed: drop what the prover holds for it now.
        self._committed.pop((result.challenge_id, result.gpu_uuid), None)
        waiting = self._awaiting_result.get(result.challenge_id)
        if waiting is not None:
            waiting.discard(result.gpu_uuid)
            if not waiting:
                self._forget(result.challenge_id)
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("attestation result hook failed")

    # -- helpers -------------------------------------------------------------------

    def _schedule_forget(self, challenge: Challenge) -> None:
        cid = challenge.challenge_id
        if cid not in self._used or cid in self._timers:
            return
        delay = max(0.0, challenge.expires_unix_s - self._wall_clock()) + self._forget_margin_s
        self._timers[cid] = asyncio.get_running_loop().call_later(delay, self._forget, cid)

    def _forget(self, challenge_id: str) -> None:
        handle = self._timers.pop(challenge_id, None)
        if handle is not None:
            handle.cancel()
        self._awaiting_result.pop(challenge_id, None)
        for key in [k for k in self._committed if k[0] == challenge_id]:
            del self._committed[key]
        seen: set[int] = set()
        for prover in self._used.pop(challenge_id, []):
            if id(prover) not in seen:
                seen.add(id(prover))
                prover.forget(challenge_id)

    async def _send(self, **body: Any) -> None:
        try:
            await self._link.send(coordinator_pb2.AgentMessage(**body))
        except NotConnected as exc:
            # Nothing is queued across sessions: the coordinator times the challenge out
            # and issues a fresh one after we reconnect.
            log.warning("attestation message not sent: %s", exc, extra={"kind": next(iter(body))})

    async def _protocol_error(self, code: int, text: str, in_reply_to: str) -> None:
        error = Error(code=code, message=text, in_reply_to=in_reply_to)  # type: ignore[arg-type]
        await self._send(error=error)


def _is_prover(source: object) -> TypeGuard[Prover]:
    # No Prover can exist before its module is imported, so a source is a factory
    # unless the module is loaded and says otherwise; this keeps numpy unloaded.
    module = sys.modules.get("gpuagent.attest.prover")
    return module is not None and isinstance(source, module.Prover)


def lazy_prover(build: Callable[[], Prover]) -> Callable[[str], Prover]:
    """A ProverSource that calls ``build`` once, on the first challenge (any thread).

    The daemon's idle footprint is the reason: a Prover pulls in numpy and the
    attestation backend (docs/performance.md), needed only when a challenge comes.
    A failing ``build`` fails that challenge and is tried again on the next.
    """
    lock = threading.Lock()
    built: list[Prover] = []

    def get(_uuid: str) -> Prover:
        with lock:
            if not built:
                built.append(build())
            return built[0]

    return get


def per_gpu_prover(
    build: Callable[[int], Prover], device_of: Callable[[str], int]
) -> Callable[[str], Prover]:
    """A ProverSource with one Prover per GPU, bound to that GPU's device.

    ``device_of`` maps a GPU UUID to its device index (ProverError for a GPU this node
    does not have); ``build(index)`` makes the Prover whose backend runs on that device,
    once, on the GPU's first challenge. A multi-GPU challenge runs its tasks at once, so
    with one shared Prover every GPU's matmul would land on device 0 and a slow GPU
    would pass on a fast neighbour's time. A failing ``build`` is tried again next time.
    """
    lock = threading.Lock()
    built: dict[int, Prover] = {}

    def get(uuid: str) -> Prover:
        index = device_of(uuid)
        with lock:
            if index not in built:
                built[index] = build(index)
            return built[index]

    return get


def device_index_from_inventory(gpus: Iterable[inventory_pb2.GpuInfo]) -> Callable[[str], int]:
    """``device_of`` for ``per_gpu_prover``: the GPU's index in the inventory (NVML or amdsmi
    order; the daemon sets CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers them the same)."""
    by_uuid = {g.uuid: g.index for g in gpus}

    def device_of(uuid: str) -> int:
        try:
            return by_uuid[uuid]
        except KeyError:
            raise ProverError(f"GPU {uuid!r} is not on this node") from None

    return device_of


def load_backend(name: str, device: int = 0) -> Backend:
    """``benchmarks.attest.backends.get_backend`` on ``device``, imported only when called."""
    # CUDA numbers devices fastest-first unless told otherwise; NVML numbers them by PCI
    # bus, and the inventory index must name the same GPU in both.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from benchmarks.attest.backends import get_backend

    return get_backend(name, device)
