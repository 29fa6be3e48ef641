"""The market's rules without a network: placement's constraints and tie-breaks, prices
per GPU model, offer grouping, what the coordinator takes of an offer, the agent's
config, and the price history's retention and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.cli import main
from agent.config import AgentConfig
from agent.market import build_offer
from agent.reload import merge_live, plan_reload
from gpuagent import market
from gpuagent.v1 import inventory_pb2, market_pb2
from scheduler.db import Database
from scheduler.market import clean_offer, node_asks
from scheduler.metrics import SchedulerMetrics
from scheduler.offers import GpuEntry, NodeEntry, build_offers
from scheduler.placement import (
    GpuView,
    NodeMarket,
    NodeView,
    Request,
    choose,
    take,
    why_not,
)
from scheduler.price_history import RETENTION, PriceHistory
from tests.coordinator_harness import FakeClock

GIB = 1024**3
RTX, H100 = "NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"


def _node(node_id: str, ask: int = 100, gpus: int = 2, **market_fields: object) -> NodeView:
    return NodeView(
        node_id=node_id,
        online=True,
        draining=False,
        ask_micros=ask,
        free_gpus=tuple(GpuView(f"{node_id}-{i}", RTX, 24 * GIB, i, ask) for i in range(gpus)),
        market=NodeMarket(**market_fields),  # type: ignore[arg-type]
    )


def test_ties_are_broken_by_uptime_then_bandwidth() -> None:
    """Same price and fit: the higher 30-day uptime wins; at equal uptime the higher
    measured bandwidth; only then the node id."""
    nodes = [
        _node("a", uptime_30d=0.95, bandwidth_bps=10**10),
        _node("b", uptime_30d=0.99, bandwidth_bps=10**8),
        _node("c", uptime_30d=0.99, bandwidth_bps=10**9),
    ]
    decision = choose(nodes, Request(gpu_count=1, price_ceiling_micros=100))
    assert decision.placement is not None and decision.placement.node_id == "c"
    # Price still comes first, fit second.
    nodes.append(_node("cheap", ask=90, uptime_30d=0.5))
    assert choose(nodes, Request(gpu_count=1, price_ceiling_micros=100)).placement.node_id == (  # type: ignore[union-attr]
        "cheap"
    )


def test_constraints_exclude_with_countable_reasons() -> None:
    """Each constraint leaves nodes out with a reason whose kind names the constraint,
    so the waiting line reads "3 outside region eu"; why_not agrees with choose."""
    nodes = [
        _node("us1", region="us", country="US"),
        _node("us2", region="us", country="US"),
        _node("us3", region="us", country="US"),
        _node("de", region="eu", country="DE", labels={"tier": "gold"}, uptime_30d=0.9),
    ]
    request = Request(gpu_count=1, price_ceiling_micros=100, region="eu")
    decision = choose(nodes, request)
    assert decision.placement is not None and decision.placement.node_id == "de"
    assert decision.skipped_counts() == {"outside region eu": 3}

    cases = {
        "outside countries FR": Request(
            gpu_count=1, price_ceiling_micros=100, countries=frozenset({"FR"})
        ),
        "uptime below 95.00%": Request(gpu_count=1, price_ceiling_micros=100, min_uptime=0.95),
        "labels do not match": Request(
            gpu_count=1, price_ceiling_micros=100, node_selector=(("tier", "platinum"),)
        ),
        "bandwidth below 1 Gbit/s": Request(
            gpu_count=1, price_ceiling_micros=100, min_bandwidth_bps=10**9
        ),
    }
    for kind, req in cases.items():
        d = choose(nodes, req)
        assert d.placement is None, kind
        assert d.skipped_counts() == {kind: 4}, (kind, d.skipped_counts())
        assert d.summary() == f"no node fits: 4 {kind}"
        for n in nodes:
            reason = why_not(n, req)
            assert reason is not None and reason.startswith(kind)


def test_scratch_on_offer_is_a_constraint_when_the_node_reports_it() -> None:
    """A lease wanting more scratch than a node has free goes elsewhere; a node that does
    not report its scratch is left to refuse it itself."""
    nodes = [
        _node("small", scratch_free_bytes=GIB),
        _node("silent"),
        _node("big", scratch_free_bytes=100 * GIB),
    ]
    request = Request(gpu_count=1, price_ceiling_micros=100, scratch_bytes=10 * GIB)
    d = choose(nodes, request)
    assert d.skipped_counts() == {"not enough scratch": 1}
    assert d.candidates == 2  # fmt: skip


def test_a_node_of_two_models_asks_two_prices() -> None:
    """The cheapest matching GPUs are taken and the lease pays the highest ask among
    them; a model filter picks the model's own ask; a ceiling below it refuses."""
    gpus = (
        GpuView("h0", H100, 80 * GIB, 0, 400),
        GpuView("r0", RTX, 24 * GIB, 1, 150),
        GpuView("r1", RTX, 24 * GIB, 2, 150),
    )
    node = NodeView("mixed", True, False, 150, gpus, uniform_price=False)
    one = choose([node], Request(gpu_count=1, price_ceiling_micros=1000)).placement
    assert one is not None and one.gpu_uuids == ("r0",) and one.ask_micros == 150
    three = choose([node], Request(gpu_count=3, price_ceiling_micros=1000)).placement
    assert three is not None and three.ask_micros == 400
    h100 = choose([node], Request(gpu_count=1, gpu_model="H100", price_ceiling_micros=1000))
    assert h100.placement is not None and h100.placement.ask_micros == 400
    too_dear = Request(gpu_count=1, gpu_model="H100", price_ceiling_micros=300)
    assert choose([node], too_dear).placement is None
    assert (why_not(node, too_dear) or "").startswith("too expensive: ask 400")


