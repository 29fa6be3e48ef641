"""Shared fixtures: the Docker Engine, the local busybox image, config files."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
import pytest_asyncio
from hypothesis import settings

from scheduler.db import Database, open_database
from tests import coordinator_harness
from tests.images import build_busybox
from tests.pgcluster import Cluster, find_bin_dir

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


# Modules whose every test runs once per storage backend (docs/scaling.md lists them):
# the scheduler's stores and services, through the ``db`` fixture or
# coordinator_harness.scheduler_config. Tests elsewhere run on SQLite only.
BOTH_BACKENDS = frozenset(
    {
        "test_scheduler_leases",
        "test_usage_ingest",
        "test_auth_refusals",
        "test_auth_enrolment",
        "test_auth_endpoints",
        "test_link_session",
        "test_scheduler_liveness",
        "test_verify_runs",
        "test_scheduler_outputs",
    }
)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server for the session (tests/pgcluster.py). Missing
    PostgreSQL: fail in CI (``make test`` installs it), skip elsewhere."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if IN_CI:
            pytest.fail(message + " (CI=true: make test installs Debian's postgresql)")
        pytest.skip(message)
    cluster = Cluster(bin_dir)
    cluster.start()
    yield cluster
    cluster.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if (
        module in BOTH_BACKENDS
        and "storage_backend" in metafunc.fixturenames
        and not metafunc.definition.get_closest_marker("sqlite_only")
    ):
        metafunc.parametrize("storage_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(autouse=True)
def storage_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """``sqlite`` or ``postgresql``: where this test's scheduler keeps its state. On
    postgresql, coordinator_harness.scheduler_config and ``db`` use a fresh database."""
    backend: str = getattr(request, "param", "sqlite")
    if backend != "postgresql":
        yield backend
        return
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    coordinator_harness.DATABASE_URL = url
    try:
        yield backend
    finally:
        coordinator_harness.DATABASE_URL = None
        cluster.drop_database(url)


@pytest_asyncio.fixture
async def db(tmp_path: Path, storage_backend: str) -> AsyncIterator[Database]:
    """A fresh, open scheduler database (migrated; on SQLite: WAL, checkpointer running)."""
    url = coordinator_harness.DATABASE_URL
    database = open_database(url) if url else Database(tmp_path / "s.db")
    await database.open()
    yield database
    await database.close()
