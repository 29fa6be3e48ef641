"""The read-only JSON status document behind ``GET /status`` and ``gpu-agent status``.

Built from provider callables, one per section. Providers read in-memory state
(the last GPU sample, the last readiness verdict, the lease manager's
snapshot), so the status page answers even when NVML or Docker hangs; the one
read it may make (the first GPU sample) is bounded like a scrape. A provider
that raises costs its own section (``{"error": ...}``), never the document.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from gpuagent import PROTOCOL_VERSION, __version__

from .agent_metrics import AgentMetrics
from .gpu_collector import GpuCollector, GpuHealth
from .readiness import Readiness

log = logging.getLogger(__name__)

Section = Callable[[], Any]  # returns something json.dumps can encode

STATUS_SCHEMA = 1


class StatusDocument:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._started = clock()
        self._sections: dict[str, Section] = {}

    def add(self, name: str, section: Section) -> None:
        self._sections[name] = section

    def build(self) -> dict[str, Any]:
        now = self._clock()
        doc: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "generated_at": now,
            "agent": {
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "started_at": self._started,
                "uptime_seconds": now - self._started,
            },
        }
        for name, section in self._sections.items():
            try:
                doc[name] = section()
            except Exception as exc:
                log.exception("status section failed", extra={"section": name})
                doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return doc


def gpus_section(
    collector: GpuCollector,
    leases: Callable[[], Mapping[str, str]] | None = None,
    health: Callable[[], Mapping[str, GpuHealth]] | None = None,
    clock: Callable[[], float] = time.time,
) -> Section:
    """GPUs from the collector's last good sample. Only when there is none yet (no
    scrape so far) does it read, bounded by the scrape timeout like a scrape."""

    def section() -> dict[str, Any]:
        snapshot, at = collector.latest()
        if snapshot is None:
            collector.sample()
            snapshot, at = collector.latest()
        lease_of = leases() if leases is not None else {}
        health_of = health() if health is not None else {}
        gpus = []
        for r in snapshot.gpus if snapshot is not None else ():
            h = health_of.get(r.uuid, GpuHealth())
            gpus.append(
                {
                    "index": r.index,
                    "uuid": r.uuid,
                    "model": r.model,
                    "lease_id": lease_of.get(r.uuid) or None,
                    "health": h.state,
                    "cordoned": h.cordoned,
                    "cordon_reason": h.reason or None,
                    "utilization_ratio": r.utilization_ratio,
                    "memory_used_bytes": r.memory_used_bytes,
                    "memory_total_bytes": r.memory_total_bytes,
                    "temperature_celsius": r.temperature_celsius,
                    "power_watts": r.power_watts,
                }
            )
        return {
            "sample_age_seconds": clock() - at if at is not None else None,
            "driver_version": snapshot.driver_version if snapshot else None,
            "cuda_version": snapshot.cuda_version if snapshot else None,
            "devices": gpus,
        }

    return section


def coordinator_section(metrics: AgentMetrics, address: str) -> Section:
    def section() -> dict[str, Any]:
        link = metrics.link_state()
        return {"address": address, **link}

    return section


def leases_section(
    states: Callable[[], Mapping[str, int]] | None,
    listing: Callable[[], list[dict[str, Any]]] | None = None,
) -> Section:
    """Counts by state, plus the lease list when the lease manager provides one."""

    def section() -> dict[str, Any]:
        counts = {k: v for k, v in (states() if states else {}).items() if v}
        doc: dict[str, Any] = {"by_state": counts}
        if listing is not None:
            doc["leases"] = listing()
        return doc

    return section


def usage_section(metrics: AgentMetrics, clock: Callable[[], float] = time.time) -> Section:
    def section() -> dict[str, Any]:
        pending, oldest = metrics.usage_backlog()
        return {
            "records_pending": pending,
            "oldest_pending_age_seconds": clock() - oldest if oldest is not None else None,
        }

    return section


def readiness_section(readiness: Readiness) -> Section:
    """The last /readyz verdict; checks are not re-run for a status read."""

    def section() -> dict[str, Any] | None:
        return readiness.last()

    return section
