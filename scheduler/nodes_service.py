"""``Nodes``: the operator's view of the registry (``gpu-scheduler nodes``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gpuagent.v1 import coordinator_pb2, nodes_pb2, nodes_pb2_grpc

from .attestation import AttestationManager, AttestError, InFlight, NotConnected
from .auth import store as acl_store
from .auth.interceptor import Principal, caller
from .market import Asks, declared_bps
from .registry import NodeRecord, Registry

# Nodes.Attest with wait and no deadline waits at most this long.
MAX_ATTEST_WAIT_S = 600.0


class NodesService(nodes_pb2_grpc.NodesServicer):
    def __init__(self, registry: Registry, attestation: AttestationManager | None = None) -> None:
        self.registry = registry
        self.attestation = attestation
        # The dispatcher's pricing (offer, else label, else default), set by the server.
        self.asks: Callable[[NodeRecord], Asks] | None = None
        # Redundant-run copies the node lost a vote with (scheduler/verify.py), set by the
        # server; shown to anyone who may see the node (a buyer choosing providers too).
        self.verify_flags: Callable[[str], Awaitable[list[nodes_pb2.VerifyFlag]]] | None = None
        # Buyers' reports of fetched outputs that did not match (scheduler/output_fetch.py).
        self.output_mismatches: (
            Callable[[str], Awaitable[list[nodes_pb2.OutputMismatch]]] | None
        ) = None

    def _view(self, record: NodeRecord, who: Principal | None = None) -> nodes_pb2.Node:
        node = self.registry.to_proto(record)
        node.offer.CopyFrom(record.offer)
        node.declared_bits_per_second = declared_bps(record.inventory)
        if self.asks is not None:
            asks = self.asks(record)
            node.price_source = asks.source
            del node.offer.pricing[:]
            for model in dict.fromkeys(g.name for g in record.inventory.gpus):
                node.offer.pricing.add(gpu_model=model, micros_per_gpu_hour=asks.for_model(model))
        if self.attestation is not None:
            node.attested = self.attestation.attested(record.node_id)
            node.attestations.extend(r.to_proto() for r in self.attestation.latest(record.node_id))
        if who is not None and not may_operate(who, record):
            market_view(node)
        return node

    async def _operated(
        self, node_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> NodeRecord:
        """The node, when the caller is its provider account or admin; else refused."""
        record = await self._find(node_id, context)
        who = caller()
        if not may_operate(who, record):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {record.node_id} belongs to another provider account; only its "
                "provider or an admin may act on it",
            )
        return record

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
        who = caller()
        nodes = [
            self._view(r, who)
            for r in sorted(self.registry.nodes.values(), key=lambda r: (r.name, r.node_id))
        ]
        return nodes_pb2.ListNodesResponse(
            nodes=[n for n in nodes if not wanted or n.liveness in wanted]
        )

    async def Get(
        self, request: nodes_pb2.GetNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        node = self._view(await self._find(request.node_id, context), caller())
        if self.verify_flags is not None:
            node.verify_flags.extend(await self.verify_flags(node.node_id))
        if self.output_mismatches is not None:
            node.output_mismatches.extend(await self.output_mismatches(node.node_id))
        return node

    async def Drain(
        self, request: nodes_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> nodes_pb2.Node:
        record = await self._operated(request.node_id, context)
        who = caller()
        await self.registry.set_draining(record, request.enabled)
        now = round(self.registry.clock() * 1e9)
        detail = f"enabled={request.enabled} deadline={request.deadline_unix_nanos}"
        await self.registry.db.call(
            lambda conn: acl_store.audit(
                conn, now, who.account, "node.drain", record.node_id, detail, who.peer
            )
        )
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
        record = await self._operated(request.node_id, context)
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


def may_operate(who: Principal, record: NodeRecord) -> bool:
    """Admin, or the provider account the node is bound to."""
    return who.is_admin() or (
        who.role == "provider" and bool(record.owner) and who.account == record.owner
    )


def market_view(node: nodes_pb2.Node) -> None:
    """Strip what only the node's provider may see: where it is on the network, host
    and hardware identifiers, and the leases it runs (other buyers' work)."""
    node.market_view = True
    for name in ("peer", "session_id"):
        node.ClearField(name)
    node.ClearField("leases")
    host = node.inventory.host
    host.ClearField("hostname")
    host.ClearField("kernel")
    host.ClearField("disks")
    for nic in host.interfaces:
        nic.ClearField("name")
    for gpu in node.inventory.gpus:
        gpu.ClearField("serial")
        gpu.ClearField("pci_bus_id")
        gpu.ClearField("nvlink_peers")
