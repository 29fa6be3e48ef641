"""Isolation settings private to one test, and their cleanup.

Other engineers' tests share this Docker Engine and its iptables: each test gets its
own firewall chain name, bridge prefix and subnet pool, so its rules match only its
own lease bridges and its cleanup removes nothing of anyone else's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import uuid
from pathlib import Path
from typing import Any

import docker

from agent.config import IsolationConfig
from agent.isolation.firewall import Firewall
from agent.leases.docker_runtime import LABEL_NODE
from agent.leases.scratch import is_mount_point


def isolation_for_test(**overrides: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:5]
    settings: dict[str, Any] = {
        # Without root no iptables rule can be written and every lease would fail
        # closed; the isolation tests themselves skip then.
        "egress_policy": os.geteuid() == 0,
        "firewall_chain": f"GAT{tag.upper()}",
        "bridge_prefix": f"t{tag}-",
        # A random /22 of 10.213/16: /28 subnets for a dozen leases; Docker refuses an
        # overlap with another test's network and the allocator moves on.
        "subnet_pool": f"10.213.{secrets.randbelow(64) * 4}.0/22",
    }
    settings.update(overrides)
    return settings


def cleanup_isolation(client: docker.DockerClient, node_id: str, config: IsolationConfig) -> None:
    """Remove the test node's lease networks and its firewall chains."""
    for network in client.networks.list(filters={"label": f"{LABEL_NODE}={node_id}"}):
        with contextlib.suppress(docker.errors.APIError):
            network.remove()
    with contextlib.suppress(Exception):
        Firewall(config).uninstall()


def cleanup_scratch(root: Path) -> None:
    """Unmount loop scratch a failed test left mounted (else tmp_path cannot be removed)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if os.path.ismount(entry):
            subprocess.run(["umount", "-l", str(entry)], check=False, capture_output=True)
    if is_mount_point(root):  # `gpu-agent scratch-mount`'s bind of the root itself
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
