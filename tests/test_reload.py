"""SIGHUP reload: live-safe changes apply, the rest are reported as needing a restart."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.reload import merge_live, plan_reload


def _config(**sections: dict[str, object]) -> AgentConfig:
    return AgentConfig.model_validate(sections)


def test_no_change_is_no_plan() -> None:
    """Reloading an identical file changes nothing."""
    plan = plan_reload(AgentConfig(), AgentConfig())
    assert not plan.changed


def test_live_keys_apply_and_others_wait_for_restart() -> None:
    """Log level and allow-lists apply live; a new coordinator address needs a restart."""
    old = AgentConfig()
    new = _config(
        log={"level": "debug"},
        runtime={"denied_registries": ["evil.example"], "max_memory": "8GiB"},
        coordinator={"address": "elsewhere:7443"},
        status={"listen": "127.0.0.1:9999"},
    )
    plan = plan_reload(old, new)
    assert plan.live == ("log.level", "runtime.denied_registries", "runtime.max_memory")
    assert plan.restart == ("coordinator.address", "status.listen")
    merged = merge_live(old, new, plan)
    assert merged.log.level == "debug"
    assert merged.runtime.denied_registries == ["evil.example"]
    assert merged.runtime.max_memory == 8 * 1024**3
    # What needs a restart is not half-applied.
    assert merged.coordinator.address == old.coordinator.address
    assert merged.status.listen == old.status.listen
