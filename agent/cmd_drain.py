"""``gpu-agent drain`` / ``undrain``: stop taking leases, over the local status API.

Drain is a state of the running daemon (heartbeats, metrics and ``status`` show
it), so it goes through the daemon's loopback-only endpoint, not a file.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from gpuagent.units import parse_duration

from . import control_token
from .cli import UsageError, load_config_from_args
from .cmd_status import base_url


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drain = sub.add_parser(
        "drain", help="take no new leases; optionally stop running ones after --deadline"
    )
    drain.add_argument(
        "--deadline",
        metavar="DURATION",
        help="stop leases still running after this long (e.g. 30m); default: let them finish",
    )
    _common(drain)
    drain.set_defaults(handler=_drain, enabled=True)
    undrain = sub.add_parser("undrain", help="take leases again after a drain")
    _common(undrain)
    undrain.set_defaults(handler=_drain, enabled=False, deadline=None)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", metavar="HOST:PORT", help="agent status endpoint (default: status.listen)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")


def post_action(args: argparse.Namespace, name: str, body: dict[str, Any]) -> dict[str, Any]:
    config = load_config_from_args(args)
    listen = args.address or config.status.listen
    url = base_url(listen)
    try:
        token = control_token.read(config.node.state_dir)
    except OSError as exc:
        raise RuntimeError(
            f"cannot read the agent's control token "
            f"({control_token.token_path(config.node.state_dir)}: {exc.strerror}); run this as "
            "root or as the agent's user, with the agent's config (-c)"
        ) from None
    try:
        response = httpx.post(
            f"{url}/{name}",
            json=body,
            timeout=args.timeout,
            headers={"Authorization": f"Bearer {token}"},
        )
    except httpx.HTTPError as exc:
        raise RuntimeError(
            f"no agent answers at {url} ({exc}); is `gpu-agent run` running?"
        ) from None
    if response.status_code != 200:
        raise RuntimeError(
            f"agent refused {name}: HTTP {response.status_code} {response.text.strip()}"
        )
    result: dict[str, Any] = response.json().get("result", {})
    return result


def _drain(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"enabled": args.enabled}
    if args.deadline is not None:
        try:
            body["deadline_unix"] = time.time() + parse_duration(args.deadline)
        except ValueError as exc:
            raise UsageError(f"--deadline: {exc}") from None
    try:
        result = post_action(args, "drain", body)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    if result.get("draining"):
        deadline = result.get("deadline_unix")
        when = (
            time.strftime(
                " until %Y-%m-%d %H:%M:%S, then running leases are stopped",
                time.localtime(deadline),
            )
            if deadline
            else "; running leases finish"
        )
        print(f"draining: no new leases{when}")  # noqa: T201
    else:
        print("drain lifted: taking leases again")  # noqa: T201
    return 0
