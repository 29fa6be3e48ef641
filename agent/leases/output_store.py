"""Retained lease outputs on the provider's disk: one archive and its commitment per lease.

Layout (one home for it; the packer writes, the tunnel serves, the GC deletes):
``<state_dir>/outputs/<lease_id>.tar`` is the deterministic archive and
``<state_dir>/outputs/<lease_id>.json`` the commitment (the OutputCommitment's fields,
digest and signature hex) written after the archive is complete, so an archive
without its JSON is an interrupted pack and is never served.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from gpuagent.leaserules import LEASE_ID_RE


class NotRetained(LookupError):
    """No archive for this lease here; ``reason`` says why (shown to the buyer)."""

    def __init__(self, lease_id: str, reason: str) -> None:
        super().__init__(f"outputs of lease {lease_id}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class RetainedOutput:
    lease_id: str
    archive: Path
    size: int
    digest_hex: str
    retained_until_unix_nanos: int


class OutputStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def archive_path(self, lease_id: str) -> Path:
        return self.root / f"{_checked(lease_id)}.tar"

    def commitment_path(self, lease_id: str) -> Path:
        return self.root / f"{_checked(lease_id)}.json"

    def lookup(self, lease_id: str, now_unix_nanos: int | None = None) -> RetainedOutput:
        """The retained archive of ``lease_id``, or NotRetained with the reason."""
        meta_path = self.commitment_path(lease_id)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise NotRetained(lease_id, "no outputs are retained for this lease here") from None
        except (OSError, ValueError) as exc:
            raise NotRetained(lease_id, f"commitment unreadable: {exc}") from None
        until = int(meta.get("retained_until_unix_nanos", 0))
        now = time.time_ns() if now_unix_nanos is None else now_unix_nanos
        if until and now >= until:
            raise NotRetained(lease_id, "the retention period has passed; outputs were removed")
        archive = self.archive_path(lease_id)
        if not archive.is_file():
            raise NotRetained(lease_id, "the archive is gone from the provider's disk")
        return RetainedOutput(
            lease_id=lease_id,
            archive=archive,
            size=int(meta["size"]),
            digest_hex=str(meta["digest"]),
            retained_until_unix_nanos=until,
        )


def _checked(lease_id: str) -> str:
    # The id names a file: only the lease-id pattern, never a path.
    if not LEASE_ID_RE.fullmatch(lease_id):
        raise NotRetained(lease_id, "not a lease id")
    return lease_id
