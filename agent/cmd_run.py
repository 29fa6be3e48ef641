"""``gpu-agent run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import prometheus_client

from gpuagent.logsetup import setup_logging

from .cli import config_path, load_config_from_args
from .config import AgentConfig
from .gpu import NvmlUnavailable
from .identity import IdentityError
from .leases.statedb import StateDBError
from .metrics.server import ListenError
from .node import AgentNode, PreflightFailed
from .usage.outbox import OutboxError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the agent daemon in the foreground")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    setup_logging(config.log.level, config.log.format)
    # `_created` series double every counter's cardinality and no dashboard uses them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        return asyncio.run(_main(config, config_path(args)))
    except PreflightFailed as exc:
        for result in exc.results:
            print(f"error: preflight: {result.name}: {result.message}", file=sys.stderr)  # noqa: T201
            if result.fix:
                print(f"  fix: {result.fix}", file=sys.stderr)  # noqa: T201
        return 2
    except NvmlUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except (IdentityError, StateDBError, OutboxError, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2


async def _main(config: AgentConfig, path: Path | None) -> int:
    node = AgentNode(config, config_path=path)
    try:
        agent = await node.start()
        agent.install_signal_handlers()
        await agent.run()
    finally:
        await node.close()
    return 0
