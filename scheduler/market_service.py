"""``Market``: offers for buyers, the bandwidth probe for agents, and the nodes'
``OfferUpdate`` messages on their streams (docs/market.md).

- **Offers** (any role): the market view of the online nodes, ``scheduler/offers.py``.
- **BandwidthProbe** (public; the node proves itself with its key): a node with an
  open session reads at most ``PROBE_MAX_BYTES`` within ``PROBE_MAX_SECONDS``, one
  probe at a time and at most one per ``PROBE_MIN_GAP_S`` per node, so the endpoint
  cannot be turned into a traffic source by anyone, nodes included.
- **OfferUpdate**: a node's new prices, location or measured bandwidth; stored and
  used by the next placement pass, no reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from gpuagent import market
from gpuagent.signing import bandwidth_probe_signing_bytes, verify_ed25519
from gpuagent.v1 import common_pb2, coordinator_pb2, inventory_pb2, market_pb2, market_pb2_grpc

from .attestation import AttestationManager
from .coordinator_service import CoordinatorService
from .lease_dispatch import LeaseDispatcher
from .liveness import Liveness
from .market import declared_bps
from .offers import GpuEntry, NodeEntry, build_offers
from .price_history import SAMPLE_EVERY, ModelPrices, PriceHistory
from .registry import NodeRecord, Registry, Session

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
PROBE_MIN_GAP_S = 10.0
PRUNE_EVERY = 3600.0
# One incompressible block, sent again and again: no per-probe randomness to make.
_BLOCK = os.urandom(market.PROBE_CHUNK_BYTES)


async def _abort(context: Context, code: grpc.StatusCode, text: str) -> NoReturn:
    await context.abort(code, text)
    raise AssertionError("abort returned")


def check_offers_request(request: market_pb2.OffersRequest) -> None:
    """Raise MarketError naming the bad field."""
    market.check_countries(request.countries, "countries")
    market.check_ratio(request.min_uptime_ratio, "min_uptime_ratio")
    if request.region:
        market.check_name(request.region, "region")
    if request.sort not in ("", "price", "uptime"):
        raise market.MarketError(f"sort: {request.sort[:20]!r} must be price or uptime")
    if len(request.gpu_model) > 256:
        raise market.MarketError("gpu_model: at most 256 characters")


class MarketService(market_pb2_grpc.MarketServicer):
    def __init__(
        self,
        registry: Registry,
        dispatcher: LeaseDispatcher,
        history: PriceHistory,
        attestation: AttestationManager | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.history = history
        self.attestation = attestation
        self.clock = clock
        self._probing: set[str] = set()
        self._last_probe: dict[str, float] = {}  # node -> monotonic start of its last probe

    def install(self, coordinator: CoordinatorService) -> None:
        coordinator.on("offer_update", self.on_offer_update)

    # -- the stream ---------------------------------------------------------------

    async def on_offer_update(self, session: Session, update: market_pb2.OfferUpdate) -> None:
        problems = await self.registry.update_offer(session, update.offer)
        record = self.registry.nodes[session.node_id]
        log.info(
            "node offer updated",
            extra={
                "node_id": session.node_id,
                "pricing": {p.gpu_model: p.micros_per_gpu_hour for p in record.offer.pricing},
                "bandwidth_bps": record.offer.bandwidth.bits_per_second,
            },
        )
        if problems:
            log.warning(
                "node offer partly refused",
                extra={"node_id": session.node_id, "problems": problems},
            )
            error = common_pb2.ProtocolError(
                code=common_pb2.ProtocolError.MALFORMED,
                message="; ".join(problems)[:1024],
                in_reply_to="offer_update",
            )
            await session.send(coordinator_pb2.CoordinatorMessage(error=error))
        self.dispatcher.offer_changed(session.node_id)

    # -- offers -------------------------------------------------------------------

    def _online(self) -> list[NodeRecord]:
        sessions = self.registry.sessions
        return [
            r
            for r in self.registry.nodes.values()
            if r.node_id in sessions and self.registry.liveness(r) is Liveness.ONLINE
        ]

    def entry(self, record: NodeRecord) -> NodeEntry:
        hb = record.last_heartbeat
        free: set[str] = set()
        if hb is not None and not (hb.draining or record.draining):
            usable = {
                h.uuid
                for h in hb.gpu_health
                if h.state == inventory_pb2.GpuHealth.HEALTHY and not h.cordoned
            }
            free = set(hb.free_gpu_uuids) & usable
        asks = self.dispatcher.asks(record)
        gpus = [
            GpuEntry(g.name, g.memory_total_bytes, g.uuid in free) for g in record.inventory.gpus
        ]
        bandwidth = record.offer.bandwidth
        scratch = record.inventory.scratch
        return NodeEntry(
            node_id=record.node_id,
            gpus=gpus,
            asks={g.model: asks.for_model(g.model) for g in gpus},
            uptime_30d=self.registry.uptime(record)["30d"],
            attested=self.attestation.attested(record.node_id) if self.attestation else False,
            location=record.offer.location,
            measured_bps=bandwidth.bits_per_second,
            measured_at_ns=bandwidth.measured_at_unix_nanos,
            declared_bps=declared_bps(record.inventory),
            scratch_free_bytes=scratch.free_bytes,
        )

    async def Offers(
        self, request: market_pb2.OffersRequest, context: Context
    ) -> market_pb2.OffersResponse:
        try:
            check_offers_request(request)
        except market.MarketError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        groups = build_offers((self.entry(r) for r in self._online()), request)
        return market_pb2.OffersResponse(groups=groups, at_unix_nanos=round(self.clock() * 1e9))

    # -- the bandwidth probe --------------------------------------------------------

    async def BandwidthProbe(
        self, request: market_pb2.BandwidthProbeRequest, context: Context
    ) -> AsyncIterator[market_pb2.BandwidthChunk]:
        node_id = request.node_id[:80]
        record = self.registry.nodes.get(request.node_id)
        if record is None or request.node_id not in self.registry.sessions:
            # Known nodes with an open session only: nobody else gets bytes from here.
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"node_id: {node_id!r} has no open session; probe from a connected node",
            )
        assert record is not None
        signed = bandwidth_probe_signing_bytes(
            request.node_id, request.at_unix_nanos, request.bytes
        )
        if not verify_ed25519(record.public_key, request.signature, signed):
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "signature: does not verify with the node's key",
            )
        skew = abs(round(self.clock() * 1e9) - request.at_unix_nanos)
        if skew > market.PROBE_CLOCK_SKEW_NS:
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"at_unix_nanos: {skew / 1e9:.0f}s from the coordinator's clock "
                f"(at most {market.PROBE_CLOCK_SKEW_NS // 10**9}s)",
            )
        if not 0 < request.bytes <= market.PROBE_MAX_BYTES:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bytes: must be 1..{market.PROBE_MAX_BYTES}, got {request.bytes}",
            )
        now = time.monotonic()
        last = self._last_probe.get(record.node_id)
        if record.node_id in self._probing or (last is not None and now - last < PROBE_MIN_GAP_S):
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"one probe per node at a time, at most one per {PROBE_MIN_GAP_S:g}s",
            )
        self._probing.add(record.node_id)
        self._last_probe[record.node_id] = now
        deadline = now + market.PROBE_MAX_SECONDS
        left = request.bytes
        try:
            while left > 0 and time.monotonic() < deadline:
                size = min(left, len(_BLOCK))
                yield market_pb2.BandwidthChunk(data=_BLOCK[:size])
                left -= size
        finally:
            self._probing.discard(record.node_id)

    # -- price history ------------------------------------------------------------------

    def asks_now(self) -> dict[str, list[int]]:
        """model -> the asks of the online nodes that have it."""
        out: dict[str, list[int]] = {}
        for record in self._online():
            asks = self.dispatcher.asks(record)
            for model in dict.fromkeys(g.name for g in record.inventory.gpus):
                out.setdefault(model, []).append(asks.for_model(model))
        return out

    def prices(self) -> dict[str, ModelPrices]:
        return self.history.current

    async def run(self, stop: asyncio.Event, every: float = SAMPLE_EVERY) -> None:
        """Sample prices every ``every`` seconds and prune old history hourly."""
        last_prune = float("-inf")
        while not stop.is_set():
            try:
                await self.history.sample(self.asks_now())
                if time.monotonic() - last_prune >= PRUNE_EVERY:
                    last_prune = time.monotonic()
                    await self.history.prune()
            except Exception:
                log.exception("price history sample failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
        with contextlib.suppress(Exception):
            await self.history.sample(self.asks_now())  # placements since the last sample
