"""``gpu-scheduler``: the reference coordinator and its buyer/operator commands.

Subcommand groups live in ``scheduler/cmd_*.py`` modules exposing
``register(subparsers)``. Exit codes: 0 success, 1 failure, 2 bad usage/config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gpuagent import cli as skeleton
from gpuagent.cli import Handler as Handler  # re-exported for the command modules
from gpuagent.cli import UsageError as UsageError

from .config import DEFAULT_CONFIG_PATH, SchedulerConfig, load_scheduler_config

COMMAND_MODULES = (
    "scheduler.cmd_serve",
    "scheduler.cmd_nodes",
    "scheduler.cmd_leases",
    "scheduler.cmd_config",
    "scheduler.cmd_ledger",
    "scheduler.cmd_acl",
)

PROGRAM = skeleton.Program(
    prog="gpu-scheduler",
    description="Reference coordinator: accepts agents over gRPC, places leases, "
    "verifies attestations, keeps the usage ledger.",
    default_config=DEFAULT_CONFIG_PATH,
    command_modules=COMMAND_MODULES,
)


def config_path(args: argparse.Namespace) -> Path | None:
    return skeleton.config_path(args, DEFAULT_CONFIG_PATH)


def load_config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return load_scheduler_config(config_path(args))


def build_parser() -> argparse.ArgumentParser:
    return skeleton.build_parser(PROGRAM)


def main(argv: Sequence[str] | None = None) -> int:
    return skeleton.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
