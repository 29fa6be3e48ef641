"""A lease's real start and end come from Docker, not from when the agent looked.

A container that exits while the agent is down must be billed to its exit
(``State.FinishedAt``), not to the agent's restart (fault scenario 2).
"""

from __future__ import annotations

import time
from typing import Any

import docker
import pytest

from agent.leases.docker_runtime import _info, parse_docker_time
from agent.leases.records import LeaseUpdate
from agent.leases.states import LeaseState
from agent.node import _monotonic_at


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00.123456789Z", 1714557600.123456),
        ("2024-05-01T10:00:00Z", 1714557600.0),
        ("2024-05-01T12:00:00.5+02:00", 1714557600.5),
    ],
)
def test_docker_timestamps_parse_to_unix_seconds(text: str, expected: float) -> None:
    """Docker's RFC 3339 times (nanoseconds, Z or an offset) become unix seconds."""
    assert parse_docker_time(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00Z", "", "yesterday", "2024-13-01T00:00:00Z"])
def test_never_and_garbage_timestamps_are_none(text: str) -> None:
    """Docker's year-1 "never" and anything unparseable mean "unknown", not a time."""
    assert parse_docker_time(text) is None


def test_monotonic_at_maps_a_past_wall_instant_into_the_past() -> None:
    """A wall time 3 s ago maps to about 3 s before now on the monotonic clock; a
    future one is clamped to now (a final record never ends after it was written)."""
    mono = _monotonic_at(time.time() - 3.0)
    assert mono is not None
    assert time.monotonic() - mono == pytest.approx(3.0, abs=0.1)
    future = _monotonic_at(time.time() + 60.0)
    assert future is not None
    assert future <= time.monotonic()
    assert _monotonic_at(None) is None


def test_lease_update_round_trips_its_real_start_and_end() -> None:
    """The terminal update stored in the state DB keeps started_at/ended_at, and an
    update stored before these fields existed still loads."""
    update = LeaseUpdate("l1", 5, LeaseState.SUCCEEDED, 20.0, started_at=3.5, ended_at=12.25)
    assert LeaseUpdate.from_json(update.to_json()) == update
    old = '{"lease_id": "l1", "seq": 1, "state": "assigned", "at": 1.0, "gpu_uuids": []}'
    assert LeaseUpdate.from_json(old).ended_at is None


def test_exited_container_reports_its_finish_time(
    docker_client: docker.DockerClient, busybox_image: Any
) -> None:
    """A container inspected well after it exited reports when it exited, within the
    engine's own timing, not when it was inspected."""
    container = docker_client.containers.run(busybox_image, ["sh", "-c", "true"], detach=True)
    try:
        container.wait(timeout=30)
        exited_by = time.time()
        time.sleep(1.0)  # the gap between the exit and the look is what is measured
        container.reload()
        info = _info(container)
        assert info.status == "exited"
        assert info.finished_at is not None
        assert exited_by - 5.0 < info.finished_at <= exited_by + 0.05
        assert parse_docker_time(info.started_at) is not None
    finally:
        container.remove(force=True)