def test_isolation_block_and_take_keep_every_field() -> None:
    """A node whose isolation keeps leases off it is skipped by choose (as why_not says),
    and taking GPUs from a node keeps its market view and isolation."""
    blocked = NodeView("iso", True, False, 10, _node("iso").free_gpus, isolation_block="failed")
    decision = choose([blocked], Request(gpu_count=1, price_ceiling_micros=100))
    assert decision.placement is None and "not isolated" in decision.summary()
    node = _node("n", region="eu", uptime_30d=0.9)
    placed = choose([node], Request(gpu_count=1, price_ceiling_micros=100)).placement
    assert placed is not None
    (after,) = take([node], placed)
    assert after.market == node.market and len(after.free_gpus) == 1


def test_pricing_keys_resolve_per_model() -> None:
    """The longest matching key wins, '*' prices the rest, a typo prices nothing (and is
    reported); the old single price is the '*' when pricing has none."""
    asks = market.resolve_pricing({"4090": 150, "RTX": 120, "*": 90}, [RTX, H100, "Other"])
    assert asks == {RTX: 150, H100: 90, "Other": 90}
    assert market.unmatched_price_keys({"A100": 1, "*": 2}, [RTX]) == ["A100"]
    config = AgentConfig.model_validate(
        {"node": {"price_micros_per_gpu_hour": 70, "location": {"country": "jp"}}}
    )
    offer = build_offer(config.node, [RTX])
    assert [(p.gpu_model, p.micros_per_gpu_hour) for p in offer.pricing] == [(RTX, 70)]
    assert offer.location.country == "JP"


def test_price_and_location_reload_live_nested_keys() -> None:
    """node.pricing and node.location.* apply on SIGHUP; merge_live handles the nested
    location keys; the coordinator connection still needs a restart."""
    old = AgentConfig()
    new = AgentConfig.model_validate(
        {
            "node": {"pricing": {"*": 5}, "location": {"country": "FR", "region": "eu"}},
            "coordinator": {"address": "elsewhere:1"},
        }
    )
    plan = plan_reload(old, new)
    assert set(plan.live) == {"node.pricing", "node.location.country", "node.location.region"}
    assert plan.restart == ("coordinator.address",)
    merged = merge_live(old, new, plan)
    assert merged.node.pricing == {"*": 5}
    assert merged.node.location.country == "FR"
    assert merged.coordinator.address == old.coordinator.address


def test_coordinator_takes_what_it_can_of_an_offer() -> None:
    """A price for a GPU the node lacks, a duplicate, a bad country: dropped with a
    reason; the rest is kept. No offer prices: the old label, then the default."""
    inventory = inventory_pb2.Inventory(gpus=[inventory_pb2.GpuInfo(uuid="g", name=RTX)])
    offer = market_pb2.NodeOffer(
        pricing=[
            market_pb2.GpuPrice(gpu_model=RTX, micros_per_gpu_hour=100),
            market_pb2.GpuPrice(gpu_model=RTX, micros_per_gpu_hour=1),
            market_pb2.GpuPrice(gpu_model=H100, micros_per_gpu_hour=5),
            market_pb2.GpuPrice(gpu_model=RTX, micros_per_gpu_hour=10**13),
        ],
        location=market_pb2.Location(region="eu west", country="XX", zone="z1"),
    )
    cleaned, problems = clean_offer(offer, inventory)
    assert [(p.gpu_model, p.micros_per_gpu_hour) for p in cleaned.pricing] == [(RTX, 100)]
    assert cleaned.location == market_pb2.Location(zone="z1")
    assert len(problems) == 5, problems
    assert node_asks(cleaned, {market.LEGACY_PRICE_LABEL: "7"}, 3).for_model(RTX) == 100
    assert node_asks(market_pb2.NodeOffer(), {market.LEGACY_PRICE_LABEL: "7"}, 3).source == "label"
    assert node_asks(market_pb2.NodeOffer(), {market.LEGACY_PRICE_LABEL: "x"}, 3).default == 3


