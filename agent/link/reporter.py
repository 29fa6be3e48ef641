"""What the link reports about the node: the state for Hello and each Heartbeat.

``NodeReporter`` is the seam: the GPU backend, lease runtime and usage outbox
feed it; ``AgentNode`` (agent/node.py) is the one the daemon runs. Static
state for tests and benchmarks is in ``benchmarks/node_fixtures.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gpuagent.v1 import common_pb2, inventory_pb2, market_pb2


@dataclass(frozen=True)
class HelloState:
    inventory: inventory_pb2.Inventory
    gpu_health: Sequence[inventory_pb2.GpuHealth] = ()
    leases: Sequence[common_pb2.LeaseStatus] = ()
    last_acked_usage_seq: int = 0
    draining: bool = False
    offer: market_pb2.NodeOffer | None = None  # prices, location, bandwidth


@dataclass(frozen=True)
class HeartbeatState:
    gpu_health: Sequence[inventory_pb2.GpuHealth] = ()
    free_gpu_uuids: Sequence[str] = ()
    allocated_gpu_uuids: Sequence[str] = ()
    leases: Sequence[common_pb2.LeaseStatus] = field(default_factory=tuple)
    draining: bool = False
    usage_pending: int = 0


class NodeReporter(Protocol):
    """Read by the link: once per Hello, once per Heartbeat. Must not block the loop."""

    async def hello_state(self) -> HelloState: ...

    async def heartbeat_state(self) -> HeartbeatState: ...


def default_node_name() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()
