"""A node's offer as the coordinator takes it (docs/market.md): checked on receipt,
then read by placement, ``offers`` and ``nodes``.

The offer's prices win; an agent that sends none (an older one) is priced by its
Hello label (``placement.price_label``), and a node with neither asks
``placement.default_price_micros_per_gpu_hour``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpuagent import market
from gpuagent.v1 import inventory_pb2, market_pb2

log = logging.getLogger(__name__)


def clean_offer(
    offer: market_pb2.NodeOffer, inventory: inventory_pb2.Inventory
) -> tuple[market_pb2.NodeOffer, list[str]]:
    """The offer with what the coordinator will not take left out, and why.

    A price for a model the node does not have, or past the price bound, is dropped;
    a bad country, region or zone is cleared; a bandwidth past the bound is clipped.
    What is left is still used: one bad key must not unprice the whole node.
    """
    problems: list[str] = []
    models = {g.name for g in inventory.gpus}
    out = market_pb2.NodeOffer()
    seen: set[str] = set()
    for index, price in enumerate(offer.pricing):
        where = f"offer.pricing[{index}]"
        if price.gpu_model not in models:
            problems.append(f"{where}: no GPU of model {price.gpu_model[:80]!r} on this node")
            continue
        if price.gpu_model in seen:
            problems.append(f"{where}: model {price.gpu_model[:80]!r} priced twice; first kept")
            continue
        try:
            market.check_price(price.micros_per_gpu_hour, where)
        except market.MarketError as exc:
            problems.append(str(exc))
            continue
        seen.add(price.gpu_model)
        out.pricing.append(price)
    loc = offer.location
    try:
        out.location.country = (
            market.check_country(loc.country, "offer.location.country") if (loc.country) else ""
        )
    except market.MarketError as exc:
        problems.append(str(exc))
    for name in ("region", "zone"):
        value = getattr(loc, name)
        try:
            setattr(out.location, name, market.check_name(value, f"offer.location.{name}"))
        except market.MarketError as exc:
            problems.append(str(exc))
    if offer.HasField("bandwidth"):
        out.bandwidth.CopyFrom(offer.bandwidth)
        if out.bandwidth.bits_per_second > market.MAX_BANDWIDTH_BPS:
            problems.append("offer.bandwidth.bits_per_second: past 10 Tbit/s; clipped")
            out.bandwidth.bits_per_second = market.MAX_BANDWIDTH_BPS
    return out, problems


@dataclass(frozen=True)
class Asks:
    """What a node asks per GPU-hour for each of its GPU models."""

    by_model: Mapping[str, int]
    default: int  # for a model the node did not price
    source: str  # "offer" | "label" | "default"

    def for_model(self, model: str) -> int:
        return self.by_model.get(model, self.default)


def node_asks(
    offer: market_pb2.NodeOffer,
    labels: Mapping[str, str],
    default_ask: int,
    price_label: str = market.LEGACY_PRICE_LABEL,
) -> Asks:
    """The field wins; then the old label; then the coordinator's default."""
    if offer.pricing:
        return Asks(
            {p.gpu_model: p.micros_per_gpu_hour for p in offer.pricing}, default_ask, "offer"
        )
    legacy = market.legacy_price(labels, price_label)
    if legacy is not None:
        return Asks({}, legacy, "label")
    return Asks({}, default_ask, "default")


def declared_bps(inventory: inventory_pb2.Inventory) -> int:
    """The fastest NIC the node declares as up (what the link says, not a measurement)."""
    return max((i.speed_bits_per_second for i in inventory.host.interfaces if i.up), default=0)


def gpu_models(inventory: inventory_pb2.Inventory) -> Iterable[str]:
    return dict.fromkeys(g.name for g in inventory.gpus)
