"""``gpu-agent firewall show|install|remove``: the egress policy's iptables rules.

The daemon installs and keeps the rules itself; these are for the provider: see
what is in place, put it back by hand, and take it out on uninstall (the rules stay
while the agent is stopped on purpose: lease containers keep running then).
"""

from __future__ import annotations

import argparse
import sys

from .cli import load_config_from_args
from .isolation.firewall import Firewall, FirewallError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    firewall = sub.add_parser("firewall", help="the egress policy's iptables rules")
    actions = firewall.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("show", help="say whether the rules are in place").set_defaults(
        handler=_show
    )
    actions.add_parser(
        "install", help="install or repair the rules now (the daemon does this itself)"
    ).set_defaults(handler=_install)
    actions.add_parser(
        "remove", help="remove the agent's chains and jumps (on uninstall)"
    ).set_defaults(handler=_remove)


def _firewall(args: argparse.Namespace) -> Firewall:
    return Firewall(load_config_from_args(args).isolation)


def _show(args: argparse.Namespace) -> int:
    firewall = _firewall(args)
    try:
        problems = firewall.status()
    except FirewallError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    state = "on" if firewall.enabled else "off"
    for problem in problems:
        print(f"problem: {problem}")  # noqa: T201
    if problems:
        print("fix: gpu-agent firewall install (the running agent also restores them)")  # noqa: T201
        return 1
    print(  # noqa: T201
        f"egress policy {state}: chains {firewall.fwd_chain}, {firewall.in_chain} "
        f"{'in place' if firewall.enabled else 'absent'} for interfaces {firewall.interfaces}"
    )
    return 0


def _install(args: argparse.Namespace) -> int:
    firewall = _firewall(args)
    try:
        changed = firewall.ensure()
    except FirewallError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print("rules installed" if changed else "rules already in place")  # noqa: T201
    return 0


def _remove(args: argparse.Namespace) -> int:
    try:
        removed = _firewall(args).uninstall()
    except FirewallError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print("rules removed" if removed else "no rules of the agent's were present")  # noqa: T201
    return 0
