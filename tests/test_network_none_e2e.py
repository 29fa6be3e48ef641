"""A buyer's `network: none` end to end: CLI -> scheduler -> agent -> Docker.

Real processes (``gpu-scheduler serve``, ``gpu-agent run``), real Docker, real gRPC
over TLS on loopback, through the fault suite's cluster harness.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Cluster, cluster, wait_for

pytestmark = pytest.mark.docker


@pytest.fixture
def node(tmp_path: Path, busybox_image: str) -> Iterator[Cluster]:
    with cluster(tmp_path, gpus=1) as c:
        c.start()
        yield c


def test_network_none_lease_runs_with_loopback_only(node: Cluster) -> None:
    """`submit --network none` reaches the agent as network_mode none: the container
    sees only lo; a normal lease beside it gets its own network (eth0), so the first
    assertion could fail."""
    offline = node.submit("ls /sys/class/net", network="none")
    online = node.submit("ls /sys/class/net")
    for lease in (offline, online):
        wait_for(f"{lease} to end", lambda lease=lease: node.lease_state(lease) == "succeeded", 60)
    assert node.scheduler_cli("logs", offline).split() == ["lo"]
    assert sorted(node.scheduler_cli("logs", online).split()) == ["eth0", "lo"]
    assert "network:     none (loopback only)" in node.scheduler_cli("lease", "show", offline)
