"""``gpu-agent``: the provider daemon and its operator commands.

Each group of subcommands lives in its own ``agent/cmd_*.py`` module exposing
``register(subparsers)``; this module only wires them up and maps errors to
exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gpuagent import __version__
from gpuagent.configload import ConfigError

from .config import DEFAULT_CONFIG_PATH, AgentConfig, load_agent_config

# Modules contributing subcommands, in --help order.
COMMAND_MODULES = (
    "agent.cmd_run",
    "agent.cmd_config",
    "agent.cmd_leases",
    "agent.cmd_status",
    "agent.cmd_drain",
    "agent.cmd_hardware",
    "agent.cmd_attest",
    "agent.cmd_usage",
    "agent.cmd_firewall",
    "agent.cmd_scratch",
)

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments or environment the user must fix; exit code 2."""


def config_path(args: argparse.Namespace) -> Path | None:
    """The --config file; the default path only if it exists, else built-in defaults."""
    if args.config is not None:
        return Path(args.config)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config_from_args(args: argparse.Namespace) -> AgentConfig:
    return load_agent_config(config_path(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-agent",
        description="Provider-side GPU agent: detects and attests GPUs, runs leased "
        "containers from a coordinator, meters their usage.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-agent {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"config file (default: {DEFAULT_CONFIG_PATH} if it exists, else built-in defaults)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {exc.source}: {problem}", file=sys.stderr)  # noqa: T201
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115, PTH123 - must outlive this frame
        return 0


if __name__ == "__main__":
    sys.exit(main())
