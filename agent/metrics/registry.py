"""One registry per agent, with every collector registered in scrape order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from .agent_metrics import AgentMetrics, EndpointReadiness, LeaseStates
from .gpu_collector import (
    CollectorErrors,
    CollectorStatus,
    GpuCollector,
    HealthMap,
    LeaseMap,
    MetaCollector,
)
from .gpu_sample import GpuSource


@dataclass(frozen=True)
class Telemetry:
    """What the daemon wires together: the registry and the handles that feed it."""

    registry: CollectorRegistry
    agent: AgentMetrics
    gpu: GpuCollector | None


def build_telemetry(
    *,
    gpu_source: GpuSource | None,
    scrape_timeout: float,
    gpu_leases: LeaseMap | None = None,
    gpu_health: HealthMap | None = None,
    lease_states: LeaseStates | None = None,
    endpoint_readiness: EndpointReadiness | None = None,
    usage_alert_records: int = 100_000,
    clock: Callable[[], float] = time.time,
) -> Telemetry:
    """A fresh registry with process, build, agent and GPU metrics.

    ``gpu_source`` None leaves GPU metrics out (a node whose NVML failed to load
    still exports its agent metrics). The meta collector comes last so that
    collector success/duration describe the scrape they appear in.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    agent = AgentMetrics(
        registry,
        lease_states=lease_states,
        endpoint_readiness=endpoint_readiness,
        usage_alert_records=usage_alert_records,
        clock=clock,
    )
    errors, status = CollectorErrors(), CollectorStatus()
    gpu: GpuCollector | None = None
    if gpu_source is not None:
        gpu = GpuCollector(
            gpu_source,
            timeout=scrape_timeout,
            leases=gpu_leases,
            health=gpu_health,
            errors=errors,
            status=status,
            clock=clock,
        )
        registry.register(gpu)
    registry.register(MetaCollector(errors, status))
    return Telemetry(registry=registry, agent=agent, gpu=gpu)
