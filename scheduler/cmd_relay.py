"""``gpu-scheduler relay``: run the service relay on its own (scheduler/relay/standalone.py)."""

from __future__ import annotations

import argparse
import asyncio
import os

from gpuagent import sdnotify
from gpuagent.aio import stop_on_signals
from gpuagent.logsetup import setup_logging, stderr_error

from .cli import load_config_from_args
from .config import SchedulerConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    relay = sub.add_parser(
        "relay", help="run the relay for service leases on its own (docs/services.md)"
    )
    relay.set_defaults(handler=_relay)


def _relay(args: argparse.Namespace) -> int:
    from .relay.server import RelayStartError

    config = load_config_from_args(args)
    setup_logging(config.log.level, config.log.format)
    os.umask(0o077)
    try:
        return asyncio.run(_main(config))
    except RelayStartError as exc:
        stderr_error(f"error: {exc}")
        return 1


async def _main(config: SchedulerConfig) -> int:
    from .relay.standalone import StandaloneRelay

    stop = stop_on_signals()
    relay = StandaloneRelay(config)
    await relay.start()
    sdnotify.ready(status=f"relay on port {relay.relay.port}, tunnels on {relay.tunnel_port}")
    try:
        await stop.wait()
    finally:
        sdnotify.stopping(status="stopping")
        await relay.stop()
    return 0
