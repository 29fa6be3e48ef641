"""The agent's side of lease outputs: what a spec may ask, packing at the end, expiry.

The lease manager asks ``check`` on assign (a spec asking more than this host keeps is
refused there, not at its end) and ``keep`` when a batch lease ends, before its scratch
dir is removed; ``run`` deletes what has passed its retention, at start and then every
``outputs.gc_interval``. Packing is blocking file work: it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from gpuagent.aio import wait_any
from gpuagent.units import format_size

from ..config import AgentConfig
from .output_pack import Commitment, PackRequest, Signer, pack
from .output_store import OutputStore
from .spec import LeaseRejected, LeaseSpec, RejectCode

log = logging.getLogger(__name__)


class OutputKeeper:
    def __init__(
        self,
        config: AgentConfig,
        node_id: str,
        sign: Signer,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self._config = config
        self.node_id = node_id
        self._sign = sign
        self._clock = clock
        self.store = OutputStore(config.outputs_dir())
        # Called with (archives, bytes) retained after a pack or a collection changed
        # them: the inventory's retained_outputs.
        self.on_change = on_change

    def update_config(self, config: AgentConfig) -> None:
        self._config = config

    def check(self, spec: LeaseSpec) -> None:
        """Refuse a spec whose outputs this host would not keep as asked."""
        limit = self._config.outputs.max_bytes
        if spec.outputs and spec.output_max_bytes > limit:
            raise LeaseRejected(
                RejectCode.EXCEEDS_HOST_LIMIT,
                f"output_max_bytes {format_size(spec.output_max_bytes)} is over this host's "
                f"limit of {format_size(limit)} (outputs.max_bytes)",
            )

    def retention_seconds(self, spec: LeaseSpec) -> float:
        """The lease's ask, else the default; never past outputs.max_retention."""
        policy = self._config.outputs
        asked = spec.output_retention_seconds or policy.default_retention
        return min(float(asked), policy.max_retention)

    async def keep(self, lease_id: str, spec: LeaseSpec, scratch: Path) -> Commitment:
        """Pack, sign and store the lease's outputs; PackFailed says why not."""
        retained_until = round((self._clock() + self.retention_seconds(spec)) * 1e9)
        request = PackRequest(
            lease_id=lease_id,
            node_id=self.node_id,
            scratch=scratch,
            declared=list(spec.outputs),
            patterns=spec.output_patterns(),
            max_bytes=spec.output_max_bytes or self._config.outputs.max_bytes,
            retained_until_unix_nanos=retained_until,
            required=spec.outputs_required,
            min_free_bytes=self._config.runtime.min_free_state_disk,
        )
        started = time.monotonic()
        try:
            commitment = await asyncio.to_thread(pack, request, self.store, self._sign)
        finally:
            await self._changed()
        log.info(
            "lease outputs kept",
            extra={
                "lease_id": lease_id,
                "bytes": commitment.size,
                "files": commitment.file_count,
                "missing": len(commitment.missing),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return commitment

    async def collect(self, startup: bool = False) -> int:
        freed = await asyncio.to_thread(
            self.store.collect_garbage, round(self._clock() * 1e9), startup
        )
        if freed or startup:
            await self._changed()
        return freed

    async def run(self, stop: asyncio.Event) -> None:
        """Delete expired outputs now and every ``outputs.gc_interval`` until ``stop``."""
        startup = True
        while not stop.is_set():
            try:
                await self.collect(startup=startup)
            except OSError as exc:
                log.warning("retained outputs collection failed", extra={"error": str(exc)})
            startup = False
            await wait_any(stop, within=self._config.outputs.gc_interval)

    async def _changed(self) -> None:
        if self.on_change is None:
            return
        count, size = await asyncio.to_thread(self.store.usage)
        try:
            self.on_change(count, size)
        except Exception:
            log.exception("retained outputs change callback failed")
