"""Shared fixtures: the Docker Engine, the local busybox image, config files."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
import pytest_asyncio
from hypothesis import settings

from scheduler.db import Database
from tests.images import build_busybox

# Property tests pin behaviour, not speed (benchmarks/ does that): on a loaded 2-core CI
# host hypothesis's per-example deadline only adds flakes.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _docker_client() -> docker.DockerClient:
    client = docker.from_env(timeout=30)
    client.ping()
    return client


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The real Docker Engine. Unreachable: fail in CI, skip on a laptop without Docker."""
    try:
        client = _docker_client()
    except Exception as exc:  # any failure to reach the engine means the same here
        message = f"Docker Engine unreachable: {exc}"
        if IN_CI:
            pytest.fail(message + " (CI=true: docker tests must run, not skip)")
        pytest.skip(message)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """Tag of a tiny local image (scratch + static busybox) for container tests."""
    return build_busybox(docker_client)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that use the Docker fixtures are docker tests whether or not they say so.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if (
            "docker_client" in fixtures or "busybox_image" in fixtures
        ) and not item.get_closest_marker("docker"):
            item.add_marker(pytest.mark.docker)


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh, open scheduler database (migrated, WAL, checkpointer running)."""
    database = Database(tmp_path / "s.db")
    await database.open()
    yield database
    await database.close()
