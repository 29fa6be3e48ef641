"""Host inventory against the real machine and Docker Engine."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import docker
import psutil
import pytest

from agent.hostinfo import collect_host_info, parse_version, toolkit_version


def test_host_info_matches_the_machine(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    """CPU, memory, data-dir space and the Docker version agree with what the OS reports."""
    info = collect_host_info(tmp_path / "state", "unix:///var/run/docker.sock")
    assert info.cpu_threads == os.cpu_count()
    assert info.memory_bytes == psutil.virtual_memory().total
    assert info.docker_version == docker_client.version()["Version"]
    assert info.data_dir_free_bytes is not None and info.data_dir_free_bytes > 0
    assert info.kernel == os.uname().release
    assert any(i.name == "lo" and "127.0.0.1" in i.addresses for i in info.interfaces)
    assert info.problems == ()


def test_unreachable_docker_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """A Docker host that does not answer leaves docker_version None and says why."""
    info = collect_host_info(tmp_path, "unix:///nonexistent/docker.sock", timeout=1)
    assert info.docker_version is None
    assert "Docker Engine unreachable" in info.problems[0]


def _fake_tool(directory: Path, name: str, output: str) -> None:
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{output}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_toolkit_version_from_nvidia_ctk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The toolkit version is parsed from `nvidia-ctk --version`."""
    _fake_tool(tmp_path, "nvidia-ctk", "NVIDIA Container Toolkit CLI version 1.17.3\ncommit: abc")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolkit_version() == "1.17.3"


def test_toolkit_version_falls_back_to_container_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without nvidia-ctk, `nvidia-container-cli --version` is used."""
    _fake_tool(tmp_path, "nvidia-container-cli", "cli-version: 1.16.1\nlib-version: 1.16.1")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolkit_version() == "1.16.1"


def test_no_toolkit_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No toolkit on PATH: None."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolkit_version() is None


def test_parse_version() -> None:
    """Versions are found inside tool output."""
    assert parse_version("version 1.16.2-rc1") == (1, 16, 2)
    assert parse_version("no digits") is None
