"""Attestation verdicts into metrics and collateral: each new verdict is counted once,
and a failed one slashes the node's stake (at most once per challenge, docs/ledger.md).

A listener of the attestation manager; the ledger does the slashing in its own
transaction, off the listener's call (the manager calls listeners synchronously).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gpuagent.aio import TaskSet

if TYPE_CHECKING:
    from .attestation import AttestationManager
    from .ledger_service import LedgerService
    from .metrics import SchedulerMetrics


class VerdictSlasher:
    def __init__(
        self, attestation: AttestationManager, ledger: LedgerService, metrics: SchedulerMetrics
    ) -> None:
        self._attestation = attestation
        self._ledger = ledger
        self._metrics = metrics
        self._seen: set[tuple[str, str, str]] = set()
        self._tasks = TaskSet()

    def on_verdicts(self, node_id: str) -> None:
        for record in self._attestation.latest(node_id):
            key = (node_id, record.gpu_uuid, record.challenge_id or str(record.created_ns))
            if key in self._seen:
                continue
            self._seen.add(key)
            self._metrics.attestation("passed" if record.passed else "failed")
            if not record.passed and record.challenge_id:
                self._tasks.spawn(
                    self._ledger.attestation_failed(node_id, record.reason, record.challenge_id)
                )

    async def close(self) -> None:
        """Let slashes in flight finish (before the database closes): a failed verdict
        must cost its stake even when the scheduler stops right after it."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
