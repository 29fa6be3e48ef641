"""The agent side: compute C for a challenge, commit to it, open the rows asked for.

Blocking by design (the matmul holds a GPU for seconds): the daemon calls ``commit``
and ``open`` through ``asyncio.to_thread``.  Everything in a challenge comes from the
coordinator and is untrusted, so sizes are bounded before any memory is allocated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from .backend import Backend
from .errors import ProverError
from .generator import check_inner
from .merkle import MerkleTree, row_bytes
from .messages import Challenge, Commitment, GpuIdentity, MatmulTask, OpenedRow, Openings, Reveal

log = logging.getLogger(__name__)

NONCE_BYTES = 32
MAX_N = 65536
DEFAULT_MAX_RESULT_BYTES = 8 * 1024**3  # C kept on the host until opened
MAX_OPEN_ROWS = 256
BANDWIDTH_REPEATS = 10


@dataclass
class _Pending:
    c: NDArray[np.int32]
    tree: MerkleTree


class Prover:
    """Answers challenges for the GPUs of one node.

    ``sign`` is the node key's signing function (Ed25519, raw 64-byte signatures);
    ``identity`` returns the NVML identity of a GPU by UUID at commit time.
    """

    def __init__(
        self,
        sign: Callable[[bytes], bytes],
        backend: Backend,
        identity: Callable[[str], GpuIdentity],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        max_pending: int = 8,
    ) -> None:
        self._sign = sign
        self._backend = backend
        self._identity = identity
        self._clock = clock
        self._max_result_bytes = max_result_bytes
        self._max_pending = max_pending
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._lock = threading.Lock()  # commit/open may run in different worker threads

    def validate(self, challenge: Challenge, task: MatmulTask) -> None:
        if len(challenge.nonce) != NONCE_BYTES:
            raise ProverError(
                f"challenge nonce must be {NONCE_BYTES} bytes, got {len(challenge.nonce)}"
            )
        if task not in challenge.tasks:
            raise ProverError(
                f"task for GPU {task.gpu_uuid!r} is not in challenge {challenge.challenge_id!r}"
            )
        if not 1 <= task.n <= MAX_N:
            raise ProverError(f"task n={task.n} out of range 1..{MAX_N}")
        try:
            check_inner(task.inner)
        except ValueError as exc:
            raise ProverError(f"task inner: {exc}") from None
        if task.dtype not in ("fp16", "bf16"):
            raise ProverError(f"task dtype {task.dtype!r} unsupported: use fp16 or bf16")
        if 4 * task.n * task.n > self._max_result_bytes:
            raise ProverError(
                f"task n={task.n} needs {4 * task.n * task.n} bytes for C, over the "
                f"{self._max_result_bytes}-byte limit"
            )
        if task.bandwidth_probe_bytes < 0 or task.bandwidth_probe_bytes > self._max_result_bytes:
            raise ProverError(f"bandwidth probe of {task.bandwidth_probe_bytes} bytes out of range")

    def commit(
        self, challenge: Challenge, task: MatmulTask, received_at: float | None = None
    ) -> Commitment:
        """Compute, hash and sign; ``received_at`` is when the challenge arrived (clock)."""
        started = self._clock() if received_at is None else received_at
        self.validate(challenge, task)
        c, compute_s = self._backend.matmul(challenge.nonce, task.n, task.inner, task.dtype)
        if c.shape != (task.n, task.n):
            raise ProverError(f"backend returned C of shape {c.shape}, expected {(task.n, task.n)}")
        tree = MerkleTree.from_rows(c)
        bandwidth = 0.0
        if task.bandwidth_probe_bytes:
            bandwidth = self._backend.copy_bandwidth(task.bandwidth_probe_bytes, BANDWIDTH_REPEATS)
        unsigned = Commitment(
            challenge_id=challenge.challenge_id,
            nonce=challenge.nonce,
            gpu_uuid=task.gpu_uuid,
            n=task.n,
            inner=task.inner,
            dtype=task.dtype,
            merkle_root=tree.root,
            elapsed_ns=int((self._clock() - started) * 1e9),
            compute_ns=int(compute_s * 1e9),
            bandwidth_bytes_per_second=bandwidth,
            identity=self._identity(task.gpu_uuid),
        )
        signed = replace(unsigned, signature=self._sign(unsigned.signing_bytes()))
        with self._lock:
            self._pending[(challenge.challenge_id, task.gpu_uuid)] = _Pending(c, tree)
            while len(self._pending) > self._max_pending:
                dropped, _ = self._pending.popitem(last=False)
                log.warning("dropping unopened attestation result", extra={"challenge": dropped})
        log.info(
            "attestation commit ready",
            extra={"challenge": challenge.challenge_id, "gpu": task.gpu_uuid,
                   "compute_s": round(compute_s, 4)},
        )  # fmt: skip
        return signed

    def open(self, reveal: Reveal) -> Openings:
        """Rows and Merkle proofs for a reveal; each result can be opened once."""
        with self._lock:
            pending = self._pending.pop((reveal.challenge_id, reveal.gpu_uuid), None)
        if pending is None:
            raise ProverError(
                f"no committed result for challenge {reveal.challenge_id!r} GPU {reveal.gpu_uuid!r}"
            )
        if not 1 <= len(reveal.rows) <= MAX_OPEN_ROWS:
            raise ProverError(
                f"reveal asks for {len(reveal.rows)} rows; allowed 1..{MAX_OPEN_ROWS}"
            )
        n = pending.c.shape[0]
        bad = [i for i in reveal.rows if not 0 <= i < n]
        if bad:
            raise ProverError(f"reveal rows {bad} out of range 0..{n - 1}")
        rows = tuple(
            OpenedRow(index=i, values=row_bytes(pending.c[i]), proof=pending.tree.proof(i))
            for i in reveal.rows
        )
        return Openings(challenge_id=reveal.challenge_id, gpu_uuid=reveal.gpu_uuid, rows=rows)

    def forget(self, challenge_id: str) -> None:
        with self._lock:
            for key in [k for k in self._pending if k[0] == challenge_id]:
                del self._pending[key]
