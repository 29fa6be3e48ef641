"""Who changed: sets of keys a source fills and each watcher drains at its own pace.

The registry (a node's record or stream) and eligibility (a node's verdicts or
collateral) tell placement's views which nodes to evaluate again
(scheduler/node_views.py) through one of these each. A set, not a callback: a
heartbeat only adds a node id, and the watcher does the work when it catches up.
"""

from __future__ import annotations

# In a watched set: every key changed (a collateral reload, a policy change).
EVERYTHING = ""


class Changes:
    def __init__(self) -> None:
        self._watchers: list[set[str]] = []

    def watch(self) -> set[str]:
        """A set that every changed key is added to from now on; the watcher empties it
        as it catches up."""
        watched: set[str] = set()
        self._watchers.append(watched)
        return watched

    def unwatch(self, watched: set[str]) -> None:
        self._watchers = [w for w in self._watchers if w is not watched]

    def add(self, key: str) -> None:
        """``key`` changed (EVERYTHING: all of them may have)."""
        for watched in self._watchers:
            watched.add(key)
