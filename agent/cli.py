"""``gpu-agent``: the provider daemon and its operator commands.

Each group of subcommands lives in its own ``agent/cmd_*.py`` module exposing
``register(subparsers)``; this module only wires them up and maps errors to
exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import sys

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

PROGRAM = skeleton.Program[AgentConfig](
    prog="gpu-agent",
    description="Provider-side GPU agent: detects and attests GPUs, runs leased "
    "containers from a coordinator, meters their usage.",
    default_config=DEFAULT_CONFIG_PATH,
    load=load_agent_config,
    command_modules=COMMAND_MODULES,
)

# The names the command modules use.
config_path = PROGRAM.config_path
load_config_from_args = PROGRAM.load_config
build_parser = PROGRAM.build_parser
main = PROGRAM.main


if __name__ == "__main__":
    sys.exit(main())
