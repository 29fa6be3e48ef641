"""The agent's config loader: the example loads, and every kind of bad file gets a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ENV_OVERRIDES, AgentConfig, load_agent_config
from gpuagent.configload import SECRET_MASK, ConfigError, load_config, masked_dump
from scheduler.config import load_scheduler_config

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    return info.value.problems


def test_example_config_loads_as_is() -> None:
    """config.example.yaml is valid and equals the built-in defaults it documents."""
    loaded = load_agent_config(ROOT / "config.example.yaml")
    assert loaded == AgentConfig()


def test_example_documents_every_option() -> None:
    """Every field of every config section appears as a key in config.example.yaml."""
    text = (ROOT / "config.example.yaml").read_text()

    def walk(model: type[AgentConfig], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if f"{name}:" not in text:
                missing.append(prefix + name)
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                missing += walk(sub, f"{prefix}{name}.")
        return missing

    assert walk(AgentConfig, "") == []


def test_human_units_parse(tmp_path: Path) -> None:
    """Durations and sizes accept the units people write."""
    path = _write(
        tmp_path,
        "metering: {sample_interval: 250ms, record_interval: 1h30m}\n"
        "runtime: {max_memory: 8GiB, max_shm: 500MB, stop_grace: 90}\n",
    )
    config = load_agent_config(path)
    assert config.metering.sample_interval == 0.25
    assert config.metering.record_interval == 5400.0
    assert config.runtime.max_memory == 8 * 1024**3
    assert config.runtime.max_shm == 500_000_000
    assert config.runtime.stop_grace == 90.0


def test_typo_wrong_type_and_negative_duration_each_named(tmp_path: Path) -> None:
    """Three mistakes give three problems, each with its key path and what was wrong."""
    path = _write(
        tmp_path,
        "coordinator:\n  adress: x:1\nruntime:\n  cpu_reserve: lots\n"
        "metering:\n  sample_interval: -5s\n",
    )
    problems = _problems(path)
    assert len(problems) == 3
    assert problems[0].startswith("coordinator.adress: unknown key; did you mean 'address'")
    assert problems[1].startswith("runtime.cpu_reserve: ") and "'lots'" in problems[1]
    assert problems[2] == "metering.sample_interval: duration must not be negative, got '-5s'"


def test_unknown_section_lists_allowed_keys(tmp_path: Path) -> None:
    """An unknown key with no close match lists what is allowed at that level."""
    problems = _problems(_write(tmp_path, "zzz: 1\n"))
    assert problems == [
        "zzz: unknown key; allowed keys here: attestation, coordinator, gpu, isolation, log, "
        "metering, node, outputs, runtime, services, status"
    ]


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error says where it is."""
    problems = _problems(_write(tmp_path, "node:\n  name: [unclosed\n"))
    assert len(problems) == 1
    assert problems[0].startswith("invalid YAML: line 3, column 1")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    """A list or scalar at the top level is rejected with its type."""
    assert _problems(_write(tmp_path, "- a\n- b\n")) == [
        "top level must be a mapping of keys, got list"
    ]


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    """Missing, directory, non-UTF-8 and unreadable files each get their own message."""
    assert _problems(tmp_path / "nope.yaml") == ["file not found"]
    assert _problems(tmp_path) == ["is a directory, not a config file"]
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert _problems(binary)[0].startswith("not UTF-8 text")
    if os.geteuid() != 0:  # root reads anything, so the permission case needs a user
        locked = _write(tmp_path, "log: {level: info}\n", "locked.yaml")
        locked.chmod(0)
        assert _problems(locked) == ["permission denied reading the file"]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    """An empty file is the defaults, not an error."""
    assert load_agent_config(_write(tmp_path, "")) == AgentConfig()


def test_mtls_pair_required_together(tmp_path: Path) -> None:
    """A client certificate without its key is a config error naming both keys."""
    problems = _problems(_write(tmp_path, "coordinator: {client_cert_file: /x.pem}\n"))
    assert problems == ["coordinator: client_cert_file and client_key_file must be set together"]


def test_literal_choices_are_listed(tmp_path: Path) -> None:
    """A bad enum value says which values are allowed."""
    problems = _problems(_write(tmp_path, "gpu: {backend: cuda}\n"))
    assert len(problems) == 1
    allowed = "'nvml', 'amd', 'simulated' or 'auto'"
    assert problems[0].startswith(f"gpu.backend: Input should be {allowed}")


def test_env_overrides_win_over_file(tmp_path: Path) -> None:
    """Per-host env vars override the file, and a bad one is blamed on the environment."""
    path = _write(tmp_path, "coordinator: {address: file:1}\nnode: {name: from-file}\n")
    env = {"GPU_AGENT_COORDINATOR_ADDRESS": "env:2", "GPU_AGENT_NODE_NAME": "gpu-07"}
    config = load_config(AgentConfig, path, ENV_OVERRIDES, environ=env)
    assert config.coordinator.address == "env:2"
    assert config.node.name == "gpu-07"
    with pytest.raises(ConfigError) as info:
        load_config(AgentConfig, path, ENV_OVERRIDES, environ={"GPU_AGENT_LOG_LEVEL": "loud"})
    assert info.value.problems[0].startswith("log.level: ")
    assert info.value.problems[-1] == "(environment overrides applied: GPU_AGENT_LOG_LEVEL)"


