"""Which GPUs a new lease may use: attestation verdicts and ledger collateral together.

Built once in the composition root from the two parts that decide it and passed to
the dispatcher's constructor. ``restricts`` says whether either rule can refuse a
GPU under the running configuration: when neither can (attestation not required,
no minimum collateral), the dispatcher skips the per-GPU check and its node-view
fast path serves the unchanged nodes of each pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attestation import AttestationManager
    from .ledger_service import LedgerService


class Eligibility:
    def __init__(self, attestation: AttestationManager, ledger: LedgerService) -> None:
        self._attestation = attestation
        self._ledger = ledger

    @property
    def restricts(self) -> bool:
        return self._attestation.config.required or self._ledger.policy.min_collateral_micros > 0

    def gpu(self, node_id: str, gpu_uuid: str) -> bool:
        return self._ledger.node_eligible(node_id) and self._attestation.gpu_eligible(
            node_id, gpu_uuid
        )
