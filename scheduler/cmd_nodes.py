"""``gpu-scheduler nodes [list|show ID|attest ID]``: the node registry, from a running server.

Talks to the server's Nodes service over gRPC with a deadline. Address and TLS
default to the same config file ``serve`` reads (and its auto-generated CA), so
on the scheduler's host plain ``gpu-scheduler nodes`` just works.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from gpuagent import market
from gpuagent.units import parse_duration
from gpuagent.v1 import acl_pb2, acl_pb2_grpc, common_pb2, inventory_pb2, nodes_pb2, nodes_pb2_grpc

from .cli import UsageError
from .client import RpcFailed, connection_parent, invoke
from .ledger import format_micros
from .placement import isolation_text

_LIVENESS = {
    nodes_pb2.LIVENESS_ONLINE: "online",
    nodes_pb2.LIVENESS_SUSPECT: "suspect",
    nodes_pb2.LIVENESS_OFFLINE: "offline",
}
_HEALTH = {
    inventory_pb2.GpuHealth.HEALTHY: "healthy",
    inventory_pb2.GpuHealth.DEGRADED: "degraded",
    inventory_pb2.GpuHealth.UNHEALTHY: "unhealthy",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()
    nodes = sub.add_parser("nodes", parents=[conn], help="list nodes, or show one")
    nodes.set_defaults(handler=_list)
    nodes_sub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    lst = nodes_sub.add_parser("list", parents=[conn], help="every node (the default)")
    lst.set_defaults(handler=_list)
    show = nodes_sub.add_parser("show", parents=[conn], help="one node in detail")
    show.add_argument("node_id", metavar="ID", help="node id or a unique prefix")
    show.set_defaults(handler=_show)
    attest = nodes_sub.add_parser(
        "attest", parents=[conn], help="run a benchmark attestation on a node now"
    )
    attest.add_argument("node_id", metavar="ID", help="node id or a unique prefix")
    attest.add_argument(
        "--gpu", action="append", default=[], metavar="UUID", help="only this GPU (repeatable)"
    )
    attest.add_argument("--no-wait", action="store_true", help="return once the challenge is sent")
    attest.set_defaults(handler=_attest)
    drain = nodes_sub.add_parser(
        "drain", parents=[conn], help="no new leases on a node (--off lifts it)"
    )
    drain.add_argument("node_id", metavar="ID", help="node id or a unique prefix")
    drain.add_argument("--off", action="store_true", help="lift the drain")
    drain.add_argument("--reason", default="", help="shown to the provider in the agent's log")
    drain.add_argument(
        "--deadline",
        metavar="DURATION",
        help="stop leases still running after this long (e.g. 30m); default: let them finish",
    )
    drain.set_defaults(handler=_drain)
    enroll = nodes_sub.add_parser(
        "enroll",
        parents=[conn],
        help="print an enrolment token: a node presenting it joins bound to a provider account",
    )
    enroll.add_argument(
        "--account", default="", help="provider account (default: the caller's own; admin only)"
    )
    enroll.add_argument("--ttl", default="24h", metavar="DURATION", help="valid this long (24h)")
    enroll.add_argument("--description", default="", help="a note kept with the token")
    enroll.set_defaults(handler=_enroll)


def _call(args: argparse.Namespace, fn: str, request: Any) -> Any:
    try:
        return invoke(args, nodes_pb2_grpc.NodesStub, fn, request)
    except RpcFailed:
        return None


def format_size(size: int) -> str:
    """Approximate IEC size for people (23.5GiB), unlike units.format_size's exact form."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if value.is_integer() else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def _ago(unix_nanos: int, now: float) -> str:
    if not unix_nanos:
        return "never"
    seconds = max(0.0, now - unix_nanos / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


def _gpu_summary(node: nodes_pb2.Node) -> str:
    gpus = node.inventory.gpus
    if not gpus:
        return "0"
    names = sorted({g.name for g in gpus})
    return f"{len(gpus)}x {names[0]}" + (" (mixed)" if len(names) > 1 else "")


def price_text(node: nodes_pb2.Node) -> str:
    """The node's ask per GPU-hour in units: "1.5", "1.5-2.5" over several models;
    "(label)"/"(default)" when it is not from the node's offer."""
    asks = sorted({p.micros_per_gpu_hour for p in node.offer.pricing})
    if not asks:
        return "-"
    text = format_micros(asks[0]) + (f"-{format_micros(asks[-1])}" if len(asks) > 1 else "")
    return text if node.price_source in ("", "offer") else f"{text} ({node.price_source})"


def retained_lines(inventory: inventory_pb2.Inventory) -> list[str]:
    """Lease outputs the node keeps for buyers (PROTOCOL.md "Lease outputs")."""
    if not inventory.HasField("retained_outputs"):
        return []
    kept = inventory.retained_outputs
    return [f"outputs:     {kept.count} archive(s), {format_size(kept.bytes)} kept for buyers"]


def market_lines(node: nodes_pb2.Node) -> list[str]:
    """``nodes show``'s market section: asks, location, bandwidth declared and measured."""
    offer = node.offer
    loc = offer.location
    where = ", ".join(
        f"{k} {v}"
        for k, v in (("country", loc.country), ("region", loc.region), ("zone", loc.zone))
        if v
    )
    lines = [f"location:    {where or 'not given'}"]
    source = {"label": " (from the old price label)", "default": " (coordinator default)"}.get(
        node.price_source, ""
    )
    for price in offer.pricing:
        lines.append(
            f"ask:         {format_micros(price.micros_per_gpu_hour)}/GPU-hour for "
            f"{price.gpu_model}{source}"
        )
    bw = offer.bandwidth
    measured = "never measured"
    if bw.bits_per_second:
        measured = (
            f"measured {market.format_bps(bw.bits_per_second)} "
            f"({format_size(bw.bytes)} in {bw.elapsed_ns / 1e6:.0f} ms, "
            f"{_ago(bw.measured_at_unix_nanos, time.time())})"
        )
    if bw.error:
        measured += f"; the newest probe failed: {bw.error}"
    declared = node.declared_bits_per_second
    line = f"bandwidth:   {measured}"
    if declared:
        line += f"; declared {market.format_bps(declared)}"
        if declared > bw.bits_per_second:
            line += " (above the measured figure: placement uses the measured one)"
    lines.append(line)
    return lines


def _list(args: argparse.Namespace) -> int:
    response = _call(args, "List", nodes_pb2.ListNodesRequest())
    if response is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps([MessageToDict(n) for n in response.nodes], indent=2))  # noqa: T201
        return 0
    now = time.time()
    rows = [
        (
            "NODE",
            "NAME",
            "STATE",
            "GPUS",
            "FREE",
            "PRICE",
            "REGION",
            "ATTESTED",
            "UP 1H",
            "UP 24H",
            "UP 30D",
            "LAST SEEN",
        )
    ]
    for n in response.nodes:
        rows.append(
            (
                n.node_id,
                n.name,
                _LIVENESS.get(n.liveness, "unknown") + ("" if n.connected else " (disc.)"),
                _gpu_summary(n),
                str(len(n.free_gpu_uuids)),
                price_text(n),
                n.offer.location.region or "-",
                "yes" if n.attested else "no",
                _pct(n.uptime.ratio_1h),
                _pct(n.uptime.ratio_24h),
                _pct(n.uptime.ratio_30d),
                _ago(n.last_heartbeat_unix_nanos, now),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())  # noqa: T201
    if not response.nodes:
        print("(no nodes registered yet)")  # noqa: T201
    return 0


def _show(args: argparse.Namespace) -> int:
    node = _call(args, "Get", nodes_pb2.GetNodeRequest(node_id=args.node_id))
    if node is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(node), indent=2))  # noqa: T201
        return 0
    now = time.time()
    host = node.inventory.host
    health = {h.uuid: h for h in node.gpu_health}
    free = set(node.free_gpu_uuids)
    lines = [
        f"node:        {node.node_id}",
        f"name:        {node.name}",
        f"state:       {_LIVENESS.get(node.liveness, 'unknown')}"
        + (
            (f" (connected from {node.peer})" if node.peer else " (connected)")
            if node.connected
            else " (not connected)"
        ),
        f"last seen:   {_ago(node.last_heartbeat_unix_nanos, now)}",
        f"uptime:      1h {_pct(node.uptime.ratio_1h)}  24h {_pct(node.uptime.ratio_24h)}"
        f"  30d {_pct(node.uptime.ratio_30d)}",
        f"agent:       {node.agent_version} (protocol {node.protocol_version})",
        f"draining:    {'yes' if node.draining else 'no'}",
        f"owner:       {node.owner or '-'} (registration: {node.registration or 'open'})",
        f"isolation:   {isolation_text(node.inventory.isolation)}"
        + (
            f" (egress policy {'on' if node.inventory.isolation.egress_policy else 'off'}, "
            f"scratch {node.inventory.isolation.scratch_mode})"
            if node.inventory.isolation.scratch_mode
            else ""
        ),
        (
            f"host:        {host.hostname}, {host.os}, kernel {host.kernel}"
            if not node.market_view
            else f"host:        {host.os} (market view: the provider's host detail is withheld)"
        ),
        f"cpu:         {host.cpu_model} ({host.cpu_cores} cores, {host.cpu_threads} threads)",
        f"memory:      {format_size(host.memory_bytes)}",
        *retained_lines(node.inventory),
        *market_lines(node),
        "gpus:",
    ]
    for g in node.inventory.gpus:
        h = health.get(g.uuid)
        state = _HEALTH.get(h.state, "unknown") if h else "unknown"
        if h and h.cordoned:
            state += ", cordoned"
        lines.append(
            f"  [{g.index}] {g.uuid}  {g.name}  {format_size(g.memory_total_bytes)}  "
            f"{state}  {'free' if g.uuid in free else 'allocated'}"
            + ("  (simulated)" if g.simulated else "")
        )
    for lease in node.leases:
        state_text = common_pb2.LeaseState.Name(lease.state).removeprefix("LEASE_STATE_").lower()
        lines.append(f"lease:       {lease.lease_id} state={state_text}")
    for flag in node.verify_flags:
        # Redundant runs this node lost a vote in (docs/verification.md).
        lines.append(
            f"flagged:     {flag.lease_id} (verified lease {flag.parent_lease_id}) at "
            f"{_ago(flag.flagged_at_unix_nanos, now)}: output disagreed with the majority; "
            f"slashed {format_micros(flag.slashed_micros)}"
        )
    for report in node.output_mismatches:
        # A buyer's claim (one per lease and buyer), not a verdict: shown, never slashed.
        lines.append(
            f"mismatch:    {report.lease_id} reported by buyer {report.reporter} "
            f"{_ago(report.reported_at_unix_nanos, now)}: {report.detail[:200]}"
        )
    lines.append(f"attested:    {'yes' if node.attested else 'no'}")
    index = {g.uuid: g.index for g in node.inventory.gpus}
    for a in node.attestations:
        lines.append(f"  [{index.get(a.gpu_uuid, '?')}] " + format_attestation(a, now))
    print("\n".join(lines))  # noqa: T201
    return 0


