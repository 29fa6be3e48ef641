"""``gpu-scheduler``: the reference coordinator and its buyer/operator commands.

Subcommand groups live in ``scheduler/cmd_*.py`` modules exposing
``register(subparsers)``. Exit codes: 0 success, 1 failure, 2 bad usage/config.
"""

from __future__ import annotations

import sys

from gpuagent import cli as skeleton
from gpuagent.cli import Handler as Handler  # re-exported for the command modules
from gpuagent.cli import UsageError as UsageError

from .config import DEFAULT_CONFIG_PATH, SchedulerConfig, load_scheduler_config

COMMAND_MODULES = (
    "scheduler.cmd_serve",
    "scheduler.cmd_nodes",
    "scheduler.cmd_leases",
    "scheduler.cmd_output",
    "scheduler.cmd_market",
    "scheduler.cmd_config",
    "scheduler.cmd_ledger",
    "scheduler.cmd_acl",
    "scheduler.cmd_relay",
)

PROGRAM = skeleton.Program[SchedulerConfig](
    prog="gpu-scheduler",
    description="Reference coordinator: accepts agents over gRPC, places leases, "
    "verifies attestations, keeps the usage ledger.",
    default_config=DEFAULT_CONFIG_PATH,
    load=load_scheduler_config,
    command_modules=COMMAND_MODULES,
)

# The names the command modules use.
config_path = PROGRAM.config_path
load_config_from_args = PROGRAM.load_config
build_parser = PROGRAM.build_parser
main = PROGRAM.main


if __name__ == "__main__":
    sys.exit(main())
