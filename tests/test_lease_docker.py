"""Leases against the real Docker Engine: lifecycle, hostile specs, GPUs, duplicates."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import pytest_asyncio

from agent.config import AgentConfig
from agent.isolation.networks import LABEL_SPARE
from agent.isolation.toolkit import ToolkitGate
from agent.leases import (
    DockerRuntime,
    GpuAllocator,
    HostCapacity,
    LeaseManager,
    LeaseState,
    LeaseUpdate,
    StateDB,
    container_name,
)
from agent.leases.docker_runtime import (
    LABEL_GPUS,
    LABEL_LEASE,
    LABEL_MANAGED,
    LABEL_NETWORK,
    LABEL_NODE,
    PullObserver,
)
from tests import registry as test_registry
from tests.coordinator_harness import until
from tests.isolation_helpers import cleanup_isolation, cleanup_scratch, isolation_for_test

pytestmark = pytest.mark.docker

GPUS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
WAIT = 20.0


class OffsetClock:
    """Wall clock shifted by ``offset`` seconds: a restart "later" without waiting."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


class LeaseEnv:
    """A node id, state dir and update log shared by the managers of one test."""

    def __init__(
        self,
        client: docker.DockerClient,
        state_dir: Path,
        image: str,
        isolation: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.image = image
        self.node_id = f"test-{uuid.uuid4().hex[:10]}"
        self.state_dir = state_dir
        self.gpus = list(GPUS)
        self.updates: list[LeaseUpdate] = []
        self._changed = asyncio.Condition()
        self.config = AgentConfig.model_validate(
            {
                "node": {"state_dir": str(state_dir)},
                "runtime": {"stop_grace": "1s"},
                "isolation": isolation_for_test(**(isolation or {})),
            }
        )
        self.runs: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def on_update(self, update: LeaseUpdate) -> None:
        async with self._changed:
            self.updates.append(update)
            self._changed.notify_all()

    def manager(
        self,
        clock: OffsetClock | None = None,
        on_pull: PullObserver | None = None,
        gpu_gate: Callable[[], str | None] | None = None,
        before_cleanup: Callable[[LeaseUpdate], Awaitable[None]] | None = None,
    ) -> LeaseManager:
        runtime = DockerRuntime(
            self.client,
            self.config.runtime,
            self.node_id,
            self.state_dir / "scratch",
            on_pull=on_pull,
            isolation=self.config.isolation,
        )
        return LeaseManager(
            self.config,
            runtime,
            StateDB.in_state_dir(self.state_dir),
            GpuAllocator(),
            self.node_id,
            lambda: list(self.gpus),
            self.on_update,
            simulated_gpus=True,
            clock=clock or OffsetClock(),
            host=HostCapacity(memory_bytes=64 * 1024**3, cpus=64),
            gpu_gate=gpu_gate,
            before_cleanup=before_cleanup,
        )

    async def start(self, manager: LeaseManager) -> asyncio.Task[None]:
        await manager.reconcile()
        stop = asyncio.Event()
        task = asyncio.create_task(manager.run(stop))
        self.runs.append((stop, task))
        return task

    def states(self, lease_id: str) -> list[LeaseState]:
        return [u.state for u in self.updates if u.lease_id == lease_id]

    def last(self, lease_id: str) -> LeaseUpdate:
        return [u for u in self.updates if u.lease_id == lease_id][-1]

    async def wait_state(
        self, lease_id: str, state: LeaseState, limit: float = WAIT
    ) -> LeaseUpdate:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: state in self.states(lease_id)), limit
            )
        return next(u for u in self.updates if u.lease_id == lease_id and u.state is state)

    def containers(self, **extra_labels: str) -> list[Any]:
        labels = [f"{LABEL_NODE}={self.node_id}", *(f"{k}={v}" for k, v in extra_labels.items())]
        return self.client.containers.list(all=True, filters={"label": labels})

    def networks(self, spares: bool = True) -> list[Any]:
        found = self.client.networks.list(filters={"label": f"{LABEL_NODE}={self.node_id}"})
        if spares:
            return list(found)
        return [n for n in found if LABEL_SPARE not in (n.attrs.get("Labels") or {})]

    def spec(self, script: str, **fields: Any) -> dict[str, Any]:
        return {"image": self.image, "command": ["sh", "-c", script], **fields}


