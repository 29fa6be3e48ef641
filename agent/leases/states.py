"""Lease lifecycle states and the transitions allowed between them.

The names match ``gpuagent.v1.LeaseState`` (lower case, without the prefix) so
the link maps them one to one.
"""

from __future__ import annotations

from enum import StrEnum


class LeaseState(StrEnum):
    ASSIGNED = "assigned"
    PULLING = "pulling"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    LOST = "lost"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        LeaseState.SUCCEEDED,
        LeaseState.FAILED,
        LeaseState.CANCELLED,
        LeaseState.EXPIRED,
        LeaseState.LOST,
        LeaseState.REJECTED,
    }
)

# Every live state may end early: a cancel or expiry can land during a pull, a
# failure can happen at any step, and a restart can lose any of them.
_ENDINGS = frozenset({LeaseState.FAILED, LeaseState.CANCELLED, LeaseState.EXPIRED, LeaseState.LOST})

ALLOWED_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.ASSIGNED: frozenset({LeaseState.PULLING, LeaseState.REJECTED}) | _ENDINGS,
    LeaseState.PULLING: frozenset({LeaseState.STARTING}) | _ENDINGS,
    LeaseState.STARTING: frozenset({LeaseState.RUNNING, LeaseState.SUCCEEDED}) | _ENDINGS,
    LeaseState.RUNNING: frozenset({LeaseState.SUCCEEDED}) | _ENDINGS,
    **{state: frozenset() for state in TERMINAL_STATES},
}


class InvalidTransition(Exception):
    """A transition the lifecycle forbids; always a bug in the agent, never input."""


def check_transition(current: LeaseState, new: LeaseState) -> None:
    if new not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransition(f"lease cannot go from {current} to {new}")
