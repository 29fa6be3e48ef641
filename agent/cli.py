"""``gpu-agent``: the provider daemon and its operator commands.

Each group of subcommands lives in its own ``agent/cmd_*.py`` module exposing
``register(subparsers)``; this module only wires them up and maps errors to
exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gpuagent import cli as skeleton
from gpuagent.cli import Handler as Handler  # re-exported for the command modules
from gpuagent.cli import UsageError as UsageError

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

PROGRAM = skeleton.Program(
    prog="gpu-agent",
    description="Provider-side GPU agent: detects and attests GPUs, runs leased "
    "containers from a coordinator, meters their usage.",
    default_config=DEFAULT_CONFIG_PATH,
    command_modules=COMMAND_MODULES,
)


def config_path(args: argparse.Namespace) -> Path | None:
    """The --config file; the default path only if it exists, else built-in defaults."""
    return skeleton.config_path(args, DEFAULT_CONFIG_PATH)


def load_config_from_args(args: argparse.Namespace) -> AgentConfig:
    return load_agent_config(config_path(args))


def build_parser() -> argparse.ArgumentParser:
    return skeleton.build_parser(PROGRAM)


def main(argv: Sequence[str] | None = None) -> int:
    return skeleton.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