@pytest.fixture
def lease_env_factory(
    docker_client: docker.DockerClient, busybox_image: str, tmp_path: Path
) -> Iterator[Callable[..., LeaseEnv]]:
    envs: list[LeaseEnv] = []

    def make(**isolation: Any) -> LeaseEnv:
        env = LeaseEnv(docker_client, tmp_path / f"state{len(envs)}", busybox_image, isolation)
        envs.append(env)
        return env

    yield make
    for env in envs:
        for container in env.containers():
            container.remove(force=True)
        cleanup_isolation(env.client, env.node_id, env.config.isolation)
        cleanup_scratch(env.state_dir / "scratch")


@pytest_asyncio.fixture
async def lease_env(lease_env_factory: Callable[..., LeaseEnv]) -> AsyncIterator[LeaseEnv]:
    env = lease_env_factory()
    yield env
    for stop, task in env.runs:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.asyncio
async def test_lease_runs_to_succeeded_and_is_cleaned_up(lease_env: LeaseEnv) -> None:
    """A zero exit goes assigned→pulling→starting→running→succeeded; container and scratch go."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("ok-1", lease_env.spec("echo hello from the lease"))
    await lease_env.wait_state("ok-1", LeaseState.SUCCEEDED)
    assert lease_env.states("ok-1") == [
        LeaseState.ASSIGNED,
        LeaseState.PULLING,
        LeaseState.STARTING,
        LeaseState.RUNNING,
        LeaseState.SUCCEEDED,
    ]
    assert [u.seq for u in lease_env.updates] == [1, 2, 3, 4, 5]
    assert lease_env.containers() == []
    assert not (lease_env.state_dir / "scratch" / "gpuagent-ok-1").exists()
    record = StateDB.in_state_dir(lease_env.state_dir).get("ok-1")
    assert record is not None and record.state is LeaseState.SUCCEEDED
    assert record.exit_code == 0 and "hello from the lease" in record.log_tail
    # The terminal update carries it too: the coordinator keeps it for the buyer.
    assert "hello from the lease" in lease_env.last("ok-1").log_tail


@pytest.mark.asyncio
async def test_nonzero_exit_fails_with_exit_code_and_log_tail(lease_env: LeaseEnv) -> None:
    """A non-zero exit is failed, carrying the exit code and the output's last lines."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("bad-1", lease_env.spec("echo about to fail >&2; exit 3"))
    update = await lease_env.wait_state("bad-1", LeaseState.FAILED)
    assert update.exit_code == 3
    assert "exited with code 3" in update.reason
    assert "about to fail" in update.log_tail
    assert lease_env.containers() == []


