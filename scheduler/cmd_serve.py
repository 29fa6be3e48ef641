"""``gpu-scheduler serve``: run the reference coordinator in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import os

import prometheus_client

from gpuagent import sdnotify
from gpuagent.aio import stop_on_signals
from gpuagent.logsetup import enable_fault_tracebacks, setup_logging, stderr_error

from .cli import load_config_from_args
from .config import SchedulerConfig
from .db import DatabaseError
from .storage import StorageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the coordinator's gRPC server in the foreground")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    # The server (and with it numpy and the verifier) only for `serve`: client
    # commands build the same parser and must start fast.
    from .server import ServerStartError

    config = load_config_from_args(args)
    setup_logging(config.log.level, config.log.format)
    # Everything the scheduler writes (database, WAL, TLS keys, the secrets key) is its
    # own: created 0600/0700 whatever the umask it was started with.
    os.umask(0o077)
    # A watchdog kill (SIGABRT) then leaves every thread's stack in the journal.
    enable_fault_tracebacks()
    # `_created` series double every counter's cardinality and no dashboard uses them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        return asyncio.run(_main(config))
    except (ServerStartError, DatabaseError, StorageError) as exc:
        stderr_error(f"error: {exc}")
        return 1


async def _main(config: SchedulerConfig) -> int:
    from .server import SchedulerServer

    stop = stop_on_signals()
    server = SchedulerServer(config)
    # Pings come from this loop, so a stuck loop gets the unit restarted.
    watchdog = asyncio.create_task(sdnotify.watchdog_task(stop), name="watchdog")
    try:
        await server.start()
        sdnotify.ready(status=f"serving on {config.server.listen} (port {server.port})")
        await server.serve_until(stop)
    finally:
        sdnotify.stopping(status="stopping")
        stop.set()
        await watchdog
    return 0
