"""Container counters from cgroup files and the container's network namespace."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from agent.usage.cgroup import (
    LEASE_NETWORK_LABEL,
    CgroupReader,
    ContainerCounters,
    lease_bridge,
    parse_net_dev,
    parse_proc_cgroup,
)

# /proc/<pid>/net/dev: two header lines, then rx bytes in field 1, tx bytes in field 9.
NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop ...
    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0
  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0
  eth1:10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0
"""


def _poll(
    read: Callable[[], ContainerCounters], ok: Callable[[ContainerCounters], bool]
) -> ContainerCounters:
    """Read until ``ok`` holds; counters move on their own schedule, with no event to await."""
    deadline = time.monotonic() + 20
    while True:
        counters = read()
        if ok(counters) or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


@pytest.fixture
def busy_container(docker_client: docker.DockerClient, busybox_image: str) -> Iterator[Container]:
    """A container burning half a CPU (capped: the test machine is shared)."""
    container = docker_client.containers.run(
        busybox_image,
        ["sh", "-c", "while :; do :; done"],
        detach=True,
        nano_cpus=500_000_000,
        labels={"gpu-agent.test": "usage-cgroup"},
    )
    try:
        container.reload()
        yield container
    finally:
        container.remove(force=True)


def test_reads_a_real_containers_counters(busy_container: Container) -> None:
    """CPU time grows while the container spins, memory is non-zero with a peak at
    least as high, and datagrams sent into its network namespace show up as rx bytes."""
    pid = busy_container.attrs["State"]["Pid"]
    reader = CgroupReader(busy_container.id, pid)
    first = reader.read()
    assert first.cpu_usec is not None
    assert first.memory_current_bytes is not None and first.memory_current_bytes > 0
    assert first.memory_peak_bytes is not None
    assert first.memory_peak_bytes >= first.memory_current_bytes
    assert first.net_rx_bytes is not None and first.net_tx_bytes is not None

    later = _poll(reader.read, lambda c: (c.cpu_usec or 0) >= first.cpu_usec + 200_000)
    assert later.cpu_usec is not None and later.cpu_usec >= first.cpu_usec + 200_000

    address = busy_container.attrs["NetworkSettings"]["IPAddress"]
    if not address:
        pytest.skip("container has no bridge address to send to")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(10):
            sock.sendto(b"x" * 1000, (address, 9))
    after = _poll(reader.read, lambda c: (c.net_rx_bytes or 0) >= first.net_rx_bytes + 10_000)
    assert after.net_rx_bytes is not None and after.net_rx_bytes >= first.net_rx_bytes + 10_000


def test_finds_the_cgroup_from_the_container_id_alone(busy_container: Container) -> None:
    """Without a pid the usual driver paths are tried; network needs the pid, so it is None."""
    counters = CgroupReader(busy_container.id, None).read()
    assert counters.cpu_usec is not None
    assert counters.memory_current_bytes is not None
    assert counters.net_rx_bytes is None and counters.net_tx_bytes is None


def test_a_pid_from_another_cgroup_is_not_trusted(busy_container: Container) -> None:
    """A recycled pid (here: our own) must not lend its network counters to the lease."""
    counters = CgroupReader(busy_container.id, os.getpid()).read()
    assert counters.net_rx_bytes is None
    assert counters.cpu_usec is not None  # the cgroup itself is still found by id