@pytest.mark.asyncio
async def test_a_dead_container_is_not_metered_while_its_end_is_recorded(
    lease_env: LeaseEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From Docker's die event on, the lease is out of ``running_leases()`` (what the
    usage sampler bills) even while the agent is still recording how it ended: a
    sampler tick in that window (slow disk, loaded host) must not bill dead time."""
    recording = asyncio.Event()
    release = asyncio.Event()
    real_tail = DockerRuntime.logs_tail

    async def slow_tail(self: DockerRuntime, container_id: str, lines: int = 20) -> str:
        recording.set()
        await release.wait()
        return await real_tail(self, container_id, lines)

    monkeypatch.setattr(DockerRuntime, "logs_tail", slow_tail)
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("die-1", lease_env.spec("sleep 300"))
    running = await lease_env.wait_state("die-1", LeaseState.RUNNING)
    assert [r.lease_id for r in manager.running_leases()] == ["die-1"]

    await asyncio.to_thread(lease_env.client.containers.get(running.container_id).kill)
    await asyncio.wait_for(recording.wait(), WAIT)  # the end is being recorded
    assert [v.state for v in manager.snapshot().leases] == [LeaseState.RUNNING]
    assert manager.running_leases() == []
    release.set()
    update = await lease_env.wait_state("die-1", LeaseState.FAILED)
    assert update.exit_code == 137


@pytest.mark.asyncio
async def test_cancel_stops_a_hardened_running_container(lease_env: LeaseEnv) -> None:
    """A running lease runs hardened (caps, no-new-privileges, limits, labels, no device
    request in simulated mode) on a network of its own (labelled, ICC off, subnet from the
    pool, not the default bridge), and a cancel stops and removes both."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("c-1", lease_env.spec("sleep 300", gpu_count=1, memory_bytes="64MiB"))
    running = await lease_env.wait_state("c-1", LeaseState.RUNNING)
    attrs = lease_env.client.containers.get(running.container_id).attrs
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["Privileged"] is False
    assert host["PidsLimit"] == lease_env.config.runtime.pids_limit
    assert host["Memory"] == 64 * 1024**2
    assert host["NanoCpus"] == 1_000_000_000
    assert not host.get("DeviceRequests")
    # A spare made ahead, or one made for this lease: its container names it.
    name = attrs["Config"]["Labels"][LABEL_NETWORK]
    assert host["NetworkMode"] == name
    assert list(attrs["NetworkSettings"]["Networks"]) == [name]
    network = lease_env.client.networks.get(name).attrs
    assert network["Labels"][LABEL_NODE] == lease_env.node_id
    assert network["Labels"].get(LABEL_LEASE, "c-1") == "c-1"
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    subnet = ipaddress.ip_network(network["IPAM"]["Config"][0]["Subnet"])
    assert subnet.subnet_of(lease_env.config.isolation.subnet_pool)  # type: ignore[arg-type]
    assert [m["Destination"] for m in attrs["Mounts"]] == ["/scratch"]
    assert attrs["Config"]["Labels"][LABEL_GPUS] == "GPU-aaaa"
    assert "NVIDIA_VISIBLE_DEVICES=GPU-aaaa" in attrs["Config"]["Env"]
    assert attrs["Name"] == "/gpuagent-c-1"

    await manager.cancel("c-1", "buyer asked")
    update = await lease_env.wait_state("c-1", LeaseState.CANCELLED)
    assert update.reason == "buyer asked"
    assert lease_env.containers() == []
    assert lease_env.networks(spares=False) == []
    assert name not in [n.name for n in lease_env.networks()]  # never handed out again
    assert manager.snapshot().allocations == {}


@pytest.mark.asyncio
async def test_lease_past_its_expiry_is_stopped_as_expired(lease_env: LeaseEnv) -> None:
    """A lease whose expires_at passes is stopped with the grace period and reported expired."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("exp-1", lease_env.spec("sleep 300"), expires_at=time.time() + 1.5)
    await lease_env.wait_state("exp-1", LeaseState.RUNNING)
    update = await lease_env.wait_state("exp-1", LeaseState.EXPIRED)
    assert "expired at" in update.reason
    assert lease_env.containers() == []


@pytest.mark.asyncio
async def test_memory_overrun_is_reported_as_oom(lease_env: LeaseEnv) -> None:
    """A container that exceeds its memory limit fails with an out-of-memory reason."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    hog = 'x=a; while true; do x="$x$x"; done'
    await manager.assign("oom-1", lease_env.spec(hog, memory_bytes="16MiB"))
    update = await lease_env.wait_state("oom-1", LeaseState.FAILED)
    assert update.reason.startswith("out of memory")
    assert update.exit_code == 137


@pytest.mark.asyncio
async def test_an_image_is_pulled_from_a_registry_and_the_pull_is_measured(
    lease_env: LeaseEnv,
) -> None:
    """An image the host does not have is pulled from a (loopback) registry before the
    lease starts: pulling is reported, the lease runs the pulled image, and the pull's
    duration and the bytes it downloaded (the compressed layer) reach the observer."""
    pulls: list[tuple[float, int]] = []
    manager = lease_env.manager(on_pull=lambda seconds, size: pulls.append((seconds, size)))
    await lease_env.start(manager)
    with test_registry.serving() as registry:
        try:
            spec = {"image": registry.image, "command": ["sh", "-c", "echo ran the pulled image"]}
            await manager.assign("pulled-1", spec)
            update = await lease_env.wait_state("pulled-1", LeaseState.SUCCEEDED, 60)
        finally:
            with contextlib.suppress(docker.errors.DockerException):
                lease_env.client.images.remove(registry.image, force=True)
    assert lease_env.states("pulled-1")[:3] == [
        LeaseState.ASSIGNED,
        LeaseState.PULLING,
        LeaseState.STARTING,
    ]
    assert update.exit_code == 0
    assert "ran the pulled image" in update.log_tail
    assert registry.blob_requests, "the engine never fetched a layer"
    assert len(pulls) == 1
    seconds, size = pulls[0]
    assert seconds > 0
    assert size == registry.layer_bytes


