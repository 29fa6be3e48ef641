"""Which GPUs a new lease may use: attestation verdicts and ledger collateral together.

Built once in the composition root from the two parts that decide it and passed to
the dispatcher's constructor. ``restricts`` says whether either rule can refuse a
GPU under the running configuration: when neither can (attestation not required,
no minimum collateral), the dispatcher skips the per-GPU check and its node-view
fast path serves the unchanged nodes of each pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from .changes import EVERYTHING, Changes

if TYPE_CHECKING:
    from .attestation import AttestationManager
    from .ledger_service import LedgerService
    from .placement import GpuView

G = TypeVar("G", bound="GpuView")
FOREVER = 2**63 - 1  # ns: an answer no clock reading ends


class Eligibility:
    def __init__(self, attestation: AttestationManager, ledger: LedgerService) -> None:
        self._attestation = attestation
        self._ledger = ledger
        # Nodes whose answers may have changed (a verdict stored, collateral moved): an
        # answer holds until then, or until the time ``filter`` returned with it (a
        # verdict's expiry).
        self.changes = Changes()

    def changed(self, node_id: str = EVERYTHING) -> None:
        """A listener of attestation verdicts (with the node) and of the ledger's
        collateral (EVERYTHING: any node)."""
        self.changes.add(node_id)

    @property
    def restricts(self) -> bool:
        return self._attestation.config.required or self._ledger.policy.min_collateral_micros > 0

    def filter(self, node_id: str, gpus: Sequence[G], now_ns: int) -> tuple[Sequence[G], int]:
        """The GPUs of ``gpus`` a new lease may use now (``gpus`` itself when all may),
        and until when (ns) that answer holds while ``changed`` is not called."""
        if not self._ledger.node_eligible(node_id):
            return (), FOREVER
        until = FOREVER
        kept = []
        for gpu in gpus:
            expires = self._attestation.valid_until(node_id, gpu.uuid, now_ns)
            if expires is not None:
                kept.append(gpu)
                until = min(until, expires)
        return (gpus if len(kept) == len(gpus) else tuple(kept)), until