def test_a_removed_container_reads_as_unmeasured(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    """Once the container is gone every field is None, and reading does not raise."""
    container = docker_client.containers.run(busybox_image, ["sleep", "30"], detach=True)
    container.reload()
    reader = CgroupReader(container.id, container.attrs["State"]["Pid"])
    assert reader.read().cpu_usec is not None
    container.remove(force=True)
    assert reader.read() == ContainerCounters()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_pure_cgroup_v2_with_the_systemd_driver(tmp_path: Path) -> None:
    """On a v2-only host the systemd scope's cpu.stat, memory.current/peak are read."""
    cid = "abc123"
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    scope = root / "system.slice" / f"docker-{cid}.scope"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(scope / "cpu.stat", "usage_usec 4242\nuser_usec 4000\nsystem_usec 242\n")
    _write(scope / "memory.current", "1000\n")
    _write(scope / "memory.peak", "5000\n")
    _write(proc / "77" / "cgroup", f"0::/system.slice/docker-{cid}.scope\n")
    _write(proc / "77" / "net" / "dev", NET_DEV)
    counters = CgroupReader(cid, 77, cgroup_root=root, proc=proc).read()
    assert counters == ContainerCounters(4242, 1000, 5000, 1010, 2020)
    by_id = CgroupReader(cid, None, cgroup_root=root, proc=proc).read()
    assert by_id == ContainerCounters(4242, 1000, 5000, None, None)


def test_cgroup_v1_files_are_the_fallback(tmp_path: Path) -> None:
    """With only v1 controllers, cpuacct.usage (ns) and memory.*usage_in_bytes are used."""
    cid = "def456"
    root = tmp_path / "cgroup"
    _write(root / "cpu,cpuacct" / "docker" / cid / "cpuacct.usage", "7000999\n")
    _write(root / "memory" / "docker" / cid / "memory.usage_in_bytes", "300\n")
    _write(root / "memory" / "docker" / cid / "memory.max_usage_in_bytes", "900\n")
    counters = CgroupReader(cid, None, cgroup_root=root, proc=tmp_path / "proc").read()
    assert counters == ContainerCounters(7000, 300, 900, None, None)


def test_missing_files_degrade_to_none(tmp_path: Path) -> None:
    """A cgroup dir without memory.peak (older kernels) still yields what exists."""
    cid = "x1"
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu\n")
    _write(root / "docker" / cid / "cpu.stat", "usage_usec 10\n")
    counters = CgroupReader(cid, None, cgroup_root=root, proc=tmp_path / "proc").read()
    assert counters == ContainerCounters(cpu_usec=10)


def test_parse_net_dev_skips_loopback() -> None:
    """Loopback traffic never leaves the container and is not billed."""
    assert parse_net_dev(NET_DEV) == (1010, 2020)


def test_parse_proc_cgroup_handles_v1_and_v2_lines() -> None:
    """Comma-joined v1 controllers map to their path; the v2 line maps to ''."""
    text = "4:memory:/docker/a\n2:cpu,cpuacct:/docker/a\n1:name=systemd:/x\n0::/docker/a\n"
    paths = parse_proc_cgroup(text)
    assert paths["memory"] == paths["cpuacct"] == paths["cpu"] == paths[""] == "/docker/a"


def _bridge_stats(sys_class_net: Path, bridge: str, rx: int, tx: int) -> None:
    _write(sys_class_net / bridge / "statistics" / "rx_bytes", f"{rx}\n")
    _write(sys_class_net / bridge / "statistics" / "tx_bytes", f"{tx}\n")


def test_lease_bridge_counters_are_the_leases_traffic(tmp_path: Path) -> None:
    """With a lease network, bytes come from its bridge, swapped to the lease's point of
    view (the bridge receives what the container sends); /proc is not consulted, even
    when readable, and a bridge that cannot be read is unknown, not 0."""
    cid = "abc123"
    root, proc, net = tmp_path / "cgroup", tmp_path / "proc", tmp_path / "net"
    _write(root / "cgroup.controllers", "cpu\n")
    _write(root / "docker" / cid / "cpu.stat", "usage_usec 10\n")
    _write(proc / "77" / "cgroup", f"0::/docker/{cid}\n")
    _write(proc / "77" / "net" / "dev", NET_DEV)
    _bridge_stats(net, "br-0123456789ab", rx=300, tx=4000)
    reader = CgroupReader(
        cid, 77, bridge="br-0123456789ab", cgroup_root=root, proc=proc, sys_class_net=net
    )
    counters = reader.read()
    assert (counters.net_rx_bytes, counters.net_tx_bytes) == (4000, 300)
    (net / "br-0123456789ab" / "statistics" / "tx_bytes").unlink()
    counters = reader.read()
    assert (counters.net_rx_bytes, counters.net_tx_bytes) == (None, None)
    assert counters.cpu_usec == 10


def test_hidden_proc_without_a_lease_network_is_unknown(tmp_path: Path) -> None:
    """ProtectProc=invisible hides the lease's /proc/<pid>: with no lease network
    either, network bytes are unknown (None), never 0."""
    cid = "abc123"
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu\n")
    _write(root / "docker" / cid / "cpu.stat", "usage_usec 10\n")
    reader = CgroupReader(
        cid, 77, cgroup_root=root, proc=tmp_path / "proc", sys_class_net=tmp_path / "net"
    )
    counters = reader.read()
    assert (counters.net_rx_bytes, counters.net_tx_bytes) == (None, None)


def _network(network_id: str, labels: dict[str, str], driver: str = "bridge") -> dict[str, object]:
    return {"Id": network_id, "Labels": labels, "Driver": driver, "Options": {}}


def test_lease_bridge_picks_only_the_network_labelled_with_the_lease() -> None:
    """The default bridge, another lease's network or a non-bridge network never
    count as this lease's traffic; an explicit bridge name is honoured."""
    own = "f" * 64
    networks = {
        "d" * 64: _network("d" * 64, {}),
        "e" * 64: _network("e" * 64, {LEASE_NETWORK_LABEL: "other-lease"}),
        "c" * 64: _network("c" * 64, {LEASE_NETWORK_LABEL: "L1"}, driver="macvlan"),
        own: _network(own, {LEASE_NETWORK_LABEL: "L1"}),
    }
    container = {
        "NetworkSettings": {"Networks": {n: {"NetworkID": n} for n in networks if n != own}}
    }
    assert lease_bridge(container, networks.__getitem__, "L1") is None
    container["NetworkSettings"]["Networks"]["lease-L1"] = {"NetworkID": own}
    assert lease_bridge(container, networks.__getitem__, "L1") == "br-ffffffffffff"
    networks[own]["Options"] = {"com.docker.network.bridge.name": "gpuL1"}
    assert lease_bridge(container, networks.__getitem__, "L1") == "gpuL1"


def test_a_spare_network_the_container_names_is_its_leases_alone() -> None:
    """A spare network (made ahead, so without the lease label) counts when the
    container's io.gpuagent.network label names it and it is the agent's; an
    unmanaged network of that name does not."""
    spare = "a" * 64
    networks = {spare: {**_network(spare, {"io.gpuagent.managed": "true"}), "Name": "gpuspare1"}}
    container: dict[str, Any] = {
        "Config": {"Labels": {"io.gpuagent.network": "gpuspare1"}},
        "NetworkSettings": {"Networks": {"gpuspare1": {"NetworkID": spare}}},
    }
    assert lease_bridge(container, networks.__getitem__, "L1") == "br-aaaaaaaaaaaa"
    networks[spare]["Labels"] = {}
    assert lease_bridge(container, networks.__getitem__, "L1") is None
    container["Config"]["Labels"] = {}
    networks[spare]["Labels"] = {"io.gpuagent.managed": "true"}
    assert lease_bridge(container, networks.__getitem__, "L1") is None


def test_a_real_lease_network_is_metered_from_its_bridge(
    docker_client: docker.DockerClient, busybox_image: str
) -> None:
    """A container on a bridge network labelled with its lease: the bridge is found
    through Docker and its counters grow with the container's own traffic, in both
    directions, while the container's /proc is never needed (pid None)."""
    lease_id = f"test-net-{os.getpid()}"
    network = docker_client.networks.create(
        f"gpu-agent-test-{lease_id}", driver="bridge", labels={LEASE_NETWORK_LABEL: lease_id}
    )
    try:
        network.reload()
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        container = docker_client.containers.run(
            busybox_image,
            ["sh", "-c", f"ping -c 20 -i 0.2 -s 1000 {gateway}; sleep 30"],
            detach=True,
            network=network.name,
            labels={"gpu-agent.test": "usage-cgroup"},
        )
        try:
            container_id, network_id = str(container.id), str(network.id)
            attrs = docker_client.api.inspect_container(container_id)
            bridge = lease_bridge(attrs, docker_client.api.inspect_network, lease_id)
            assert bridge == f"br-{network_id[:12]}"
            reader = CgroupReader(container_id, None, bridge=bridge)
            counters = _poll(
                reader.read,
                lambda c: (c.net_rx_bytes or 0) > 10_000 and (c.net_tx_bytes or 0) > 10_000,
            )
            assert (counters.net_rx_bytes or 0) > 10_000, counters
            assert (counters.net_tx_bytes or 0) > 10_000, counters
        finally:
            container.remove(force=True)
    finally:
        network.remove()
