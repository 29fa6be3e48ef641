"""Where a lease's declared service ports can be reached from the agent itself.

The contract between the lease side (which knows a lease's ports, its container's
address on its own lease network and whether its health check passes) and the
tunnel side (which carries buyers' connections from the relay to the container).
The tunnel asks only through `ServiceTargets.service_target`, so a tunnel request
can never name an address: only a lease id and one of that lease's declared ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Protocol_ = Literal["http", "tcp"]


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """One declared port of one running lease, as the agent reaches it."""

    lease_id: str
    name: str  # the port's name in the spec (its number when the spec gave none)
    host: str  # the container's address on the lease's own network
    port: int  # the container port
    protocol: Protocol_
    ready: bool  # False until the readiness check passes (or while it fails)


class ServiceTargets(Protocol):
    def service_target(self, lease_id: str, port: str) -> ServiceTarget | None:
        """The target for `port` (a declared name or number) of a running lease.

        None when the lease is unknown, not running, or did not declare that port:
        the caller refuses the request and logs it.
        """
        ...
