"""Remove everything lease work left on the host for one node: containers, networks, mounts.

A stopped agent leaves its leases running on purpose (a restart re-adopts them), so
whoever tears a node down for good (a test, a benchmark, a provider decommissioning
a host) must remove them, and with them what the lease manager would have removed
at each lease's end: its network and, in loop scratch mode, its mounted scratch
filesystem (a directory tree cannot be deleted while it is mounted, and each mount
holds a loop device), and the egress policy's rules when the caller names them.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import docker
import docker.errors

from ..config import IsolationConfig
from ..isolation.firewall import Firewall, FirewallError
from .docker_runtime import LABEL_NODE
from .scratch import ScratchError, ScratchSpace

log = logging.getLogger(__name__)


def remove_node_leftovers(
    client: docker.DockerClient,
    node_id: str,
    scratch_root: Path | None = None,
    isolation: IsolationConfig | None = None,
) -> None:
    """``isolation``: also remove that config's egress-policy rules (the node is gone)."""
    if isolation is not None:
        with contextlib.suppress(FirewallError):
            Firewall(isolation).uninstall()
    if not node_id:
        return
    label = f"{LABEL_NODE}={node_id}"
    for container in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    for network in client.networks.list(filters={"label": label}):
        with contextlib.suppress(docker.errors.APIError):
            network.remove()
    if scratch_root is None or not scratch_root.is_dir():
        return
    space = ScratchSpace(scratch_root, "loop")
    for entry in scratch_root.iterdir():
        if entry.is_dir():
            try:
                space.remove(entry)
            except ScratchError as exc:
                log.warning("scratch left behind", extra={"path": str(entry), "error": str(exc)})
