"""``gpu-scheduler usage|balance|deposit|stake``: the ledger, from a running server.

Amounts are typed in units of the settlement currency (``12.5``) and become
integer micro-units (12_500_000) before they leave this process; output shows
both. Connection options are the same as ``gpu-scheduler nodes``.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf.json_format import MessageToDict

from gpuagent.usage import Unmeasured
from gpuagent.v1 import ledger_pb2, ledger_pb2_grpc

from .cli import UsageError
from .client import RpcFailed, connection_parent, invoke
from .ledger import MICROS_PER_UNIT, format_micros

_MAX_MICROS = 2**63 - 1


def parse_amount(text: str) -> int:
    """ "12.5" -> 12_500_000 micros; exact, at most 6 decimals, not negative."""
    try:
        value = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        raise UsageError(f"amount {text!r} is not a number (e.g. 12.5)") from None
    if not value.is_finite() or value < 0:
        raise UsageError(f"amount {text!r} must be a finite number >= 0")
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise UsageError(f"amount {text!r} has more than 6 decimals (1 micro = 0.000001)")
    if micros > _MAX_MICROS:
        raise UsageError(f"amount {text!r} is too large")
    return int(micros)


def money(micros: int) -> str:
    return f"{format_micros(micros)} ({micros} micros)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()

    usage = sub.add_parser("usage", parents=[conn], help="metered usage and cost per lease")
    usage.add_argument("--lease", default="", metavar="ID", help="one lease")
    usage.add_argument("--node", default="", metavar="ID", help="leases on one node (id or prefix)")
    usage.add_argument("--limit", type=int, default=100, help="most leases shown (default 100)")
    usage.set_defaults(handler=_usage)

    balance = sub.add_parser("balance", parents=[conn], help="buyer balances and escrow")
    balance.add_argument("buyer", nargs="?", default="", metavar="BUYER", help="one buyer")
    balance.set_defaults(handler=_balance)

    deposit = sub.add_parser("deposit", parents=[conn], help="credit a buyer's account")
    deposit.add_argument("buyer", metavar="BUYER")
    deposit.add_argument("amount", metavar="AMOUNT", help="units, e.g. 12.5")
    deposit.add_argument(
        "--key", default="", help="idempotency key: repeating it deposits once (default: random)"
    )
    deposit.set_defaults(handler=_deposit)

    stake = sub.add_parser("stake", parents=[conn], help="record a node's collateral")
    stake.add_argument("node_id", metavar="NODE", help="node id or unique prefix")
    stake.add_argument("amount", metavar="AMOUNT", help="units added to the stake, e.g. 100")
    stake.add_argument(
        "--uptime", type=float, default=None, help="uptime commitment 0..1, e.g. 0.99"
    )
    stake.set_defaults(handler=_stake)


def _call(args: argparse.Namespace, fn: str, request: Any) -> Any:
    try:
        return invoke(args, ledger_pb2_grpc.LedgerStub, fn, request)
    except RpcFailed:
        return None


def _print_json(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))  # noqa: T201


def _print_account(a: ledger_pb2.Account) -> None:
    print(f"{a.buyer}")  # noqa: T201
    print(f"  balance    {money(a.balance_micros)}")  # noqa: T201
    print(f"  escrow     {money(a.escrow_micros)}")  # noqa: T201
    print(f"  spent      {money(a.spent_micros)}")  # noqa: T201
    print(f"  deposited  {money(a.deposited_micros)}")  # noqa: T201


def _print_provider(p: ledger_pb2.Provider) -> None:
    print(f"node {p.node_id}")  # noqa: T201
    print(f"  earnings   {money(p.earnings_micros)}")  # noqa: T201
    print(f"  stake      {money(p.staked_micros)}, slashed {money(p.slashed_micros)}")  # noqa: T201
    commitment = f"{p.uptime_commitment_ratio:.2%}" if p.uptime_commitment_ratio else "none"
    print(  # noqa: T201
        f"  uptime commitment {commitment}; eligible for leases: {'yes' if p.eligible else 'no'}"
    )
    print(  # noqa: T201
        f"  records    {p.records} accepted, {p.rejected_records} rejected, "
        f"acked through seq {p.acked_usage_seq}"
    )


def network_text(u: ledger_pb2.LeaseUsage) -> str:
    """Network bytes as the records support them: an unread counter is unknown, not 0."""
    if not u.unmeasured & Unmeasured.NETWORK:
        return f"rx {u.net_rx_bytes} B, tx {u.net_tx_bytes} B"
    if u.net_rx_bytes == 0 and u.net_tx_bytes == 0:
        return "unknown (the node could not read the lease's counters)"
    return f"rx >= {u.net_rx_bytes} B, tx >= {u.net_tx_bytes} B (some intervals unmeasured)"


def _usage(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    request = ledger_pb2.UsageRequest(lease_id=args.lease, node_id=args.node, limit=args.limit)
    response = _call(args, "Usage", request)
    if response is None:
        return 1
    if getattr(args, "json", False):
        _print_json(response)
        return 0
    leases = [u for u in response.leases if u.records or u.rejected_records or u.reserved_micros]
    if args.lease and not leases:
        print(f"error: no usage or escrow recorded for lease {args.lease!r}", file=sys.stderr)  # noqa: T201
        return 1
    if not leases:
        print("no usage recorded")  # noqa: T201
    for u in leases:
        print(f"lease {u.lease_id}  buyer {u.buyer or '-'}  node {u.node_id or '-'}  {u.state}")  # noqa: T201
        print(  # noqa: T201
            f"  {u.records} records ({u.rejected_records} rejected), "
            f"{u.gpu_ns / 3.6e12:.6f} GPU-hours ({u.gpu_ns} GPU-ns), "
            f"{u.duration_ns / 1e9:.3f} s, energy {u.energy_millijoules / 1000:.3f} J, "
            f"cpu {u.cpu_usec / 1e6:.3f} s"
        )
        print(f"  network {network_text(u)}")  # noqa: T201
        print(  # noqa: T201
            f"  price {money(u.price_micros_per_gpu_hour)}/GPU-hour; cost {money(u.cost_micros)}"
        )
        print(  # noqa: T201
            f"  escrow {u.escrow_state}: reserved {money(u.reserved_micros)}, "
            f"released {money(u.released_micros)}"
            + (f", unbilled {money(u.unbilled_micros)}" if u.unbilled_micros else "")
            + ("; final record in" if u.final_seen else "")
        )
    for p in response.providers:
        _print_provider(p)
    return 0


def _balance(args: argparse.Namespace) -> int:
    response = _call(args, "Balance", ledger_pb2.BalanceRequest(buyer=args.buyer))
    if response is None:
        return 1
    if getattr(args, "json", False):
        _print_json(response)
        return 0
    if not response.accounts:
        print("no accounts")  # noqa: T201
    for account in response.accounts:
        _print_account(account)
    return 0


def _deposit(args: argparse.Namespace) -> int:
    micros = parse_amount(args.amount)
    if micros == 0:
        raise UsageError("amount must be greater than 0")
    request = ledger_pb2.DepositRequest(
        buyer=args.buyer, amount_micros=micros, idempotency_key=args.key or uuid.uuid4().hex
    )
    account = _call(args, "Deposit", request)
    if account is None:
        return 1
    if getattr(args, "json", False):
        _print_json(account)
        return 0
    print(f"deposited {money(micros)}")  # noqa: T201
    _print_account(account)
    return 0


def _stake(args: argparse.Namespace) -> int:
    micros = parse_amount(args.amount)
    if args.uptime is not None and not 0.0 < args.uptime <= 1.0:
        raise UsageError(f"--uptime {args.uptime} must be within (0, 1], e.g. 0.99")
    request = ledger_pb2.StakeRequest(
        node_id=args.node_id, amount_micros=micros, uptime_commitment_ratio=args.uptime or 0.0
    )
    response = _call(args, "Stake", request)
    if response is None:
        return 1
    if getattr(args, "json", False):
        _print_json(response)
        return 0
    print(f"staked {money(micros)}")  # noqa: T201
    _print_provider(response)
    return 0
