"""The coordinator side: issue challenges, judge commitments, reveal rows, judge openings.

Per GPU: the commitment must carry a valid signature by the node's key, the nonce of a
live challenge (once), an NVML identity that fits the declared SKU, and arrive within
the SKU's time band.  Only then are rows revealed.  The rows and the columns checked
inside them are drawn from a CSPRNG when the challenge is issued and kept secret, so
the expected entries can be computed (``prepare``) while the prover works; checking the
openings is then Merkle proofs plus an integer comparison.

Not thread-safe: the coordinator drives one Verifier from its event loop and runs
``prepare`` (the only slow call) in a worker thread per challenge.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from numpy.typing import NDArray

from .generator import check_inner, expected_entries
from .merkle import HASH_BYTES, verify_proof
from .messages import Challenge, Commitment, MatmulTask, Openings, Reveal, Verdict
from .skus import SKUS, SkuSpec, identity_problem, matmul_flops, task_size

log = logging.getLogger(__name__)

DEFAULT_OPEN_ROWS = 8
DEFAULT_SAMPLE_COLUMNS = 32
DEFAULT_OPEN_TIMEOUT_S = 30.0
SIGNATURE_BYTES = 64


class RejectReason(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN_CHALLENGE = "unknown_challenge"
    REPLAYED = "replayed"
    NONCE_MISMATCH = "nonce_mismatch"
    EXPIRED = "expired"
    BAD_SIGNATURE = "bad_signature"
    IDENTITY_MISMATCH = "identity_mismatch"
    TOO_FAST = "too_fast"
    TOO_SLOW = "too_slow"
    BAD_PROOF = "bad_proof"
    RESULT_WRONG = "result_wrong"  # no opened row is right: fabricated or another nonce
    RESULT_PARTIAL = "result_partial"  # some opened rows right, some not: partial work


class AttestationRejected(Exception):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class _Task:
    task: MatmulTask
    sku: SkuSpec
    rows: tuple[int, ...]  # secret until the reveal
    cols: tuple[int, ...]  # secret forever
    expected: NDArray[np.int64] | None = None
    commitment: Commitment | None = None
    revealed_at: float | None = None
    measured_tflops: float = 0.0
    closed: bool = False


@dataclass
class _Challenge:
    challenge: Challenge
    public_key: Ed25519PublicKey
    issued_at: float
    expires_at: float
    network_allowance_s: float
    tasks: dict[str, _Task] = field(default_factory=dict)


class Verifier:
    def __init__(
        self,
        *,
        skus: Mapping[str, SkuSpec] = SKUS,
        open_rows: int = DEFAULT_OPEN_ROWS,
        sample_columns: int = DEFAULT_SAMPLE_COLUMNS,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        remember: int = 4096,
    ) -> None:
        if open_rows < 1 or sample_columns < 1:
            raise ValueError("open_rows and sample_columns must be at least 1")
        self._skus = skus
        self._open_rows = open_rows
        self._sample_columns = sample_columns
        self._open_timeout_s = open_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        # Row choices must be unpredictable from earlier reveals: a CSPRNG, not numpy's PCG.
        self._rng = rng if rng is not None else random.SystemRandom()
        self._seeded = rng is not None
        self._live: dict[str, _Challenge] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._counter = 0

    # -- issue ---------------------------------------------------------------------

    def issue(
        self,
        public_key: Ed25519PublicKey,
        gpus: Sequence[tuple[str, str]],
        *,
        network_allowance_s: float = 0.05,
        sizes: tuple[int, int] | None = None,
        dtype: str = "fp16",
        target_seconds: float | None = None,
        bandwidth_probe_bytes: int = 0,
        ttl_s: float | None = None,
    ) -> Challenge:
        """A fresh challenge for ``gpus`` as (uuid, declared SKU id) pairs.

        ``sizes`` overrides (n, inner); otherwise they follow the SKU and ``target_seconds``
        (short targets are how lease-time canaries stay cheap).  ``network_allowance_s``
        is the round trip the coordinator measured to this node.
        """
        if not gpus:
            raise ValueError("a challenge needs at least one GPU")
        self._counter += 1
        challenge_id = f"att-{self._counter}-{secrets.token_hex(4)}"
        # A seeded rng (tests) makes nonces reproducible; otherwise they come from the OS.
        nonce = (
            self._rng.getrandbits(256).to_bytes(32, "big")
            if self._seeded
            else secrets.token_bytes(32)
        )
        tasks: dict[str, _Task] = {}
        slowest = 0.0
        for uuid, sku_id in gpus:
            sku = self._sku(sku_id)
            if sizes is not None:
                n, inner = sizes
            elif target_seconds is not None:
                n, inner = task_size(sku, dtype, target_seconds)
            else:
                n, inner = task_size(sku, dtype)
            check_inner(inner)
            task = MatmulTask(uuid, sku.sku_id, n, inner, dtype, bandwidth_probe_bytes)
            rows = tuple(sorted(self._rng.sample(range(n), min(self._open_rows, n))))
            cols = tuple(sorted(self._rng.sample(range(n), min(self._sample_columns, n))))
            tasks[uuid] = _Task(task, sku, rows, cols)
            slowest = max(slowest, sku.time_bounds(n, inner, dtype)[1])
        if ttl_s is None:
            # Generous: a late commit should read as too slow, not as expired.
            ttl_s = 2.0 * (slowest + network_allowance_s) + 5.0
        now = self._clock()
        challenge = Challenge(
            challenge_id, nonce, tuple(t.task for t in tasks.values()), self._wall_clock() + ttl_s
        )
        self._live[challenge_id] = _Challenge(
            challenge, public_key, now, now + ttl_s, network_allowance_s, tasks
        )
        return challenge

    def prepare(self, challenge_id: str) -> None:
        """Compute the secret expected entries; run it off the event loop while the prover works."""
        state = self._live.get(challenge_id)
        if state is None:
            return
        for entry in state.tasks.values():
            if entry.expected is None:
                entry.expected = expected_entries(
                    state.challenge.nonce, entry.task.inner, entry.rows, entry.cols
                )

    def _sku(self, sku_id: str) -> SkuSpec:
        try:
            return self._skus[sku_id]
        except KeyError:
            known = ", ".join(sorted(self._skus))
            raise ValueError(f"unknown SKU {sku_id!r}; known: {known}") from None

    # -- commit --------------------------------------------------------------------

    def check_commitment(self, commitment: Commitment) -> Reveal:
        """The reveal for a commitment that passes; raises AttestationRejected otherwise."""
        now = self._clock()
        state, entry = self._lookup(commitment.challenge_id, commitment.gpu_uuid)
        try:
            if entry.commitment is not None:
                raise AttestationRejected(
                    RejectReason.REPLAYED,
                    f"GPU {commitment.gpu_uuid} already committed to this challenge",
                )
            self._check_commitment(state, entry, commitment, now)
        except AttestationRejected as exc:
            self._close(state, entry, exc)
            raise
        entry.commitment = commitment
        entry.revealed_at = now
        return Reveal(state.challenge.challenge_id, entry.task.gpu_uuid, entry.rows)

    def _check_commitment(self, state: _Challenge, entry: _Task, c: Commitment, now: float) -> None:
        task = entry.task
        if len(c.signature) != SIGNATURE_BYTES or len(c.merkle_root) != HASH_BYTES:
            raise AttestationRejected(
                RejectReason.MALFORMED,
                f"signature must be {SIGNATURE_BYTES} bytes and root {HASH_BYTES} bytes, "
                f"got {len(c.signature)} and {len(c.merkle_root)}",
            )
        try:
            state.public_key.verify(c.signature, c.signing_bytes())
        except InvalidSignature:
            raise AttestationRejected(
                RejectReason.BAD_SIGNATURE,
                "commitment signature does not verify with the node's key",
            ) from None
        if c.nonce != state.challenge.nonce:
            raise AttestationRejected(
                RejectReason.NONCE_MISMATCH, "commitment carries another challenge's nonce"
            )
        if (c.n, c.inner, c.dtype) != (task.n, task.inner, task.dtype):
            raise AttestationRejected(
                RejectReason.MALFORMED,
                f"commitment is for n={c.n} inner={c.inner} {c.dtype}, "
                f"challenge asked n={task.n} inner={task.inner} {task.dtype}",
            )
        if now > state.expires_at:
            raise AttestationRejected(
                RejectReason.EXPIRED,
                f"commitment arrived {now - state.expires_at:.3f}s after expiry",
            )
        if c.identity.uuid != task.gpu_uuid:
            raise AttestationRejected(
                RejectReason.IDENTITY_MISMATCH,
                f"NVML UUID {c.identity.uuid!r} is not the challenged GPU {task.gpu_uuid!r}",
            )
        problem = identity_problem(entry.sku, c.identity.name, c.identity.memory_total_bytes)
        if problem is not None:
            raise AttestationRejected(RejectReason.IDENTITY_MISMATCH, problem)
        measured = now - state.issued_at
        fastest, slowest = entry.sku.time_bounds(task.n, task.inner, task.dtype)
        if measured < fastest:
            raise AttestationRejected(
                RejectReason.TOO_FAST,
                f"committed after {measured:.3f}s; "
                f"a {entry.sku.name} needs at least {fastest:.3f}s",
            )
        net = measured - state.network_allowance_s
        if net > slowest:
            raise AttestationRejected(
                RejectReason.TOO_SLOW,
                f"committed after {net:.3f}s net of {state.network_allowance_s:.3f}s network; "
                f"a {entry.sku.name} needs at most {slowest:.3f}s",
            )
        entry.measured_tflops = matmul_flops(task.n, task.inner) / max(net, 1e-9) / 1e12

    # -- open ----------------------------------------------------------------------

    def check_openings(self, openings: Openings) -> Verdict:
        """The passing verdict; raises AttestationRejected for every failure."""
        now = self._clock()
        state, entry = self._lookup(openings.challenge_id, openings.gpu_uuid)
        try:
            if entry.commitment is None or entry.revealed_at is None:
                raise AttestationRejected(RejectReason.MALFORMED, "openings before any reveal")
            if now - entry.revealed_at > self._open_timeout_s:
                raise AttestationRejected(
                    RejectReason.EXPIRED,
                    f"openings arrived {now - entry.revealed_at:.1f}s after the reveal",
                )
            self._check_rows(state, entry, openings, entry.commitment)
        except AttestationRejected as exc:
            self._close(state, entry, exc)
            raise
        verdict = Verdict(
            state.challenge.challenge_id, entry.task.gpu_uuid, True, "ok",
            f"{len(entry.rows)} rows x {len(entry.cols)} columns exact; "
            f"{entry.measured_tflops:.1f} TFLOPS",
            entry.measured_tflops,
        )  # fmt: skip
        self._close(state, entry, None)
        return verdict

    def _check_rows(self, state: _Challenge, entry: _Task, o: Openings, c: Commitment) -> None:
        n = entry.task.n
        got = sorted(r.index for r in o.rows)
        if got != list(entry.rows):
            raise AttestationRejected(
                RejectReason.MALFORMED, f"opened rows {got}, expected exactly {list(entry.rows)}"
            )
        for row in o.rows:
            if len(row.values) != 4 * n:
                raise AttestationRejected(
                    RejectReason.MALFORMED,
                    f"row {row.index} has {len(row.values)} bytes, expected {4 * n}",
                )
            if not verify_proof(c.merkle_root, n, row.index, row.values, row.proof):
                raise AttestationRejected(
                    RejectReason.BAD_PROOF,
                    f"row {row.index} does not match the committed Merkle root",
                )
        if entry.expected is None:
            entry.expected = expected_entries(c.nonce, entry.task.inner, entry.rows, entry.cols)
        cols = np.asarray(entry.cols)
        by_index = {r.index: r for r in o.rows}
        wrong = [
            i for k, i in enumerate(entry.rows)
            if not np.array_equal(
                np.frombuffer(by_index[i].values, dtype="<i4")[cols], entry.expected[k]
            )
        ]  # fmt: skip
        if len(wrong) == len(entry.rows):
            raise AttestationRejected(
                RejectReason.RESULT_WRONG,
                f"none of the {len(wrong)} opened rows is A@B for this nonce: result fabricated",
            )
        if wrong:
            raise AttestationRejected(
                RejectReason.RESULT_PARTIAL,
                f"rows {wrong} of the {len(entry.rows)} opened are wrong: C computed only in part",
            )

    # -- state ---------------------------------------------------------------------

    def _lookup(self, challenge_id: str, gpu_uuid: str) -> tuple[_Challenge, _Task]:
        state = self._live.get(challenge_id)
        if state is None:
            if challenge_id in self._finished:
                raise AttestationRejected(
                    RejectReason.REPLAYED, f"challenge {challenge_id!r} is already closed"
                )
            raise AttestationRejected(
                RejectReason.UNKNOWN_CHALLENGE, f"no challenge {challenge_id!r}"
            )
        entry = state.tasks.get(gpu_uuid)
        if entry is None:
            raise AttestationRejected(
                RejectReason.MALFORMED,
                f"GPU {gpu_uuid!r} is not part of challenge {challenge_id!r}",
            )
        if entry.closed:
            raise AttestationRejected(
                RejectReason.REPLAYED, f"GPU {gpu_uuid!r} is already judged in {challenge_id!r}"
            )
        return state, entry

    def _close(self, state: _Challenge, entry: _Task, error: AttestationRejected | None) -> None:
        entry.closed = True
        cid = state.challenge.challenge_id
        if error is not None:
            log.warning(
                "attestation rejected",
                extra={"challenge": cid, "gpu": entry.task.gpu_uuid, "reason": error.reason.value},
            )
        if all(t.closed for t in state.tasks.values()):
            del self._live[cid]
            self._finished[cid] = None
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)

    def expire(self) -> list[str]:
        """Drop challenges past their expiry (call periodically); returns their ids."""
        now = self._clock()
        gone = [cid for cid, s in self._live.items() if now > s.expires_at + self._open_timeout_s]
        for cid in gone:
            del self._live[cid]
            self._finished[cid] = None
        return gone
