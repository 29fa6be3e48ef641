"""The one table of who may call what (docs/security.md has it as prose).

Every method the server registers must appear here: one that does not is refused
to everyone (deny by default) and ``check_complete`` fails the server's start, so
a new RPC cannot ship unguarded. Ownership (whose lease, whose node) is finer than
a role and is checked by the handler with the caller the interceptor attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .store import Role

ALL: Final[frozenset[Role]] = frozenset({"admin", "buyer", "provider"})
ADMIN: Final[frozenset[Role]] = frozenset({"admin"})
BUYER: Final[frozenset[Role]] = frozenset({"admin", "buyer"})
PROVIDER: Final[frozenset[Role]] = frozenset({"admin", "provider"})


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role]
    public: bool = False  # no token: the method proves identity its own way, or is harmless


PUBLIC = Rule(frozenset(), public=True)

RULES: Final[dict[str, Rule]] = {
    # Agents prove themselves with their node key (signed Hello) and enrolment token.
    "/gpuagent.v1.Coordinator/Connect": PUBLIC,
    # Load balancers and grpcurl: liveness and the schema, no data.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    # Buyers act on their own leases; providers read their nodes' leases' metadata.
    "/gpuagent.v1.Leases/Submit": Rule(BUYER),
    # What Submit would do, reserving nothing: the same callers as Submit.
    "/gpuagent.v1.Leases/Quote": Rule(BUYER),
    "/gpuagent.v1.Leases/Get": Rule(ALL),
    "/gpuagent.v1.Leases/List": Rule(ALL),
    "/gpuagent.v1.Leases/Cancel": Rule(BUYER),
    "/gpuagent.v1.Leases/Logs": Rule(BUYER),
    "/gpuagent.v1.Leases/RotateEndpointToken": Rule(BUYER),
    # Outputs: a download ticket and mismatch reports, for the lease's own buyer.
    "/gpuagent.v1.Leases/OutputTicket": Rule(BUYER),
    "/gpuagent.v1.Leases/ReportOutputMismatch": Rule(BUYER),
    # The relay's tunnel: agents prove themselves with their node key (signed
    # TunnelHello), each Carry stream with its session's secret.
    "/gpuagent.v1.Tunnel/Control": PUBLIC,
    "/gpuagent.v1.Tunnel/Carry": PUBLIC,
    # A standalone relay reads routes and token hashes: an operator's (admin) token.
    "/gpuagent.v1.RelayDirectory/Route": Rule(ADMIN),
    "/gpuagent.v1.RelayDirectory/OutputRoute": Rule(ADMIN),
    # Everyone sees the market; full detail and actions belong to the node's provider.
    "/gpuagent.v1.Nodes/List": Rule(ALL),
    "/gpuagent.v1.Nodes/Get": Rule(ALL),
    "/gpuagent.v1.Nodes/Drain": Rule(PROVIDER),
    "/gpuagent.v1.Nodes/Attest": Rule(PROVIDER),
    "/gpuagent.v1.Market/Offers": Rule(ALL),
    # Agents: signed with the node key, and only for a node with an open session
    # (scheduler/market_service.py bounds it in bytes, time and rate).
    "/gpuagent.v1.Market/BandwidthProbe": PUBLIC,
    # Money: crediting and stake stand in for a payment rail and a staking contract.
    "/gpuagent.v1.Ledger/Deposit": Rule(ADMIN),
    "/gpuagent.v1.Ledger/Stake": Rule(ADMIN),
    "/gpuagent.v1.Ledger/Balance": Rule(BUYER),
    "/gpuagent.v1.Ledger/Usage": Rule(ALL),
    "/gpuagent.v1.Acl/WhoAmI": Rule(ALL),
    "/gpuagent.v1.Acl/CreateAccount": Rule(ADMIN),
    "/gpuagent.v1.Acl/ListAccounts": Rule(ADMIN),
    "/gpuagent.v1.Acl/Audit": Rule(ADMIN),
    # Self-service rotation: a caller manages its own tokens; admin anyone's.
    "/gpuagent.v1.Acl/CreateToken": Rule(ALL),
    "/gpuagent.v1.Acl/ListTokens": Rule(ALL),
    "/gpuagent.v1.Acl/RevokeToken": Rule(ALL),
    "/gpuagent.v1.Acl/CreateEnrollmentToken": Rule(PROVIDER),
}


def rule(method: str) -> Rule | None:
    return RULES.get(method)


def check_complete(methods: list[str]) -> None:
    """Raise when a served method has no rule (it would be refused to everyone)."""
    missing = sorted(m for m in methods if m not in RULES)
    if missing:
        raise RuntimeError(f"methods without an authorization rule: {', '.join(missing)}")
