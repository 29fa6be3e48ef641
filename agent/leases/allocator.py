"""Which GPU belongs to which lease.

The allocator is the one place that hands out GPU UUIDs, so two leases can never
share one. It keeps no state of its own on disk: after a restart the manager
rebuilds it with ``restore`` from container labels and the state DB. It is used
from the event loop only, so it needs no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)


class AllocationError(Exception):
    """The GPUs asked for cannot be given; the message says which and why."""


class GpuAllocator:
    def __init__(self) -> None:
        self._owner: dict[str, str] = {}  # GPU UUID -> lease id
        self._by_lease: dict[str, tuple[str, ...]] = {}

    def free(self, available: Iterable[str]) -> list[str]:
        """The ``available`` (healthy, uncordoned) GPUs no lease holds, order kept."""
        return [uuid for uuid in available if uuid not in self._owner]

    def allocate(
        self,
        lease_id: str,
        count: int,
        available: Sequence[str],
        wanted: Sequence[str] | None = None,
    ) -> tuple[str, ...]:
        """Give ``lease_id`` ``count`` GPUs from ``available``; idempotent per lease.

        ``wanted`` is the coordinator's own choice of UUIDs, honoured only when
        every one of them is available and free.
        """
        held = self._by_lease.get(lease_id)
        if held is not None:
            return held
        free = self.free(available)
        if wanted:
            if len(wanted) != count or len(set(wanted)) != len(wanted):
                raise AllocationError(
                    f"{len(wanted)} GPU UUIDs named for a lease of {count} GPU(s)"
                )
            unusable = [uuid for uuid in wanted if uuid not in free]
            if unusable:
                raise AllocationError(
                    f"GPU(s) {', '.join(unusable)} are not free and healthy on this host"
                )
            chosen = tuple(wanted)
        else:
            if count > len(free):
                raise AllocationError(f"{count} GPU(s) asked, {len(free)} free and healthy")
            chosen = tuple(free[:count])
        self._take(lease_id, chosen)
        return chosen

    def restore(self, lease_id: str, uuids: Sequence[str]) -> None:
        """Re-record what a running container already holds (after a restart).

        A running container's GPUs are a fact, not a request: even a GPU that is
        now cordoned stays with its lease. A clash means two containers claim one
        GPU, which only a bug or outside interference produces; it is logged and
        the earlier owner kept.
        """
        clashes = [u for u in uuids if self._owner.get(u, lease_id) != lease_id]
        if clashes:
            log.error(
                "GPU claimed by two leases",
                extra={
                    "lease_id": lease_id,
                    "gpus": clashes,
                    "owners": [self._owner[u] for u in clashes],
                },
            )
        self._take(lease_id, tuple(u for u in uuids if u not in clashes))

    def release(self, lease_id: str) -> tuple[str, ...]:
        uuids = self._by_lease.pop(lease_id, ())
        for uuid in uuids:
            self._owner.pop(uuid, None)
        return uuids

    def held_by(self, lease_id: str) -> tuple[str, ...]:
        return self._by_lease.get(lease_id, ())

    def allocations(self) -> dict[str, str]:
        """GPU UUID -> lease id, a copy."""
        return dict(self._owner)

    def _take(self, lease_id: str, uuids: tuple[str, ...]) -> None:
        self._by_lease[lease_id] = uuids
        for uuid in uuids:
            self._owner[uuid] = lease_id
