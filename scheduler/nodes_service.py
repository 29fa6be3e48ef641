"""``Nodes``: the operator's view of the registry (``gpu-scheduler nodes``)."""

from __future__ import annotations

from typing import Any

import grpc

from gpuagent.v1 import coordinator_pb2, nodes_pb2, nodes_pb2_grpc

from .registry import NodeRecord, Registry


class NodesService(nodes_pb2_grpc.NodesServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

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
            self.registry.to_proto(r)
            for r in sorted(self.registry.nodes.values(), key=lambda r: (r.name, r.node_id))
        ]
        return nodes_pb2.ListNodesResponse(
            nodes=[n for n in nodes if not wanted or n.liveness in wanted]
        )

    async def Get(
        self, request: nodes_pb2.GetNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        return self.registry.to_proto(await self._find(request.node_id, context))

    async def Drain(
        self, request: nodes_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        record = await self._find(request.node_id, context)
        await self.registry.set_draining(record, request.enabled)
        session = self.registry.sessions.get(record.node_id)
        if session is not None:
            drain = coordinator_pb2.Drain(enabled=request.enabled, reason=request.reason)
            await session.send(coordinator_pb2.CoordinatorMessage(drain=drain))
        return self.registry.to_proto(record)

    async def Attest(
        self, request: nodes_pb2.AttestNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.AttestNodeResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "attestation is not implemented by this scheduler yet"
        )
        raise AssertionError("abort returned")
