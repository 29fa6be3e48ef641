"""Usage records between the shared model (``gpuagent.usage``) and protobuf.

The node id is not on the wire: the coordinator takes it from the authenticated
session, so a record can only ever be verified as coming from that node.
"""

from __future__ import annotations

from gpuagent.usage import SignedUsageRecord, UsageRecord
from gpuagent.v1 import usage_pb2


def record_to_pb(signed: SignedUsageRecord) -> usage_pb2.UsageRecord:
    r = signed.record
    return usage_pb2.UsageRecord(
        seq=r.seq,
        lease_id=r.lease_id,
        start_unix_nanos=r.start_unix_ns,
        end_unix_nanos=r.end_unix_ns,
        duration_ns=r.duration_ns,
        gpu_count=r.gpu_count,
        gpu_ns=r.gpu_ns,
        gpu_util_permille=r.gpu_util_permille,
        gpu_memory_peak_bytes=r.peak_gpu_memory_bytes,
        energy_millijoules=r.energy_mj,
        energy_estimated=r.energy_estimated,
        cpu_usec=r.cpu_usec,
        memory_peak_bytes=r.peak_memory_bytes,
        net_rx_bytes=r.net_rx_bytes,
        net_tx_bytes=r.net_tx_bytes,
        final=r.final,
        signature=signed.signature,
        unmeasured=r.unmeasured,
    )


def record_from_pb(node_id: str, msg: usage_pb2.UsageRecord) -> SignedUsageRecord:
    """The record as the node signed it; verification is the caller's next step."""
    record = UsageRecord(
        node_id=node_id,
        seq=msg.seq,
        lease_id=msg.lease_id,
        start_unix_ns=msg.start_unix_nanos,
        end_unix_ns=msg.end_unix_nanos,
        duration_ns=msg.duration_ns,
        gpu_count=msg.gpu_count,
        gpu_ns=msg.gpu_ns,
        gpu_util_permille=msg.gpu_util_permille,
        peak_gpu_memory_bytes=msg.gpu_memory_peak_bytes,
        energy_mj=msg.energy_millijoules,
        energy_estimated=msg.energy_estimated,
        cpu_usec=msg.cpu_usec,
        peak_memory_bytes=msg.memory_peak_bytes,
        net_rx_bytes=msg.net_rx_bytes,
        net_tx_bytes=msg.net_tx_bytes,
        unmeasured=msg.unmeasured,
        final=msg.final,
    )
    return SignedUsageRecord(record=record, signature=msg.signature)
