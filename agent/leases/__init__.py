"""Leases on the agent side: spec checks, GPU allocation, Docker runtime, lifecycle.

``LeaseManager`` is the entry point the link and the daemon use; see
``docs/leases.md`` for the states, rejection reasons, labels and reconciliation.
"""

from .allocator import AllocationError, GpuAllocator
from .docker_runtime import DockerRuntime, container_name
from .manager import HostCapacity, LeaseManager, LeasesSnapshot, LeaseView, RunningLease
from .records import LeaseRecord, LeaseUpdate
from .spec import LeaseRejected, LeaseSpec, RejectCode, Rejection, check_spec, parse_spec
from .statedb import StateDB
from .states import LeaseState

__all__ = [
    "AllocationError",
    "DockerRuntime",
    "GpuAllocator",
    "HostCapacity",
    "LeaseManager",
    "LeaseRecord",
    "LeaseRejected",
    "LeaseSpec",
    "LeaseState",
    "LeaseUpdate",
    "LeaseView",
    "LeasesSnapshot",
    "RejectCode",
    "Rejection",
    "RunningLease",
    "StateDB",
    "check_spec",
    "container_name",
    "parse_spec",
]
