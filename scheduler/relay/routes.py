"""Where a lease is served: its node, its declared ports, its endpoint token's hash.

The relay asks a ``RouteSource`` (the coordinator's store in-process, the coordinator's
``RelayDirectory`` over gRPC when standalone) and caches each answer for ``ttl``
seconds, so a request costs no database round trip. A rotated token or an ended
lease reaches an in-process relay at once (``invalidate``) and a standalone one
within ``ttl``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gpuagent.outputs import OUTPUTS_STREAM
from gpuagent.v1 import relay_pb2


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    container_port: int
    protocol: str  # "http" | "tcp"


@dataclass(frozen=True, slots=True)
class Route:
    lease_id: str
    node_id: str
    ports: tuple[Port, ...]
    public: bool
    token_sha256: bytes

    def port(self, name: str) -> Port | None:
        """The declared port ``name`` names: by name, or by number (as the agent finds it)."""
        for port in self.ports:
            if name in (port.name, str(port.container_port)):
                return port
        return None

    def to_proto(self) -> relay_pb2.LeaseRoute:
        return relay_pb2.LeaseRoute(
            lease_id=self.lease_id,
            found=True,
            node_id=self.node_id,
            ports=[
                relay_pb2.RoutePort(
                    name=p.name, container_port=p.container_port, protocol=p.protocol
                )
                for p in self.ports
            ],
            public=self.public,
            token_sha256=self.token_sha256,
        )

    @classmethod
    def from_proto(cls, msg: relay_pb2.LeaseRoute) -> Route | None:
        if not msg.found:
            return None
        return cls(
            lease_id=msg.lease_id,
            node_id=msg.node_id,
            ports=tuple(Port(p.name, p.container_port, p.protocol or "http") for p in msg.ports),
            public=msg.public,
            token_sha256=bytes(msg.token_sha256),
        )


class RouteSource(Protocol):
    async def route(self, lease_id: str) -> Route | None:
        """The lease's route while it runs; None when unknown or not running."""
        ...

    async def output_route(self, lease_id: str, ticket: str) -> Route | None:
        """Where the lease's output archive is kept, when ``ticket`` opens it; else None.
        Never cached: a download is one request, and a ticket expires."""
        ...


def output_route(lease_id: str, node_id: str) -> Route:
    """The route of a lease's output archive: its one "port" is the outputs stream."""
    return Route(
        lease_id=lease_id,
        node_id=node_id,
        ports=(Port(OUTPUTS_STREAM, 0, "http"),),
        public=False,
        token_sha256=b"",
    )


class RouteCache:
    """Answers from ``source``, each kept ``ttl`` seconds (misses ``negative_ttl``)."""

    def __init__(
        self,
        source: RouteSource,
        ttl: float = 5.0,
        negative_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, Route | None]] = {}
        self._inflight: dict[str, asyncio.Future[Route | None]] = {}

    def invalidate(self, lease_id: str) -> None:
        self._entries.pop(lease_id, None)

    async def get(self, lease_id: str) -> Route | None:
        now = self._clock()
        entry = self._entries.get(lease_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        # One lookup per lease at a time: a burst of requests for a cold lease asks once.
        pending = self._inflight.get(lease_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Route | None] = asyncio.get_running_loop().create_future()
        self._inflight[lease_id] = future
        try:
            route = await self.source.route(lease_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            self._inflight.pop(lease_id, None)
        future.set_result(route)
        if len(self._entries) > 100_000:
            self._entries.clear()  # bounded: a scan of random ids cannot grow it forever
        self._entries[lease_id] = (now + (self.ttl if route else self.negative_ttl), route)
        return route
