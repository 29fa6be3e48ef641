# ruff: noqa: T201 - a CLI module: printing is its output
"""``gpu-scheduler offers``: the market view (docs/leases-buyer.md).

GPUs on offer grouped by model and memory: free/total, price min/median/max per
GPU-hour, nodes, attested share, 30-day uptime, regions and measured bandwidth.
``--nodes`` expands each group into its nodes (no hostnames, serials or
addresses: the market view any buyer may see); ``--watch`` redraws in place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from gpuagent import leaserules, market
from gpuagent.units import parse_duration, parse_size
from gpuagent.v1 import market_pb2, market_pb2_grpc

from .cli import UsageError
from .client import RpcFailed, connection_parent, invoke
from .cmd_nodes import format_size
from .ledger import format_micros


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()
    offers = sub.add_parser(
        "offers", parents=[conn], help="the market: GPUs on offer by model, with prices"
    )
    offers.add_argument("--gpu", default="", help="GPU model, a substring of its name (4090)")
    offers.add_argument("--region", default="", help="only nodes in this region (exact)")
    offers.add_argument(
        "--country",
        action="append",
        default=[],
        metavar="CC",
        help="only nodes in these countries, ISO 3166-1 alpha-2 (repeatable or DE,FR)",
    )
    offers.add_argument(
        "--min-uptime", default="", help="minimum uptime over 30 days: 0.99 or 99%%"
    )
    offers.add_argument("--max-price", type=float, help="most per GPU-hour, in units (2.5)")
    offers.add_argument("--min-memory", default="", help="minimum memory per GPU (24GiB)")
    offers.add_argument("--sort", choices=("price", "uptime"), default="price")
    offers.add_argument("--nodes", action="store_true", help="each group's nodes too")
    offers.add_argument(
        "--watch",
        nargs="?",
        const="2s",
        default=None,
        metavar="INTERVAL",
        help="redraw every INTERVAL (default 2s) until interrupted",
    )
    offers.set_defaults(handler=_offers)


def parse_ratio(text: str, where: str) -> float:
    """0.99 or 99% -> 0.99; MarketError naming ``where`` otherwise."""
    value = text.strip()
    try:
        ratio = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise market.MarketError(f"{where}: {text[:20]!r} is not a ratio (0.99 or 99%)") from None
    return market.check_ratio(ratio, where)


def request_from(args: argparse.Namespace) -> market_pb2.OffersRequest:
    countries = [c for item in args.country for c in item.split(",") if c]
    try:
        request = market_pb2.OffersRequest(
            gpu_model=args.gpu,
            region=market.check_name(args.region, "--region"),
            countries=market.check_countries(countries, "--country"),
            min_uptime_ratio=parse_ratio(args.min_uptime, "--min-uptime")
            if args.min_uptime
            else 0.0,
            sort=args.sort,
            nodes=args.nodes,
        )
    except market.MarketError as exc:
        raise UsageError(str(exc)) from None
    if args.max_price is not None:
        if not 0 <= args.max_price <= leaserules.MAX_PRICE_MICROS / 1e6:
            raise UsageError(f"--max-price: must be 0..{leaserules.MAX_PRICE_MICROS // 10**6}")
        request.max_price_micros = round(args.max_price * 1e6)
    if args.min_memory:
        try:
            request.min_memory_bytes = parse_size(args.min_memory)
        except ValueError as exc:
            raise UsageError(f"--min-memory: {exc}") from None
    return request


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


def _bandwidth(measured: int, declared: int) -> str:
    """Measured first; a declared NIC speed is shown beside it, never instead of it."""
    text = market.format_bps(measured) if measured else "not measured"
    if declared and declared > measured:
        text += f" (declared {market.format_bps(declared)})"
    return text


def render(response: market_pb2.OffersResponse, with_nodes: bool) -> list[str]:
    rows = [
        (
            "GPU",
            "MEMORY",
            "FREE/TOTAL",
            "PRICE/GPU-H MIN",
            "MEDIAN",
            "MAX",
            "NODES",
            "ATTESTED",
            "UP 30D",
            "REGIONS",
            "BANDWIDTH",
        )
    ]
    for g in response.groups:
        rows.append(
            (
                g.gpu_model,
                format_size(g.memory_bytes),
                f"{g.free_gpus}/{g.total_gpus}",
                format_micros(g.price_min_micros),
                format_micros(g.price_median_micros),
                format_micros(g.price_max_micros),
                str(g.nodes),
                _pct(g.attested_ratio),
                _pct(g.uptime_30d_ratio),
                ",".join(g.regions) or "-",
                market.format_bps(g.measured_bits_per_second)
                if g.measured_bits_per_second
                else "not measured",
            )
        )
    lines = _table(rows)
    if not response.groups:
        lines.append("(nothing on offer matches)")
    if with_nodes:
        for g in response.groups:
            lines.append("")
            lines.append(f"{g.gpu_model} ({format_size(g.memory_bytes)}):")
            node_rows = [
                ("  NODE", "FREE/TOTAL", "ASK/GPU-H", "UP 30D", "ATTESTED", "LOCATION", "BANDWIDTH")
            ]
            for n in g.node_offers:
                loc = n.location
                where = "/".join(x for x in (loc.country, loc.region, loc.zone) if x) or "-"
                node_rows.append(
                    (
                        f"  {n.node_id}",
                        f"{n.free_gpus}/{n.total_gpus}",
                        format_micros(n.ask_micros),
                        _pct(n.uptime_30d_ratio),
                        "yes" if n.attested else "no",
                        where,
                        _bandwidth(n.measured_bits_per_second, n.declared_bits_per_second),
                    )
                )
            lines.extend(_table(node_rows))
    return lines


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _offers(args: argparse.Namespace) -> int:
    request = request_from(args)
    interval = parse_duration(args.watch) if args.watch is not None else None
    if interval is not None and interval <= 0:
        raise UsageError("--watch: the interval must be positive")
    while True:
        try:
            response = invoke(args, market_pb2_grpc.MarketStub, "Offers", request)
        except RpcFailed:
            return 1
        if getattr(args, "json", False):
            print(json.dumps(MessageToDict(response), indent=2))
        else:
            lines = render(response, args.nodes)
            if interval is not None and sys.stdout.isatty():
                # Redraw in place: home the cursor, clear the screen below.
                sys.stdout.write("\x1b[H\x1b[J")
            if interval is not None:
                stamp = time.strftime("%H:%M:%S", time.localtime())
                lines.insert(0, f"offers at {stamp} (every {args.watch}; Ctrl-C stops)")
            print("\n".join(lines))
        sys.stdout.flush()
        if interval is None:
            return 0
        time.sleep(interval)
