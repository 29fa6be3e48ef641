"""``gpu-agent run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio

from gpuagent.logsetup import setup_logging

from .cli import load_config_from_args
from .config import AgentConfig
from .daemon import Agent


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the agent daemon in the foreground")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    setup_logging(config.log.level, config.log.format)
    return asyncio.run(_main(config))


async def _main(config: AgentConfig) -> int:
    agent = Agent(config)
    agent.install_signal_handlers()
    await agent.run()
    return 0
