"""Routes from the coordinator's own store, in-process or over ``RelayDirectory``.

``StoreRoutes`` answers from the lease store and the endpoint tokens (the relay inside
``serve``); ``DirectoryService`` serves the same answers to a standalone relay, whose
``RemoteRoutes`` asks for them with an admin token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from gpuagent import leaserules
from gpuagent.v1 import leases_pb2, relay_pb2, relay_pb2_grpc

from .. import outputs_store
from .routes import Port, Route, output_route

if TYPE_CHECKING:
    from ..endpoint_tokens import EndpointTokens
    from ..leases_store import LeaseStore
    from ..output_fetch import OutputTickets

Context = grpc.aio.ServicerContext[Any, Any]


def declared_ports(spec: leases_pb2.LeaseSpec) -> tuple[Port, ...]:
    """A spec's relayed ports (http and tcp; udp is never relayed), named as the agent
    names them (gpuagent/leaserules.py: a port's name defaults to its number)."""
    ports = []
    for raw in spec.ports:
        port = leaserules.Port(raw.name, raw.container_port, raw.protocol)
        protocol = leaserules.port_protocol(port)
        if protocol in ("http", "tcp"):
            ports.append(Port(leaserules.port_name(port), port.container_port, protocol))
    return tuple(ports)


class StoreRoutes:
    def __init__(
        self, store: LeaseStore, tokens: EndpointTokens, tickets: OutputTickets | None = None
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.tickets = tickets

    async def output_route(self, lease_id: str, ticket: str) -> Route | None:
        if self.tickets is None or not lease_id or len(lease_id) > 128:
            return None
        if not self.tickets.check(lease_id, ticket):
            return None
        commitment = await outputs_store.get_commitment(self.store.db, lease_id)
        if commitment is None:
            return None
        return output_route(lease_id, commitment.node_id)

    async def route(self, lease_id: str) -> Route | None:
        if not lease_id or len(lease_id) > 128:
            return None
        row = await self.store.get(lease_id)
        if row is None or row.state != "running" or not row.node_id or not row.spec.ports:
            return None
        return Route(
            lease_id=row.lease_id,
            node_id=row.node_id,
            ports=declared_ports(row.spec),
            public=row.spec.public,
            token_sha256=await self.tokens.hash_of(lease_id),
        )


class DirectoryService(relay_pb2_grpc.RelayDirectoryServicer):
    def __init__(self, routes: StoreRoutes) -> None:
        self.routes = routes

    async def Route(
        self, request: relay_pb2.RouteRequest, context: Context
    ) -> relay_pb2.LeaseRoute:
        route = await self.routes.route(request.lease_id)
        if route is None:
            return relay_pb2.LeaseRoute(lease_id=request.lease_id[:128], found=False)
        return route.to_proto()

    async def OutputRoute(
        self, request: relay_pb2.OutputRouteRequest, context: Context
    ) -> relay_pb2.LeaseRoute:
        route = await self.routes.output_route(request.lease_id, request.ticket)
        if route is None:
            return relay_pb2.LeaseRoute(lease_id=request.lease_id[:128], found=False)
        return route.to_proto()


class RemoteRoutes:
    """A standalone relay's route source: the coordinator's ``RelayDirectory``."""

    def __init__(self, channel: grpc.aio.Channel, token: str, timeout: float = 5.0) -> None:
        self.stub = relay_pb2_grpc.RelayDirectoryStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    async def route(self, lease_id: str) -> Route | None:
        answer = await self.stub.Route(
            relay_pb2.RouteRequest(lease_id=lease_id), metadata=self.metadata, timeout=self.timeout
        )
        return Route.from_proto(answer)

    async def output_route(self, lease_id: str, ticket: str) -> Route | None:
        answer = await self.stub.OutputRoute(
            relay_pb2.OutputRouteRequest(lease_id=lease_id[:128], ticket=ticket[:256]),
            metadata=self.metadata,
            timeout=self.timeout,
        )
        return Route.from_proto(answer)
