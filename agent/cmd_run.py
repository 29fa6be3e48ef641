"""``gpu-agent run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gpuagent.logsetup import setup_logging

from .cli import load_config_from_args
from .config import AgentConfig
from .daemon import Agent
from .identity import IdentityError, NodeIdentity, load_or_create
from .link import CoordinatorLink, NodeReporter, StaticReporter
from .link.reporter import build_inventory, default_node_name, simulated_gpus

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the agent daemon in the foreground")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    setup_logging(config.log.level, config.log.format)
    try:
        return asyncio.run(_main(config))
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2


def _reporter(config: AgentConfig, identity: NodeIdentity) -> StaticReporter:
    """Blocking (psutil, /proc): the inventory sent in Hello."""
    gpus = []
    if config.gpu.backend == "simulated":
        sim = config.gpu.simulated
        # Seeded by the node id so the simulated UUIDs are stable across restarts.
        gpus = simulated_gpus(sim.profile, sim.count, identity.node_id)
    else:
        # TODO(gpu backend): report NVML GPUs once agent.gpu provides a reporter.
        log.warning(
            "GPU inventory not wired for this backend yet; reporting no GPUs",
            extra={"backend": config.gpu.backend},
        )
    return StaticReporter(build_inventory(gpus))


def build_link(
    config: AgentConfig, identity: NodeIdentity, reporter: NodeReporter
) -> CoordinatorLink:
    if config.coordinator.insecure:
        log.warning("coordinator link is plaintext (coordinator.insecure: true)")
    return CoordinatorLink(
        config.coordinator,
        identity,
        reporter,
        node_name=config.node.name or default_node_name(),
        region=config.node.region or "",
        labels=config.node.labels,
    )


async def _main(config: AgentConfig) -> int:
    identity = await asyncio.to_thread(load_or_create, config.node.state_dir)
    log.info("node identity", extra={"node_id": identity.node_id, "key": str(identity.path)})
    reporter = await asyncio.to_thread(_reporter, config, identity)
    agent = Agent(config)
    link = build_link(config, identity, reporter)
    agent.add_component("coordinator-link", link.run)
    agent.install_signal_handlers()
    await agent.run()
    return 0
