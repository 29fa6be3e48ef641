"""``gpu-agent run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import prometheus_client

from gpuagent.logsetup import enable_fault_tracebacks, setup_logging, stderr_error

from .cli import config_path, load_config_from_args
from .config import AgentConfig
from .direct.publisher import DirectModeError
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
    # A watchdog kill (SIGABRT) then leaves every thread's stack in the journal.
    enable_fault_tracebacks()
    # `_created` series double every counter's cardinality and no dashboard uses them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        return asyncio.run(_main(config, config_path(args)))
    except PreflightFailed as exc:
        for result in exc.results:
            message = f"error: preflight: {result.name}: {result.message}"
            stderr_error(message + (f"\n  fix: {result.fix}" if result.fix else ""))
        return 2
    except NvmlUnavailable as exc:
        stderr_error(f"error: {exc}")
        return 2
    except (IdentityError, StateDBError, OutboxError, ListenError, DirectModeError) as exc:
        stderr_error(f"error: {exc}")
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
