"""What the agent remembers about a lease, and what it reports when one changes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

from .states import LeaseState

LOG_TAIL_MAX_BYTES = 64 * 1024  # the protocol bounds LeaseUpdate.log_tail to this


@dataclass(frozen=True)
class EndpointStatus:
    """One declared port of a lease as the agent last checked it (``gpuagent.v1.Endpoint``)."""

    name: str
    protocol: str
    container_port: int
    ready: bool = False
    last_check_at: float | None = None  # unix seconds; None = not checked yet
    last_result: str = ""  # "ok", or why the last check failed
    restarts: int = 0
    direct_address: str = ""  # direct mode: "host:port" the agent serves it on; "" = relay only
    direct_tls: bool = False


@dataclass(frozen=True)
class LeaseUpdate:
    """One state change, sent to the coordinator as an idempotent ``LeaseUpdate``.

    ``seq`` starts at 1 per lease and grows by one per update, so the coordinator
    can drop a re-sent update it already stored.
    """

    lease_id: str
    seq: int
    state: LeaseState
    at: float  # unix seconds
    reason: str = ""
    exit_code: int | None = None
    log_tail: str = ""
    container_id: str = ""
    gpu_uuids: tuple[str, ...] = ()
    # Terminal updates only: unix seconds the container really exited (Docker's
    # State.FinishedAt), which is earlier than ``at`` when it exited while the
    # agent was down. The final usage record ends here, not at ``at``.
    ended_at: float | None = None
    # Unix seconds the lease started running (None before): lets the final usage
    # record of a lease that never had one start there after an agent restart.
    started_at: float | None = None
    # Service leases: the declared ports' health, and the container restarts so far.
    endpoints: tuple[EndpointStatus, ...] = ()
    restarts: int = 0
    # Terminal updates of leases that declared outputs: the signed commitment
    # (agent/leases/output_pack.Commitment.to_json), stored with the update so an agent
    # that dies before reporting it re-sends it.
    outputs: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        data: dict[str, Any] = json.loads(text)
        data["state"] = LeaseState(data["state"])
        data["gpu_uuids"] = tuple(data["gpu_uuids"])
        # Updates stored by an older agent have neither field: the defaults fit.
        data["endpoints"] = tuple(EndpointStatus(**e) for e in data.get("endpoints", ()))
        return cls(**data)


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as the state DB holds it; replaced, never mutated."""

    lease_id: str
    state: LeaseState
    spec: dict[str, Any]  # LeaseSpec.stored(): JSON data without registry credentials
    created_at: float
    updated_at: float
    gpu_uuids: tuple[str, ...] = ()
    container_id: str | None = None
    exit_code: int | None = None
    reason: str = ""
    log_tail: str = ""
    expires_at: float | None = None  # unix seconds
    started_at: float | None = None  # unix seconds
    # Set before the agent stops a container on purpose, so the exit it causes
    # is reported as cancelled/expired, even across an agent restart.
    stop_state: LeaseState | None = None
    stop_reason: str = ""
    update_seq: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> LeaseRecord:
        return replace(self, **changes)


def bound_log_tail(text: str) -> str:
    """The last ``LOG_TAIL_MAX_BYTES`` of ``text``, cut on a character boundary."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= LOG_TAIL_MAX_BYTES:
        return text
    return data[-LOG_TAIL_MAX_BYTES:].decode("utf-8", errors="ignore")
