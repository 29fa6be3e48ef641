"""What the node offers the market (docs/market.md): its asks per GPU model, its
location and its measured bandwidth, kept current on the open session.

The offer goes whole in Hello and again in an ``OfferUpdate`` whenever it changes: a
SIGHUP that changes ``node.pricing`` or ``node.location``, or a bandwidth probe. No
reconnect is needed; the coordinator prices new leases by the newest offer, running
leases keep the price they were placed at.

The probe reads a bounded number of bytes from the coordinator's
``Market.BandwidthProbe`` over the session's own channel, within a bounded time, and
reports bits per second with when it was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from gpuagent import market
from gpuagent.signing import bandwidth_probe_signing_bytes
from gpuagent.v1 import coordinator_pb2, inventory_pb2, market_pb2, market_pb2_grpc

from .config import AgentConfig, NodeConfig
from .hostinfo import NetInterface
from .link import CoordinatorLink, NotConnected

log = logging.getLogger(__name__)

# Interfaces that are not the host's way out: loopback and what Docker makes.
_VIRTUAL_PREFIXES = ("lo", "veth", "docker", "br-", "virbr", "cni", "flannel", "tun", "tap")


def declared_interfaces(interfaces: Iterable[NetInterface]) -> list[inventory_pb2.NetInterface]:
    """The NICs a node declares (name, up, link speed): no addresses, no MACs."""
    return [
        inventory_pb2.NetInterface(
            name=i.name[:64],
            up=i.up,
            speed_bits_per_second=(i.speed_mbps or 0) * 1_000_000,
        )
        for i in interfaces
        if not i.name.startswith(_VIRTUAL_PREFIXES)
    ][:64]


def scratch_storage(path: Path) -> inventory_pb2.ScratchStorage:
    """Total and free bytes of the filesystem lease scratch lives on (nearest parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return inventory_pb2.ScratchStorage()
    return inventory_pb2.ScratchStorage(total_bytes=usage.total, free_bytes=usage.free)


def build_offer(
    node: NodeConfig,
    gpu_models: Sequence[str],
    bandwidth: market_pb2.BandwidthMeasurement | None = None,
) -> market_pb2.NodeOffer:
    where = node.where()
    asks = market.resolve_pricing(node.asks(), gpu_models)
    offer = market_pb2.NodeOffer(
        pricing=[
            market_pb2.GpuPrice(gpu_model=model, micros_per_gpu_hour=price)
            for model, price in sorted(asks.items())
        ],
        location=market_pb2.Location(region=where.region, country=where.country, zone=where.zone),
    )
    if bandwidth is not None:
        offer.bandwidth.CopyFrom(bandwidth)
    return offer


async def probe_bandwidth(
    channel: grpc.aio.Channel,
    node_id: str,
    sign: Callable[[bytes], bytes],
    wanted: int,
    *,
    limit_s: float = market.PROBE_MAX_SECONDS,
    clock: Callable[[], int] = time.time_ns,
) -> market_pb2.BandwidthMeasurement:
    """Read up to ``wanted`` bytes from the coordinator within ``limit_s``; the figure.

    Bounded both ways: the request asks for at most PROBE_MAX_BYTES, the reading stops
    at ``wanted`` bytes whatever the server sends, and the call has a deadline. A probe
    cut by the deadline still measures what arrived.
    """
    wanted = max(1, min(wanted, market.PROBE_MAX_BYTES))
    at = clock()
    request = market_pb2.BandwidthProbeRequest(
        node_id=node_id,
        at_unix_nanos=at,
        bytes=wanted,
        signature=sign(bandwidth_probe_signing_bytes(node_id, at, wanted)),
    )
    stub = market_pb2_grpc.MarketStub(channel)
    received = 0
    started = time.perf_counter_ns()
    first: int | None = None
    error = ""
    call = stub.BandwidthProbe(request, timeout=limit_s)
    try:
        async for chunk in call:
            if first is None:
                # Timed from the first byte: the call's setup is latency, not bandwidth.
                first = time.perf_counter_ns()
            received += len(chunk.data)
            if received >= wanted:
                break
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or not received:
            error = f"{exc.code().name}: {exc.details()}"[:512]
    finally:
        call.cancel()
    ended = time.perf_counter_ns()
    elapsed = max(1, ended - (first if first is not None else started))
    if error or not received:
        return market_pb2.BandwidthMeasurement(
            bytes=received, elapsed_ns=elapsed, measured_at_unix_nanos=clock(), error=error
        )
    return market_pb2.BandwidthMeasurement(
        bits_per_second=min(received * 8 * 10**9 // elapsed, market.MAX_BANDWIDTH_BPS),
        bytes=received,
        elapsed_ns=elapsed,
        measured_at_unix_nanos=clock(),
    )


class MarketReporter:
    """Keeps the node's offer and sends it when it changes (AgentNode composes it)."""

    def __init__(
        self,
        config: AgentConfig,
        link: CoordinatorLink,
        gpu_models: Sequence[str],
        sign: Callable[[bytes], bytes],
    ) -> None:
        self.config = config
        self.link = link
        self.gpu_models = list(dict.fromkeys(gpu_models))
        self.sign = sign
        self.bandwidth: market_pb2.BandwidthMeasurement | None = None
        self._session = asyncio.Event()  # set by each new session: probe now
        self._warn_unmatched()

    def _warn_unmatched(self) -> None:
        # A key that names no GPU here prices nothing: most likely a typo.
        unmatched = market.unmatched_price_keys(self.config.node.pricing, self.gpu_models)
        if unmatched:
            log.warning(
                "node.pricing keys match no GPU of this node; they price nothing",
                extra={"keys": unmatched, "gpu_models": self.gpu_models},
            )

    def offer(self) -> market_pb2.NodeOffer:
        return build_offer(self.config.node, self.gpu_models, self.bandwidth)

    async def on_session(self, _welcome: Any) -> None:
        self._session.set()

    async def reload(self, config: AgentConfig) -> None:
        """After SIGHUP: send the new offer when prices or location changed."""
        before = self.offer()
        self.config = config
        self._warn_unmatched()
        after = self.offer()
        if after != before:
            log.info(
                "offer changed; sending it to the coordinator",
                extra={"pricing": {p.gpu_model: p.micros_per_gpu_hour for p in after.pricing}},
            )
            await self.send()

    async def send(self) -> bool:
        update = market_pb2.OfferUpdate(offer=self.offer())
        with contextlib.suppress(NotConnected):
            await self.link.send(coordinator_pb2.AgentMessage(offer_update=update))
            return True
        return False  # the next Hello carries it

    async def probe_once(self) -> market_pb2.BandwidthMeasurement | None:
        channel = self.link.channel
        if channel is None:
            return None
        measured = await probe_bandwidth(
            channel,
            self.link.identity.node_id,
            self.sign,
            int(self.config.coordinator.bandwidth_probe_bytes),
        )
        if measured.error:
            log.warning("bandwidth probe failed", extra={"error": measured.error})
            last = self.bandwidth
            if last is not None and last.bits_per_second:
                # The last good figure stands, with when it was measured; the error
                # says the newer probe failed.
                measured = market_pb2.BandwidthMeasurement(
                    bits_per_second=last.bits_per_second,
                    bytes=last.bytes,
                    elapsed_ns=last.elapsed_ns,
                    measured_at_unix_nanos=last.measured_at_unix_nanos,
                    error=measured.error,
                )
        else:
            log.info(
                "bandwidth measured",
                extra={
                    "bits_per_second": measured.bits_per_second,
                    "bytes": measured.bytes,
                    "elapsed_ms": round(measured.elapsed_ns / 1e6, 1),
                },
            )
        self.bandwidth = measured
        await self.send()
        return measured

    async def run(self, stop: asyncio.Event) -> None:
        """Probe at each registration and every ``bandwidth_probe_interval``."""
        while not stop.is_set():
            interval = self.config.coordinator.bandwidth_probe_interval
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._session.wait()),
            ]
            await asyncio.wait(
                waiters, timeout=interval or None, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
            if stop.is_set():
                return
            self._session.clear()
            if not interval or not self.link.connected:
                continue
            try:
                await self.probe_once()
            except Exception:  # a failed probe must not stop the agent
                log.exception("bandwidth probe failed")
