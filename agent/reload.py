"""SIGHUP: which config changes apply live, and which need a restart.

Live: what only affects *new* decisions (log level, admission limits, allow-lists,
grace periods, the node's prices and location). Everything that shapes an open
resource (identity, state dir, coordinator connection, GPU backend, listen address)
needs a restart, and the agent says so rather than half-applying it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gpuagent import sdnotify
from gpuagent.configload import ConfigError
from gpuagent.logsetup import setup_logging

from .config import AgentConfig, load_agent_config

log = logging.getLogger(__name__)

# Sections (or section.key) that apply without a restart.
LIVE_KEYS = frozenset(
    {
        "log.level",
        "log.format",
        "runtime.allowed_registries",
        "runtime.denied_registries",
        "runtime.allowed_capabilities",
        "runtime.max_gpus_per_lease",
        "runtime.max_memory",
        "runtime.max_cpus",
        "runtime.max_shm",
        "runtime.max_scratch",
        "runtime.cpu_reserve",
        "runtime.memory_reserve",
        "runtime.pids_limit",
        "runtime.read_only_rootfs",
        "runtime.stop_grace",
        "runtime.pull_timeout",
        "runtime.pull_policy",
        "runtime.default_memory",
        "runtime.default_cpus",
        "coordinator.stop_leases_after_disconnect",
        # The market (docs/market.md): sent at once in an OfferUpdate, no reconnect;
        # they price and place new leases only.
        "node.pricing",
        "node.price_micros_per_gpu_hour",
        "node.region",
        "node.location.region",
        "node.location.country",
        "node.location.zone",
        # Lease outputs: read at each assign, pack and sweep (the directory is not).
        "outputs.max_bytes",
        "outputs.default_retention",
        "outputs.max_retention",
        "outputs.gc_interval",
    }
)


@dataclass(frozen=True)
class ReloadPlan:
    live: tuple[str, ...]  # changed keys applied now
    restart: tuple[str, ...]  # changed keys that need a restart (not applied)

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)


def _flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    before, after = _flatten(old), _flatten(new)
    changed = sorted(k for k in after if before.get(k) != after[k])
    live = tuple(k for k in changed if k in LIVE_KEYS)
    restart = tuple(k for k in changed if k not in LIVE_KEYS)
    return ReloadPlan(live=live, restart=restart)


def merge_live(old: AgentConfig, new: AgentConfig, plan: ReloadPlan) -> AgentConfig:
    """The running config with only the live changes of ``new`` applied."""
    data = old.model_dump()
    fresh = new.model_dump()
    for key in plan.live:
        *path, name = key.split(".")
        target, source = data, fresh
        for part in path:  # nested sections (node.location.country)
            target, source = target[part], source[part]
        target[name] = source[name]
    return AgentConfig.model_validate(data)


async def reload_config(
    path: Path | None, running: AgentConfig, apply: Callable[[AgentConfig], None]
) -> AgentConfig:
    """SIGHUP: apply the live-safe changes of the config file; report the rest.

    Returns the config now in effect (``running`` when the file is bad or nothing
    live changed); ``apply`` hands a changed one to the parts that read it.
    """
    sdnotify.reloading(status="reloading configuration")
    try:
        new = await asyncio.to_thread(load_agent_config, path)
    except ConfigError as exc:
        log.error(
            "config reload failed; keeping the running config",
            extra={"file": exc.source, "problems": exc.problems},
        )
        sdnotify.ready(status="reload failed: kept the running config")
        return running
    plan = plan_reload(running, new)
    config = running
    if plan.live:
        config = merge_live(running, new, plan)
        setup_logging(config.log.level, config.log.format)
        apply(config)
    if plan.restart:
        log.warning("config changes need a restart to apply", extra={"keys": list(plan.restart)})
    log.info(
        "config reloaded",
        extra={"applied": list(plan.live), "need_restart": list(plan.restart)},
    )
    sdnotify.ready(status="running (config reloaded)")
    return config
