"""The market view (``gpu-scheduler offers``, ``Market.Offers``): online nodes' GPUs
grouped by model and memory, with prices, reliability, place and bandwidth.

Pure functions over plain entries, so grouping, filters and sorting are tested
without gRPC. Nothing here names a host, a GPU serial or an address: any buyer
may see it (docs/security.md, the market view).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpuagent.v1 import market_pb2

from .price_history import median


@dataclass(frozen=True)
class GpuEntry:
    model: str
    memory_bytes: int
    free: bool


@dataclass(frozen=True)
class NodeEntry:
    """One online node as the market sees it."""

    node_id: str
    gpus: Sequence[GpuEntry]
    asks: dict[str, int]  # model -> micro-units per GPU-hour
    uptime_30d: float
    attested: bool
    location: market_pb2.Location
    measured_bps: int
    measured_at_ns: int
    declared_bps: int
    scratch_free_bytes: int


def _keep(node: NodeEntry, model: str, memory: int, ask: int, r: market_pb2.OffersRequest) -> bool:
    if r.gpu_model and r.gpu_model.casefold() not in model.casefold():
        return False
    if r.min_memory_bytes and memory < r.min_memory_bytes:
        return False
    if r.max_price_micros and ask > r.max_price_micros:
        return False
    if r.region and node.location.region != r.region:
        return False
    if r.countries and node.location.country not in {c.upper() for c in r.countries}:
        return False
    return not (r.min_uptime_ratio and node.uptime_30d < r.min_uptime_ratio)


def build_offers(
    nodes: Iterable[NodeEntry], request: market_pb2.OffersRequest
) -> list[market_pb2.OfferGroup]:
    """Groups by (model, memory) of the nodes that pass the request's filters."""
    parts: dict[tuple[str, int], list[market_pb2.OfferNode]] = {}
    for node in nodes:
        per: dict[tuple[str, int], list[GpuEntry]] = {}
        for gpu in node.gpus:
            per.setdefault((gpu.model, gpu.memory_bytes), []).append(gpu)
        for (model, memory), gpus in per.items():
            ask = node.asks.get(model, 0)
            if not _keep(node, model, memory, ask, request):
                continue
            parts.setdefault((model, memory), []).append(
                market_pb2.OfferNode(
                    node_id=node.node_id,
                    free_gpus=sum(g.free for g in gpus),
                    total_gpus=len(gpus),
                    ask_micros=ask,
                    uptime_30d_ratio=node.uptime_30d,
                    attested=node.attested,
                    location=node.location,
                    measured_bits_per_second=node.measured_bps,
                    bandwidth_measured_at_unix_nanos=node.measured_at_ns,
                    declared_bits_per_second=node.declared_bps,
                    scratch_free_bytes=node.scratch_free_bytes,
                    online=True,
                )
            )
    groups = []
    for (model, memory), members in parts.items():
        members.sort(key=lambda n: (n.ask_micros, -n.uptime_30d_ratio, n.node_id))
        asks = [n.ask_micros for n in members]
        measured = [n.measured_bits_per_second for n in members if n.measured_bits_per_second]
        group = market_pb2.OfferGroup(
            gpu_model=model,
            memory_bytes=memory,
            free_gpus=sum(n.free_gpus for n in members),
            total_gpus=sum(n.total_gpus for n in members),
            price_min_micros=min(asks),
            price_median_micros=median(asks),
            price_max_micros=max(asks),
            nodes=len(members),
            attested_ratio=sum(n.attested for n in members) / len(members),
            uptime_30d_ratio=statistics.median(n.uptime_30d_ratio for n in members),
            regions=sorted({n.location.region for n in members if n.location.region}),
            measured_bits_per_second=median(measured) if measured else 0,
        )
        if request.nodes:
            group.node_offers.extend(members)
        groups.append(group)
    if request.sort == "uptime":
        groups.sort(key=lambda g: (-g.uptime_30d_ratio, g.price_median_micros, g.gpu_model))
    else:
        groups.sort(key=lambda g: (g.price_median_micros, g.gpu_model, g.memory_bytes))
    return groups
