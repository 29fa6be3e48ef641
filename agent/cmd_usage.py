"""``gpu-agent usage [--lease ID]``: metered usage from the local outbox.

Totals per lease count every record ever written (acked records are pruned
from the outbox, their sums are kept), split into what the coordinator has
acknowledged and what is still pending. Works while the daemon runs (SQLite
WAL lets readers in) and when it is stopped.
"""

# ruff: noqa: T201 - a CLI command: printing is its output

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from gpuagent.usage import Unmeasured

from .cli import load_config_from_args
from .usage.outbox import OUTBOX_FILE_NAME, LeaseTotals, Outbox, OutboxError, OutboxStats


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = sub.add_parser(
        "usage", help="metered usage per lease, and what the coordinator has acknowledged"
    )
    usage.add_argument("--lease", metavar="ID", help="only this lease")
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    usage.set_defaults(handler=_usage)


def _usage(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    path = config.node.state_dir / OUTBOX_FILE_NAME
    if not path.exists():
        print(
            f"error: no usage outbox at {path}: the agent has not run with this state_dir",
            file=sys.stderr,
        )
        return 1
    try:
        outbox = Outbox(path, alert_records=config.metering.outbox_alert_records)
    except OutboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with outbox:
        stats = outbox.stats()
        totals = outbox.totals(args.lease)
    if args.lease is not None and not totals:
        print(f"error: no usage recorded for lease {args.lease!r} in {path}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_as_json(stats, totals), indent=2))
    else:
        _print_table(str(path), stats, totals, config.metering.outbox_alert_records)
    return 0


def _as_json(stats: OutboxStats, totals: list[LeaseTotals]) -> dict[str, object]:
    return {
        "outbox": asdict(stats) | {"oldest_pending_age_seconds": stats.oldest_pending_age_s()},
        "leases": [asdict(t) | {"acked": t.acked} for t in totals],
    }


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"  # unreachable: the loop returns at TiB


def _network_bytes(size: int, unmeasured: int) -> str:
    """Bytes, "unknown" when no interval could read them, "?"-marked when some could not."""
    if not unmeasured & Unmeasured.NETWORK:
        return _human_bytes(size)
    return "unknown" if size == 0 else f">={_human_bytes(size)}?"


def _print_table(path: str, stats: OutboxStats, totals: list[LeaseTotals], bound: int) -> None:
    age = stats.oldest_pending_age_s()
    oldest = f", oldest {age:.0f}s old" if age is not None else ""
    print(f"outbox:  {path}")
    print(
        f"records: last seq {stats.last_seq}, acked through {stats.acked_seq}, "
        f"pending {stats.pending}{oldest}"
    )
    alert = "YES: the coordinator is not acknowledging" if stats.backlog_alert else "no"
    print(f"backlog alert: {alert} (bound {bound} pending records; none is ever dropped)")
    if not totals:
        print("no usage recorded yet")
        return
    header = (
        "LEASE",
        "STATE",
        "RECORDS",
        "ACKED",
        "PENDING",
        "HOURS",
        "GPU-HOURS",
        "CPU-SECONDS",
        "ENERGY-KWH",
        "NET-RX",
        "NET-TX",
        "PEAK-MEM",
    )
    rows = [header]
    for t in totals:
        energy = f"{t.energy_mj / 3.6e9:.3f}" + ("~" if t.energy_estimated else "")
        rows.append(
            (
                t.lease_id,
                "ended" if t.final else "running",
                str(t.records),
                str(t.acked),
                str(t.pending),
                f"{t.duration_ns / 3.6e12:.3f}",
                f"{t.gpu_ns / 3.6e12:.3f}",
                f"{t.cpu_usec / 1e6:.1f}",
                energy,
                _network_bytes(t.net_rx_bytes, t.unmeasured),
                _network_bytes(t.net_tx_bytes, t.unmeasured),
                _human_bytes(t.peak_memory_bytes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if any(t.unmeasured & Unmeasured.NETWORK for t in totals):
        print("? network counters unreadable for some intervals (bytes are a lower bound)")
    if any(t.energy_estimated for t in totals):
        print("~ energy partly estimated from power draw (no NVML energy counter)")
