"""``gpu-scheduler``: the reference coordinator and its buyer/operator commands.

Subcommand groups live in ``scheduler/cmd_*.py`` modules exposing
``register(subparsers)``. Exit codes: 0 success, 1 failure, 2 bad usage/config.
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

from .config import DEFAULT_CONFIG_PATH, SchedulerConfig, load_scheduler_config

COMMAND_MODULES = (
    "scheduler.cmd_serve",
    "scheduler.cmd_nodes",
    "scheduler.cmd_leases",
    "scheduler.cmd_config",
    "scheduler.cmd_ledger",
    "scheduler.cmd_acl",
    "scheduler.cmd_relay",
)

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments the user must fix; exit code 2."""


def config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return load_scheduler_config(config_path(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-scheduler",
        description="Reference coordinator: accepts agents over gRPC, places leases, "
        "verifies attestations, keeps the usage ledger.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-scheduler {__version__}")
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