def format_attestation(a: nodes_pb2.GpuAttestation, now: float) -> str:
    """One verdict on one line: outcome, SKU, figures, age and expiry."""
    when = _ago(a.attested_at_unix_nanos, now)
    if a.passed:
        left = a.expires_at_unix_nanos / 1e9 - now
        state = f"passed  expires in {left / 3600:.1f}h" if left > 0 else "EXPIRED"
    else:
        state = f"FAILED {a.reason}: {a.message}"
    figures = f"{a.measured_tflops:.3g} TFLOPS in {a.elapsed_ns / 1e9:.2f}s" if a.elapsed_ns else ""
    parts = [a.gpu_uuid, a.sku or "(no sku)", state, figures, when, a.challenge_id]
    return "  ".join(p for p in parts if p)


def _drain(args: argparse.Namespace) -> int:
    deadline_ns = 0
    if args.deadline is not None and not args.off:
        try:
            deadline_ns = time.time_ns() + round(parse_duration(args.deadline) * 1e9)
        except ValueError as exc:
            raise UsageError(f"--deadline: {exc}") from None
    request = nodes_pb2.DrainNodeRequest(
        node_id=args.node_id,
        enabled=not args.off,
        reason=args.reason,
        deadline_unix_nanos=deadline_ns,
    )
    node = _call(args, "Drain", request)
    if node is None:
        return 1
    if not node.connected:
        print(f"{node.node_id}: drain recorded; the node is offline and gets it on reconnect")  # noqa: T201
    elif node.draining:
        print(f"{node.node_id}: draining (no new leases)")  # noqa: T201
    else:
        print(f"{node.node_id}: drain lifted")  # noqa: T201
    return 0