def _entry(node_id: str, model: str, ask: int, **kw: object) -> NodeEntry:
    fields: dict[str, object] = {
        "uptime_30d": 1.0,
        "attested": False,
        "location": market_pb2.Location(region="eu", country="DE"),
        "measured_bps": 0,
        "measured_at_ns": 0,
        "declared_bps": 0,
        "scratch_free_bytes": 0,
    }
    fields.update(kw)
    return NodeEntry(
        node_id=node_id,
        gpus=[GpuEntry(model, 24 * GIB, True), GpuEntry(model, 24 * GIB, False)],
        asks={model: ask},
        **fields,  # type: ignore[arg-type]
    )


def test_offer_groups_have_the_medians_and_shares() -> None:
    """Per model: free/total over the nodes, min/median/max ask, attested share, median
    uptime, regions; sorted by median price, or by uptime when asked."""
    nodes = [
        _entry("a", RTX, 100, attested=True, uptime_30d=0.9),
        _entry("b", RTX, 300, uptime_30d=0.8, location=market_pb2.Location(region="us")),
        _entry("c", RTX, 200, attested=True, uptime_30d=1.0, measured_bps=10**9),
        _entry("d", H100, 50, uptime_30d=0.5),
    ]
    groups = build_offers(nodes, market_pb2.OffersRequest(nodes=True))
    assert [g.gpu_model for g in groups] == [H100, RTX]
    rtx = groups[1]
    assert (rtx.free_gpus, rtx.total_gpus, rtx.nodes) == (3, 6, 3)
    assert (rtx.price_min_micros, rtx.price_median_micros, rtx.price_max_micros) == (100, 200, 300)
    assert rtx.attested_ratio == pytest.approx(2 / 3)
    assert rtx.uptime_30d_ratio == pytest.approx(0.9)
    assert list(rtx.regions) == ["eu", "us"]
    assert rtx.measured_bits_per_second == 10**9
    assert [n.node_id for n in rtx.node_offers] == ["a", "c", "b"]
    by_uptime = build_offers(nodes, market_pb2.OffersRequest(sort="uptime"))
    assert [g.gpu_model for g in by_uptime] == [RTX, H100]
    assert not by_uptime[0].node_offers


def test_agent_config_check_names_the_bad_market_keys(tmp_path: Path) -> None:
    """`gpu-agent config check` fails a malformed pricing or location block with the key
    path of each problem."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        "node:\n  pricing: {H100: -5, A100: 1.5}\n  location: {country: XX, zone: 'a b'}\n",
        encoding="utf-8",
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["config", "check", str(path)])
    text = err.getvalue()
    assert code == 2, text
    for key in (
        "node.pricing.H100",
        "node.pricing.A100",
        "node.location.country",
        "node.location.zone",
    ):
        assert f"{path}: {key}" in text, text  # fmt: skip


@pytest.mark.asyncio
async def test_price_history_keeps_30_days_and_exports_gauges(tmp_path: Path) -> None:
    """Samples and placements are stored per model; rows past 30 days are pruned; the
    metrics endpoint serves the median ask and median accepted price per model."""
    clock = FakeClock()
    db = Database(tmp_path / "s.db")
    await db.open()
    try:
        history = PriceHistory(db, clock)
        history.placed(RTX, 1_000_000)
        await history.sample({RTX: [1_000_000, 2_000_000, 3_000_000]})
        clock.advance(RETENTION + 3600)
        history.placed(RTX, 2_500_000)
        prices = await history.sample({RTX: [4_000_000]})
        assert prices[RTX].ask_median_micros == 4_000_000
        assert prices[RTX].accepted_median_micros == 2_500_000  # the old one is past 24 h
        assert await history.prune() == 2  # the first ask sample and the first placement
        assert len(await history.history(RTX, "ask", 0)) == 1
        metrics = SchedulerMetrics()
        metrics.prices = lambda: history.current
        text = generate_latest(metrics.registry).decode()
        assert f'gpu_scheduler_price_ask_per_gpu_hour{{gpu_model="{RTX}"}} 4.0' in text
        assert f'gpu_scheduler_price_accepted_per_gpu_hour{{gpu_model="{RTX}"}} 2.5' in text
    finally:
        await db.close()
    await asyncio.sleep(0)
