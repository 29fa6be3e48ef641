"""``Nodes``: the operator's view of the registry (``gpu-scheduler nodes``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from gpuagent.v1 import coordinator_pb2, nodes_pb2, nodes_pb2_grpc

from .attestation import AttestationManager, AttestError, InFlight, NotConnected
from .registry import NodeRecord, Registry

# Nodes.Attest with wait and no deadline waits at most this long.
MAX_ATTEST_WAIT_S = 600.0


class NodesService(nodes_pb2_grpc.NodesServicer):
    def __init__(self, registry: Registry, attestation: AttestationManager | None = None) -> None:
        self.registry = registry
        self.attestation = attestation

    def _view(self, record: NodeRecord) -> nodes_pb2.Node:
        node = self.registry.to_proto(record)
        if self.attestation is not None:
            node.attested = self.attestation.attested(record.node_id)
            node.attestations.extend(r.to_proto() for r in self.attestation.latest(record.node_id))
        return node

    async def _find(self, node_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> NodeRecord:
        record = self.registry.find(node_id) if node_id else None
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no node with id or unique prefix {node_id!r}"
            )
        assert record is not None
        return record

    async def List(
        self, request: nodes_pb2.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.ListNodesResponse:
        wanted = set(request.liveness)
        nodes = [
            self._view(r)
            for r in sorted(self.registry.nodes.values(), key=lambda r: (r.name, r.node_id))
        ]
        return nodes_pb2.ListNodesResponse(
            nodes=[n for n in nodes if not wanted or n.liveness in wanted]
        )

    async def Get(
        self, request: nodes_pb2.GetNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        return self._view(await self._find(request.node_id, context))

    async def Drain(
        self, request: nodes_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        record = await self._find(request.node_id, context)
        await self.registry.set_draining(record, request.enabled)
        session = self.registry.sessions.get(record.node_id)
        if session is not None:
            drain = coordinator_pb2.Drain(
                enabled=request.enabled,
                reason=request.reason,
                deadline_unix_nanos=request.deadline_unix_nanos if request.enabled else 0,
            )
            await session.send(coordinator_pb2.CoordinatorMessage(drain=drain))
        return self._view(record)

    async def Attest(
        self, request: nodes_pb2.AttestNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.AttestNodeResponse:
        record = await self._find(request.node_id, context)
        if self.attestation is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "attestation is not configured")
        assert self.attestation is not None
        try:
            attempt = await self.attestation.attest(record.node_id, list(request.gpu_uuids))
        except (NotConnected, InFlight) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise AssertionError("abort returned") from exc
        except AttestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("abort returned") from exc
        if request.wait:
            remaining = context.time_remaining()
            # Answer a little before the caller's deadline with whatever is in by then.
            within = MAX_ATTEST_WAIT_S if remaining is None else max(0.0, remaining - 0.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.done.wait(), within)
        return nodes_pb2.AttestNodeResponse(
            challenge_id=attempt.challenge_id, results=[r.to_proto() for r in attempt.results]
        )