def _attest(args: argparse.Namespace) -> int:
    wait = not args.no_wait
    if wait and not hasattr(args, "timeout"):
        args.timeout = 300.0  # a challenge takes seconds per GPU, a simulated one longer
    request = nodes_pb2.AttestNodeRequest(node_id=args.node_id, gpu_uuids=args.gpu, wait=wait)
    response = _call(args, "Attest", request)
    if response is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(response), indent=2))  # noqa: T201
        return 0
    now = time.time()
    print(f"challenge:   {response.challenge_id or '(none: no GPU could be challenged)'}")  # noqa: T201
    for a in response.results:
        print("  " + format_attestation(a, now))  # noqa: T201
    return 0 if all(a.passed for a in response.results) else 1


def _enroll(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if ttl <= 0 or ttl > 10 * 365 * 86400:
        raise UsageError("--ttl: must be more than 0 and at most ten years")
    request = acl_pb2.CreateEnrollmentTokenRequest(
        account=args.account, ttl_seconds=round(ttl), description=args.description
    )
    try:
        made = invoke(args, acl_pb2_grpc.AclStub, "CreateEnrollmentToken", request)
    except RpcFailed:
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"token": made.secret, **MessageToDict(made.token)}, indent=2))  # noqa: T201
        return 0
    print(made.secret)  # noqa: T201
    expires = time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(made.token.expires_at_unix_nanos / 1e9)
    )
    print(  # noqa: T201
        f"# enrolment token {made.token.token_id} for provider account {made.token.account!r}, "
        f"valid until {expires}. Put it in the agent config as coordinator.enrollment_token "
        "(or a file named by coordinator.enrollment_token_file); shown only once.",
        file=sys.stderr,
    )
    return 0