def test_every_env_override_targets_a_real_key() -> None:
    """Each documented env var maps to an existing config key."""
    for var, path in ENV_OVERRIDES.items():
        model: object = AgentConfig
        for part in path:
            fields = getattr(model, "model_fields", {})
            assert part in fields, f"{var} -> {'.'.join(path)}"
            model = fields[part].annotation


def test_masked_dump_hides_secrets(tmp_path: Path) -> None:
    """config show never prints a client key path or other secrets."""
    path = _write(tmp_path, "coordinator: {client_cert_file: /c.pem, client_key_file: /k.pem}\n")
    from agent.config import SECRET_KEYS

    dumped = masked_dump(load_agent_config(path), SECRET_KEYS)
    assert dumped["coordinator"]["client_key_file"] == SECRET_MASK
    assert dumped["coordinator"]["client_cert_file"] == "/c.pem"
    assert dumped["runtime"]["max_memory"] == "256GiB"


def test_scheduler_config_same_approach(tmp_path: Path) -> None:
    """The scheduler's loader reports path-qualified problems the same way."""
    path = _write(tmp_path, "server: {listn: x}\nliveness: {offline_grace: -1m}\n")
    with pytest.raises(ConfigError) as info:
        load_scheduler_config(path)
    assert info.value.problems == [
        "server.listn: unknown key; did you mean 'listen'?",
        "liveness.offline_grace: duration must not be negative, got '-1m'",
    ]


@pytest.mark.parametrize("interval", ["0s", "50ms", "301s"])
def test_scheduler_heartbeat_interval_within_what_agents_accept(
    tmp_path: Path, interval: str
) -> None:
    """Agents clamp NodeParams.heartbeat_interval_ms to 0.1-300 s; a scheduler set
    outside it would expect heartbeats at a pace no agent keeps (issue #19)."""
    path = _write(tmp_path, f"liveness: {{heartbeat_interval: {interval}}}\n")
    with pytest.raises(ConfigError) as info:
        load_scheduler_config(path)
    assert info.value.problems[0].startswith("liveness.heartbeat_interval:")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_config_check_ok_and_errors(tmp_path: Path) -> None:
    """`gpu-agent config check` prints OK (exit 0) or every problem (exit 2), no traceback."""
    ok = _cli("config", "check", str(ROOT / "config.example.yaml"))
    assert ok.returncode == 0
    assert ok.stdout.strip().endswith("config.example.yaml: OK")
    bad = _write(
        tmp_path,
        "coordinator: {adress: x}\nruntime: {max_cpus: lots}\nmetering: {sample_interval: -1s}\n",
    )
    result = _cli("config", "check", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"error: {bad}: ") for line in lines)
    assert "Traceback" not in result.stderr


def test_cli_config_show_masks_and_applies_env(tmp_path: Path) -> None:
    """`gpu-agent config show` prints the effective YAML with env overrides applied."""
    env = {**os.environ, "GPU_AGENT_NODE_NAME": "rack4-gpu2"}
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "show"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0
    assert "name: rack4-gpu2" in result.stdout
    assert "sample_interval: 5s" in result.stdout


def test_coordinator_address_takes_a_list_of_replicas() -> None:
    from agent.config import CoordinatorConfig

    one = CoordinatorConfig.model_validate({"address": "a:7443"})
    assert one.targets == ("a:7443",) and one.address == "a:7443"
    both = CoordinatorConfig.model_validate({"address": ["a:7443", "b:7443"]})
    assert both.targets == ("a:7443", "b:7443")
    env = CoordinatorConfig.model_validate({"address": "a:7443, b:7443"})  # env spelling
    assert env.targets == ("a:7443", "b:7443")
    assert CoordinatorConfig.model_validate({"address": ["a:1"]}).address == "a:1"
    for bad in ([], ["a:1", ""]):
        with pytest.raises(ValueError, match="none empty"):
            CoordinatorConfig.model_validate({"address": bad})


@pytest.mark.parametrize("value", ["-1s", "61s", "soon"])
def test_replica_home_first_out_of_range_is_named(tmp_path: Path, value: str) -> None:
    """replica.home_first holds a lease back from the other replicas: 0-60 s. Longer
    would leave a dead replica's Submits unplaced for minutes."""
    path = _write(tmp_path, f"replica: {{home_first: {value}}}\n")
    with pytest.raises(ConfigError) as info:
        load_scheduler_config(path)
    assert info.value.problems[0].startswith("replica.home_first:"), info.value.problems


def test_replica_home_first_zero_and_default(tmp_path: Path) -> None:
    assert load_scheduler_config(_write(tmp_path, "{}\n")).replica.home_first == 1.0
    path = _write(tmp_path, "replica: {home_first: 0s}\n", "zero.yaml")
    assert load_scheduler_config(path).replica.home_first == 0.0
