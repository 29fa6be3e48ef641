"""The local status server of a running agent: /metrics, /ready, /status and the
control actions (drain, uncordon), wired to the parts that answer them.

Read-only views of the parts, except the two actions, which hand their request to
the drain controller (on the event loop) and the cordon store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import docker

from . import control_token
from .config import AgentConfig
from .drain import DrainController
from .gpu.cordons import CordonStore
from .leases.manager import LeaseManager
from .link.reporter import default_node_name
from .metrics.amdsmi_source import AmdSmiGpuSource
from .metrics.nvml_source import NvmlGpuSource
from .metrics.readiness import Readiness, coordinator_check, disk_check, docker_check, nvml_check
from .metrics.registry import Telemetry
from .metrics.server import StatusApp, StatusServer
from .metrics.status import (
    StatusDocument,
    coordinator_section,
    gpus_section,
    leases_section,
    readiness_section,
    usage_section,
)


def lease_state_counts(leases: LeaseManager) -> dict[str, int]:
    counts: dict[str, int] = {}
    for view in leases.snapshot().leases:
        counts[view.state.value] = counts.get(view.state.value, 0) + 1
    return counts


def build_status_server(
    config: AgentConfig,
    telemetry: Telemetry,
    *,
    node_id: str,
    simulated_gpus: bool,
    connected: Callable[[], bool],
    docker_client: docker.DockerClient,
    gpu_source: NvmlGpuSource | AmdSmiGpuSource,
    leases: LeaseManager,
    drain: DrainController,
    cordons: CordonStore,
    started_monotonic: float,
) -> StatusServer:
    readiness = Readiness(config.status.scrape_timeout)
    readiness.add("coordinator", coordinator_check(connected))
    readiness.add("docker", docker_check(docker_client.ping))
    readiness.add("nvml", nvml_check(gpu_source))
    readiness.add("disk", disk_check(config.node.state_dir, config.runtime.min_free_state_disk))
    doc = StatusDocument()
    doc.add(
        "node",
        lambda: {
            "node_id": node_id,
            "name": config.node.name or default_node_name(),
            "draining": drain.draining,
            "simulated_gpus": simulated_gpus,
            "uptime_seconds": round(time.monotonic() - started_monotonic, 1),
        },
    )
    if telemetry.gpu is not None:
        doc.add("gpus", gpus_section(telemetry.gpu, lambda: leases.snapshot().allocations))
    doc.add("coordinator", coordinator_section(telemetry.agent, config.coordinator.address))
    doc.add(
        "leases",
        leases_section(
            lambda: lease_state_counts(leases),
            lambda: [
                {
                    "lease_id": v.lease_id,
                    "state": v.state.value,
                    "gpu_uuids": list(v.gpu_uuids),
                    "container_id": v.container_id,
                    "expires_at": v.expires_at,
                }
                for v in leases.snapshot().leases
            ],
        ),
    )
    doc.add("usage", usage_section(telemetry.agent))
    doc.add("readiness", readiness_section(readiness))
    loop = asyncio.get_running_loop()

    def drain_action(body: Mapping[str, Any]) -> dict[str, Any]:
        # Runs on the status server's thread: the change itself happens on the loop.
        enabled = bool(body.get("enabled", True))
        raw = body.get("deadline_unix")
        deadline = float(raw) if isinstance(raw, int | float) and enabled else None
        loop.call_soon_threadsafe(drain.set, enabled, "local (gpu-agent drain)", deadline)
        return {"draining": enabled, "deadline_unix": deadline}

    def uncordon(body: Mapping[str, Any]) -> dict[str, Any]:
        uuid = str(body.get("uuid", ""))
        released = cordons.uncordon(uuid)
        return {"uncordoned": released is not None, "uuid": uuid}

    app = StatusApp(
        telemetry.registry,
        readiness=readiness,
        status=doc.build,
        actions={"drain": drain_action, "uncordon": uncordon},
        control_token=control_token.load_or_create(config.node.state_dir),
    )
    return StatusServer(config.status.listen, app)
