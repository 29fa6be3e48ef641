"""Node liveness from heartbeat silence, with an injectable clock.

- ``online``  while the last heartbeat is at most ``suspect_after_missed``
  heartbeat intervals old (30 s by default);
- ``suspect`` after that;
- ``offline`` once silence exceeds ``offline_grace`` (45 s by default, longer
  than keepalive's dead-connection detection, 20 s + 10 s, so a dead TCP
  connection is noticed by the transport before a node is declared offline);
- after a scheduler restart, a node not heard from since the restart is not
  marked offline before ``restart_grace`` (120 s) has passed since the start:
  agents need time to notice the restart and come back through their backoff.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Liveness(enum.Enum):
    ONLINE = "online"
    SUSPECT = "suspect"
    OFFLINE = "offline"


@dataclass(frozen=True)
class LivenessPolicy:
    heartbeat_interval: float = 10.0
    suspect_after_missed: int = 3
    offline_grace: float = 45.0
    restart_grace: float = 120.0

    @property
    def suspect_after(self) -> float:
        return self.heartbeat_interval * self.suspect_after_missed


def is_online(policy: LivenessPolicy, last_seen: float | None, now: float) -> bool:
    """The one "online" rule: heard from within ``suspect_after`` (None: never heard)."""
    return last_seen is not None and now - last_seen <= policy.suspect_after


def evaluate(
    policy: LivenessPolicy, last_seen: float | None, now: float, scheduler_started: float
) -> Liveness:
    """Liveness of a node last heard from at ``last_seen`` (None: never), all wall clock."""
    if last_seen is None:
        return Liveness.OFFLINE
    if is_online(policy, last_seen, now):
        return Liveness.ONLINE
    silence = now - last_seen
    if silence <= policy.offline_grace:
        return Liveness.SUSPECT
    not_seen_since_start = last_seen < scheduler_started
    if not_seen_since_start and now - scheduler_started <= policy.restart_grace:
        return Liveness.SUSPECT
    return Liveness.OFFLINE