@pytest.mark.asyncio
async def test_image_pull_failure_fails_the_lease_with_reason(lease_env: LeaseEnv) -> None:
    """An image that is not local and cannot be pulled fails the lease, naming the pull."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    await manager.assign("pull-1", {"image": "localhost:1/nowhere/image:1.0"})
    update = await lease_env.wait_state("pull-1", LeaseState.FAILED)
    assert "pull of localhost:1/nowhere/image:1.0 failed" in update.reason
    assert lease_env.containers() == []


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("privileged", {"privileged": True}, "privileged"),
    ("host-net", {"host_network": True}, "host_namespace"),
    ("net-mode", {"network_mode": "host"}, "host_namespace"),
    ("pid", {"pid_mode": "host"}, "host_namespace"),
    ("ipc", {"ipc_mode": "host"}, "host_namespace"),
    ("userns", {"userns_mode": "host"}, "host_namespace"),
    ("hostpath", {"volumes": [{"host_path": "/etc", "container_path": "/x"}]}, "host_path"),
    (
        "sock",
        {"volumes": [{"host_path": "/var/run/docker.sock", "container_path": "/s"}]},
        "docker_socket",
    ),
    ("devices", {"devices": [{"host_path": "/dev/mem", "container_path": "/dev/mem"}]}, "devices"),
    ("cap", {"cap_add": ["SYS_ADMIN"]}, "capability"),
    ("gpus", {"gpu_count": 4}, "insufficient_gpus"),
    ("huge-gpus", {"gpu_count": 10**9}, "invalid_spec"),
    ("memory", {"memory_bytes": "300GiB"}, "exceeds_host_limit"),
    ("neg-memory", {"memory_bytes": -1}, "invalid_spec"),
    ("env-nul", {"env": {"A": "x\x00y"}}, "invalid_env"),
    ("env-int", {"env": {"A": 1}}, "invalid_env"),
    ("env-name", {"env": {"A=B": "x"}}, "invalid_env"),
    ("env-nvidia", {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "reserved_env"),
    ("unknown", {"binds": ["/:/host"]}, "unknown_field"),
    ("image", {"image": "Not A Valid Image"}, "invalid_image"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "fields", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_spec_is_rejected_before_docker(
    lease_env: LeaseEnv, name: str, fields: dict[str, Any], code: str
) -> None:
    """Each forbidden field or absurd value is rejected with its reason; no container exists."""
    manager = lease_env.manager()
    await manager.assign(f"h-{name}", lease_env.spec("true", **fields))
    # Updates are delivered after assign() returns, outside the lease lock.
    update = await lease_env.wait_state(f"h-{name}", LeaseState.REJECTED)
    assert update.reason.startswith(f"{code}: ")
    assert lease_env.containers() == []
    with pytest.raises(docker.errors.NotFound):
        lease_env.client.containers.get(container_name(f"h-{name}"))


@pytest.mark.asyncio
async def test_leases_never_share_a_gpu_and_cordoned_gpus_are_skipped(lease_env: LeaseEnv) -> None:
    """Concurrent leases get disjoint GPUs; a cordoned GPU goes to nobody; when none is
    left the next lease is rejected."""
    lease_env.gpus = ["GPU-aaaa", "GPU-cccc"]  # GPU-bbbb cordoned / unhealthy
    manager = lease_env.manager()
    await lease_env.start(manager)
    await asyncio.gather(
        manager.assign("g-1", lease_env.spec("sleep 300", gpu_count=1)),
        manager.assign("g-2", lease_env.spec("sleep 300", gpu_count=1)),
    )
    first = await lease_env.wait_state("g-1", LeaseState.RUNNING)
    second = await lease_env.wait_state("g-2", LeaseState.RUNNING)
    assert {*first.gpu_uuids, *second.gpu_uuids} == {"GPU-aaaa", "GPU-cccc"}
    labels = {c.labels[LABEL_GPUS] for c in lease_env.containers(**{LABEL_MANAGED: "true"})}
    assert labels == {"GPU-aaaa", "GPU-cccc"}
    await manager.assign("g-3", lease_env.spec("sleep 300", gpu_count=1))
    rejected = await lease_env.wait_state("g-3", LeaseState.REJECTED)
    assert rejected.reason.startswith("insufficient_gpus")
    # Which lease got which GPU depends on the order the two starts ran in.
    assert manager.snapshot().allocations == {
        **dict.fromkeys(first.gpu_uuids, "g-1"),
        **dict.fromkeys(second.gpu_uuids, "g-2"),
    }


@pytest.mark.asyncio
async def test_same_lease_assigned_twice_runs_once(lease_env: LeaseEnv) -> None:
    """A repeated assignment (concurrent or later) creates no second container or update."""
    manager = lease_env.manager()
    await lease_env.start(manager)
    spec = lease_env.spec("sleep 300")
    await asyncio.gather(manager.assign("d-1", spec), manager.assign("d-1", spec))
    await lease_env.wait_state("d-1", LeaseState.RUNNING)
    await manager.assign("d-1", spec)
    assert len(lease_env.containers()) == 1
    assert lease_env.states("d-1").count(LeaseState.ASSIGNED) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("version", "accepted"), [("1.17.7", False), ("1.17.8", True)])
async def test_toolkit_floor_decides_whether_gpu_leases_are_accepted(
    lease_env: LeaseEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
    accepted: bool,
) -> None:
    """A fake `nvidia-ctk --version` on PATH: below 1.17.8 a GPU lease is rejected with
    toolkit_vulnerable and the upgrade as the fix, at 1.17.8 it runs; a CPU-only lease
    runs either way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-ctk"
    fake.write_text(
        f"#!/bin/sh\necho 'NVIDIA Container Toolkit CLI version {version}'\necho 'commit: 0f0f'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    gate = ToolkitGate(features_source=dict)
    await asyncio.to_thread(gate.refresh)
    manager = lease_env.manager(gpu_gate=gate.refusal)
    await lease_env.start(manager)
    await manager.assign("gpu", lease_env.spec("true", gpu_count=1))
    await manager.assign("cpu", lease_env.spec("true"))
    await lease_env.wait_state("cpu", LeaseState.SUCCEEDED)
    if accepted:
        await lease_env.wait_state("gpu", LeaseState.SUCCEEDED)
    else:
        update = await lease_env.wait_state("gpu", LeaseState.REJECTED)
        assert update.reason.startswith("toolkit_vulnerable: ")
        assert version in update.reason and "1.17.8" in update.reason


@pytest.mark.asyncio
async def test_a_slow_update_consumer_does_not_stall_lease_transitions(
    lease_env: LeaseEnv,
) -> None:
    """Updates are published and delivered outside the lease lock (issue #19): while the
    consumer is stuck on the first update (a slow gRPC or outbox write), the lease still
    runs to its end and another lease is still assigned; then every update arrives, in
    order. Before, the first assign() waited on the consumer under the lease's lock."""
    release = asyncio.Event()
    first = asyncio.Event()
    record = lease_env.on_update

    async def slow(update: LeaseUpdate) -> None:
        first.set()
        await release.wait()
        await record(update)

    lease_env.on_update = slow  # type: ignore[method-assign]
    manager = lease_env.manager()
    await lease_env.start(manager)
    await asyncio.wait_for(manager.assign("slow-1", lease_env.spec("true")), WAIT)
    await asyncio.wait_for(first.wait(), WAIT)
    await asyncio.wait_for(manager.assign("slow-2", lease_env.spec("true")), WAIT)
    db = StateDB.in_state_dir(lease_env.state_dir)

    def ended(lease_id: str) -> bool:
        stored = db.get(lease_id)
        return stored is not None and stored.state.terminal

    # The state DB is the only record while the updates wait: polled, no event to await.
    await until(lambda: ended("slow-1") and ended("slow-2"), WAIT, "both leases ended")
    assert lease_env.updates == []  # nothing delivered yet: the consumer is still stuck
    release.set()
    for lease_id in ("slow-1", "slow-2"):
        await lease_env.wait_state(lease_id, LeaseState.SUCCEEDED)
        assert lease_env.states(lease_id)[0] is LeaseState.ASSIGNED
        assert lease_env.states(lease_id)[-1] is LeaseState.SUCCEEDED
        seqs = [u.seq for u in lease_env.updates if u.lease_id == lease_id]
        assert seqs == sorted(seqs)
