"""Usage records to and from protocol messages (``gpuagent.v1.UsageRecord``).

The proto carries every field of ``gpuagent.usage.UsageRecord`` exactly (all
integers) except ``node_id``, which is the session's authenticated node: the
coordinator rebuilds the record with it, so a node can only ever sign for
itself, and the signature is checked over the rebuilt canonical bytes.
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
        gpu_utilization_permille=r.gpu_util_permille,
        gpu_memory_peak_bytes=r.peak_gpu_memory_bytes,
        energy_millijoules=r.energy_mj,
        energy_estimated=r.energy_estimated,
        cpu_usec=r.cpu_usec,
        memory_peak_bytes=r.peak_memory_bytes,
        net_rx_bytes=r.net_rx_bytes,
        net_tx_bytes=r.net_tx_bytes,
        unmeasured=r.unmeasured,
        final=r.final,
        signature=signed.signature,
    )


def record_from_pb(node_id: str, pb: usage_pb2.UsageRecord) -> SignedUsageRecord:
    """The record ``node_id`` claims to have signed; verify it before trusting it."""
    record = UsageRecord(
        node_id=node_id,
        seq=pb.seq,
        lease_id=pb.lease_id,
        start_unix_ns=pb.start_unix_nanos,
        end_unix_ns=pb.end_unix_nanos,
        duration_ns=pb.duration_ns,
        gpu_count=pb.gpu_count,
        gpu_ns=pb.gpu_ns,
        gpu_util_permille=pb.gpu_utilization_permille,
        peak_gpu_memory_bytes=pb.gpu_memory_peak_bytes,
        energy_mj=pb.energy_millijoules,
        energy_estimated=pb.energy_estimated,
        cpu_usec=pb.cpu_usec,
        peak_memory_bytes=pb.memory_peak_bytes,
        net_rx_bytes=pb.net_rx_bytes,
        net_tx_bytes=pb.net_tx_bytes,
        unmeasured=pb.unmeasured,
        final=pb.final,
    )
    return SignedUsageRecord(record, bytes(pb.signature))
