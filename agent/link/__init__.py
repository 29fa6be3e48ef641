"""The agent's link to its coordinator: channel, reconnect backoff, session.

``CoordinatorLink`` keeps one ``Coordinator.Connect`` stream open, reconnecting
with gRPC's connection backoff; other parts of the agent register handlers for
coordinator messages with ``link.on(field, handler)`` and send with ``link.send``.
"""

from .backoff import Backoff
from .reporter import HeartbeatState, HelloState, NodeReporter
from .session import CoordinatorLink, LinkRejected, NotConnected

__all__ = [
    "Backoff",
    "CoordinatorLink",
    "HeartbeatState",
    "HelloState",
    "LinkRejected",
    "NodeReporter",
    "NotConnected",
]
