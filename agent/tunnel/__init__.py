"""The agent's end of the relay tunnel: dial out, carry buyers' connections in.

``TunnelClient`` keeps one Control stream open to the relay the coordinator named
(Welcome.relay) and answers each OpenStream with a Carry stream to the lease's own
container port, asking only ``ServiceTargets.service_target`` where that is.
"""

from .client import TunnelClient

__all__ = ["TunnelClient"]
