"""Retained lease outputs on the provider's disk: one archive and its commitment per lease.

Layout (one home for it; the packer writes, the tunnel serves, the GC deletes):
``<state_dir>/outputs/<lease_id>.tar`` is the deterministic archive and
``<state_dir>/outputs/<lease_id>.json`` the commitment (the OutputCommitment's fields,
digest and signature hex) written after the archive is complete, so an archive
without its JSON is an interrupted pack and is never served.

Retention: ``collect_garbage`` deletes an archive once its ``retained_until`` has
passed but keeps the small JSON for ``TOMBSTONE_S`` more, so a late fetch is told
the retention passed rather than that nothing was ever kept; then the JSON goes too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from gpuagent.leaserules import LEASE_ID_RE

log = logging.getLogger(__name__)

# How long the commitment outlives its archive (see the module docstring).
TOMBSTONE_S = 7 * 86400


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

    def _commitments(self) -> list[tuple[str, dict[str, object]]]:
        """(lease id, commitment JSON) of every lease with one here."""
        found = []
        try:
            paths = sorted(self.root.glob("*.json"))
        except OSError:
            return []
        for path in paths:
            lease_id = path.stem
            if not LEASE_ID_RE.fullmatch(lease_id):
                continue
            try:
                found.append((lease_id, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
        return found

    def retained(self, now_unix_nanos: int | None = None) -> list[RetainedOutput]:
        """Every archive still served, oldest lease id first."""
        out = []
        for lease_id, _meta in self._commitments():
            try:
                out.append(self.lookup(lease_id, now_unix_nanos))
            except (NotRetained, KeyError, ValueError):
                continue
        return out

    def usage(self) -> tuple[int, int]:
        """(archives, bytes) the provider's disk holds for retained outputs."""
        count = total = 0
        try:
            archives = list(self.root.glob("*.tar"))
        except OSError:
            return 0, 0
        for archive in archives:
            try:
                total += archive.stat().st_size
            except OSError:
                continue
            count += 1
        return count, total

    def collect_garbage(self, now_unix_nanos: int | None = None, startup: bool = False) -> int:
        """Delete archives past their retention (and, at ``startup``, what an interrupted
        pack left); returns the bytes freed. Blocking: call from a worker thread."""
        now = time.time_ns() if now_unix_nanos is None else now_unix_nanos
        freed = 0
        for lease_id, meta in self._commitments():
            until = int(str(meta.get("retained_until_unix_nanos", 0)))
            if not until or now < until:
                continue
            removed = _remove(self.archive_path(lease_id))
            if removed:
                log.info("retained outputs removed", extra={"lease_id": lease_id, "bytes": removed})
            freed += removed
            if now >= until + TOMBSTONE_S * 10**9:
                _remove(self.commitment_path(lease_id))
        if startup:
            committed = {lease_id for lease_id, _ in self._commitments()}
            try:
                leftovers = [
                    *self.root.glob("*.tmp"),
                    *(p for p in self.root.glob("*.tar") if p.stem not in committed),
                ]
            except OSError:
                leftovers = []
            for path in leftovers:
                freed += _remove(path)
        return freed


def _remove(path: Path) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _checked(lease_id: str) -> str:
    # The id names a file: only the lease-id pattern, never a path.
    if not LEASE_ID_RE.fullmatch(lease_id):
        raise NotRetained(lease_id, "not a lease id")
    return lease_id
