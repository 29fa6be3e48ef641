"""Conversions from the agent's own models to protocol messages, in one place.

The GPU backend, host probe and lease manager keep plain dataclasses (easy to
test, no protobuf in their hot paths); only the link needs protobuf.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from gpuagent import leaserules
from gpuagent.v1 import common_pb2, inventory_pb2, leases_pb2

from .gpu.model import GpuHealth, GpuInfo, HealthState
from .hostinfo import HostInfo
from .isolation.selftest import SelfTestResult
from .leases.manager import LeaseView
from .leases.records import LeaseUpdate
from .leases.states import LeaseState
from .market import declared_interfaces

_HEALTH = {
    HealthState.HEALTHY: inventory_pb2.GpuHealth.HEALTHY,
    HealthState.DEGRADED: inventory_pb2.GpuHealth.DEGRADED,
    HealthState.UNHEALTHY: inventory_pb2.GpuHealth.UNHEALTHY,
}

LEASE_STATE_TO_PB = {
    state: common_pb2.LeaseState.Value(f"LEASE_STATE_{state.name}") for state in LeaseState
}


def gpu_info(info: GpuInfo) -> inventory_pb2.GpuInfo:
    major, _, minor = (info.compute_capability or "").partition(".")
    return inventory_pb2.GpuInfo(
        index=info.index,
        uuid=info.uuid or "",
        name=info.name or "",
        serial=info.serial or "",
        pci_bus_id=info.pci_bus_id or "",
        memory_total_bytes=info.memory_total_bytes or 0,
        compute_capability_major=int(major) if major.isdigit() else 0,
        compute_capability_minor=int(minor) if minor.isdigit() else 0,
        architecture=info.architecture or "",
        driver_version=info.driver_version or "",
        cuda_driver_version=info.cuda_driver_version or "",
        power_limit_watts=info.power_limit_watts or 0.0,
        max_sm_clock_mhz=info.max_sm_clock_mhz or 0,
        max_mem_clock_mhz=info.max_memory_clock_mhz or 0,
        pcie_gen=info.pcie_max_generation or 0,
        pcie_width=info.pcie_max_width or 0,
        mig_mode=bool(info.mig_enabled),
        mig_devices=[
            inventory_pb2.MigDevice(
                uuid=m.uuid,
                profile=m.profile,
                memory_total_bytes=m.memory_total_bytes or 0,
                gpu_instance_id=m.gpu_instance_id or 0,
                compute_instance_id=m.compute_instance_id or 0,
            )
            for m in info.mig_devices
        ],
        ecc_mode=bool(info.ecc_enabled),
        nvlink_peers=[
            inventory_pb2.NvLinkPeer(
                link=p.link, peer_pci_bus_id=p.peer_pci_bus_id, peer_uuid=p.peer_uuid or ""
            )
            for p in info.nvlink_peers
        ],
        simulated=info.simulated,
    )


def host_info(host: HostInfo) -> inventory_pb2.HostInfo:
    return inventory_pb2.HostInfo(
        hostname=host.hostname,
        cpu_model=host.cpu_model or "",
        cpu_cores=host.cpu_cores or 0,
        cpu_threads=host.cpu_threads or 0,
        memory_bytes=host.memory_bytes,
        disks=[
            inventory_pb2.Disk(
                mountpoint=d.mountpoint,
                device=d.device,
                fstype=d.fstype,
                total_bytes=d.total_bytes,
                free_bytes=d.free_bytes,
            )
            for d in host.disks
        ],
        kernel=host.kernel,
        os=host.os or "",
        docker_version=host.docker_version or "",
        nvidia_container_toolkit_version=host.nvidia_container_toolkit_version or "",
        arch=host.arch,
        interfaces=declared_interfaces(host.interfaces),
    )


def inventory(host: HostInfo, gpus: Iterable[GpuInfo]) -> inventory_pb2.Inventory:
    return inventory_pb2.Inventory(
        host=host_info(host),
        # A GPU lost before detection has no UUID: it cannot be leased or named.
        gpus=[gpu_info(g) for g in gpus if g.uuid],
        collected_at_unix_nanos=time.time_ns(),
    )


def gpu_health(health: GpuHealth) -> inventory_pb2.GpuHealth:
    msg = inventory_pb2.GpuHealth(
        uuid=health.uuid or "",
        state=_HEALTH[health.state],
        cordoned=health.cordoned,
        reasons=list(health.reasons),
    )
    sample = health.sample
    if sample is not None:
        if sample.temperature_celsius is not None:
            msg.temperature_celsius = sample.temperature_celsius
        if sample.utilization_ratio is not None:
            msg.utilization_ratio = sample.utilization_ratio
        if sample.memory_used_bytes is not None:
            msg.memory_used_bytes = sample.memory_used_bytes
    return msg


_ISOLATION = {
    "verified": inventory_pb2.Isolation.VERIFIED,
    "failed": inventory_pb2.Isolation.FAILED,
    "unverified": inventory_pb2.Isolation.UNVERIFIED,
    "disabled": inventory_pb2.Isolation.DISABLED,
}


def isolation(
    result: SelfTestResult, egress_policy: bool, scratch_mode: str
) -> inventory_pb2.Isolation:
    return inventory_pb2.Isolation(
        status=_ISOLATION[result.status],
        detail=result.detail[:1024],
        egress_policy=egress_policy,
        scratch_mode=scratch_mode,
        checked_at_unix_nanos=int(result.checked_at * 1e9),
    )


def lease_status(view: LeaseView) -> common_pb2.LeaseStatus:
    return common_pb2.LeaseStatus(
        lease_id=view.lease_id, state=LEASE_STATE_TO_PB[view.state], gpu_uuids=view.gpu_uuids
    )


def lease_update(update: LeaseUpdate) -> leases_pb2.LeaseUpdate:
    msg = leases_pb2.LeaseUpdate(
        lease_id=update.lease_id,
        update_seq=update.seq,
        state=LEASE_STATE_TO_PB[update.state],
        # Docker's errors echo the command: a long one must not oversize the update.
        reason=leaserules.clip(update.reason),
        log_tail=update.log_tail or "",
        container_id=update.container_id or "",
        gpu_uuids=list(update.gpu_uuids),
        at_unix_nanos=round(update.at * 1e9),
        endpoints=[
            leases_pb2.Endpoint(
                name=e.name,
                protocol=e.protocol,
                container_port=e.container_port,
                ready=e.ready,
                last_check_unix_nanos=round(e.last_check_at * 1e9) if e.last_check_at else 0,
                last_result=leaserules.clip(e.last_result, 256),
                restarts=e.restarts,
                direct_address=e.direct_address,
                direct_tls=e.direct_tls,
            )
            for e in update.endpoints
        ],
        restarts=update.restarts,
    )
    if update.exit_code is not None:
        msg.exit_code = update.exit_code
    if update.outputs:
        msg.outputs.CopyFrom(output_commitment(update.outputs))
    return msg


def output_commitment(data: dict[str, Any]) -> leases_pb2.OutputCommitment:
    """The stored commitment (output_pack.Commitment.to_json) as the wire carries it."""
    return leases_pb2.OutputCommitment(
        lease_id=str(data["lease_id"]),
        node_id=str(data["node_id"]),
        digest=bytes.fromhex(str(data["digest"])),
        size=int(data["size"]),
        chunk_bytes=int(data["chunk_bytes"]),
        signature=bytes.fromhex(str(data["signature"])),
        missing=[str(m) for m in data.get("missing", ())],
        file_count=int(data["file_count"]),
        retained_until_unix_nanos=int(data.get("retained_until_unix_nanos", 0)),
    )
