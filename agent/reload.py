"""SIGHUP: which config changes apply live, and which need a restart.

Live: what only affects *new* decisions (log level, admission limits, allow-lists,
grace periods, the node's prices and location). Everything that shapes an open
resource (identity, state dir, coordinator connection, GPU backend, listen address)
needs a restart, and the agent says so rather than half-applying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .config import AgentConfig

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
