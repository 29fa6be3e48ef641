"""Scenarios 9 and 10: a coordinator that misbehaves, against the real agent process.

The agent runs as ``gpu-agent run`` (simulated GPUs, real Docker); the coordinator
is ``FakeCoordinator``, which sends what the real scheduler never would: duplicate
and reordered lease messages, hostile specs, malformed and oversized frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuagent.v1 import common_pb2, coordinator_pb2, leases_pb2

from .fake_coordinator import FakeCoordinator, wait_update
from .harness import IMAGE, NODE_LABEL, Cluster, report, wait_for

pytestmark = pytest.mark.faults

S = common_pb2.LeaseState
TERMINAL = {
    S.LEASE_STATE_SUCCEEDED,
    S.LEASE_STATE_FAILED,
    S.LEASE_STATE_CANCELLED,
    S.LEASE_STATE_EXPIRED,
    S.LEASE_STATE_LOST,
    S.LEASE_STATE_REJECTED,
}


@pytest.fixture
def agent_on_fake(tmp_path: Path, busybox_image: Any) -> Iterator[tuple[Cluster, FakeCoordinator]]:
    """The real agent connected to a scripted coordinator (no scheduler process)."""
    c = Cluster(tmp_path)
    fake = FakeCoordinator(c.sched_dir / "tls")
    c.grpc_port = fake.port
    try:
        c.start_agent()
        fake.wait_session()
        c.node_id = fake.node_id
        wait_for("the agent's status to say connected", c.connected, 30, 0.2)
        yield c, fake
    finally:
        c.stop()
        fake.close()


def _spec(**fields: Any) -> leases_pb2.LeaseSpec:
    base: dict[str, Any] = {"image": IMAGE, "command": ["sleep", "600"], "gpu_count": 1}
    base.update(fields)
    return leases_pb2.LeaseSpec(**base)


def _assign(lease_id: str, spec: leases_pb2.LeaseSpec, **fields: Any) -> Any:
    return coordinator_pb2.CoordinatorMessage(
        lease_assign=leases_pb2.LeaseAssign(lease_id=lease_id, spec=spec, **fields)
    )


def _cancel(lease_id: str, reason: str = "test") -> Any:
    return coordinator_pb2.CoordinatorMessage(
        lease_cancel=leases_pb2.LeaseCancel(lease_id=lease_id, reason=reason, grace_seconds=1)
    )


def _lease_containers(node_id: str) -> dict[str, str]:
    """Docker's view: lease id -> container id, for every container of this node."""
    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": f"{NODE_LABEL}={node_id}"})
        return {c.labels.get("io.gpuagent.lease-id", ""): c.id or "" for c in found}
    finally:
        client.close()


def _alive(c: Cluster) -> None:
    assert c.agent is not None
    assert c.agent.poll() is None, f"the agent exited ({c.agent.returncode}); see {c.agent_log}"


def test_duplicate_assign_cancel_before_assign_and_unknown_gpu_are_answered(
    agent_on_fake: tuple[Cluster, FakeCoordinator], record_property: Any
) -> None:
    """The same LeaseAssign twice runs one container and reports each state once; a
    LeaseCancel that overtakes its LeaseAssign ends the lease CANCELLED with a reason
    and the late assign starts nothing; an assign naming a GPU the node does not have
    is REJECTED with a reason that names it."""
    c, fake = agent_on_fake

    # 1. Pushed twice (a coordinator re-sending after a reconnect, say).
    fake.send(_assign("dup-1", _spec()))
    fake.send(_assign("dup-1", _spec()))
    wait_update(fake, "dup-1", lambda u: u.state == S.LEASE_STATE_RUNNING, "dup-1 running")
    wait_for(
        "the duplicate logged",
        lambda: [
            e
            for e in c.log_events("duplicate lease assignment ignored")
            if e.get("lease_id") == "dup-1"
        ],
        10,
    )
    assert list(_lease_containers(c.node_id)) == ["dup-1"]
    seqs = [u.update_seq for u in fake.updates("dup-1")]
    assert seqs == list(range(1, len(seqs) + 1)), f"each state reported once, in order: {seqs}"
    states = [u.state for u in fake.updates("dup-1")]
    assert states.count(S.LEASE_STATE_ASSIGNED) == 1

    # 2. The cancel arrives before the assign.
    fake.send(_cancel("early-1", "buyer changed their mind"))
    early = wait_update(fake, "early-1", lambda u: u.state in TERMINAL, "early-1 answered")
    assert early.state == S.LEASE_STATE_CANCELLED
    assert "cancelled before it was assigned" in early.reason
    fake.send(_assign("early-1", _spec()))
    wait_for(
        "the late assign logged",
        lambda: c.log_events("assignment of a lease cancelled before it arrived ignored"),
        10,
    )
    assert "early-1" not in _lease_containers(c.node_id)
    assert [u.state for u in fake.updates("early-1")] == [S.LEASE_STATE_CANCELLED]

    # 3. A GPU the node does not have.
    fake.send(_assign("ghost-1", _spec(), gpu_uuids=["GPU-00000000-dead-beef-0000-000000000000"]))
    ghost = wait_update(fake, "ghost-1", lambda u: u.state in TERMINAL, "ghost-1 answered")
    assert ghost.state == S.LEASE_STATE_REJECTED
    assert "GPU-00000000-dead-beef" in ghost.reason
    assert "ghost-1" not in _lease_containers(c.node_id)

    # The first lease was untouched by all of this, and the agent is still connected.
    fake.send(_cancel("dup-1"))
    end = wait_update(fake, "dup-1", lambda u: u.state in TERMINAL, "dup-1 cancelled")
    assert end.state == S.LEASE_STATE_CANCELLED
    _alive(c)
    assert fake.sessions == 1
    report(
        record_property,
        "9-duplicate-reorder-unknown-gpu",
        early_cancel_reason=early.reason,
        unknown_gpu_reason=ghost.reason,
    )


HOSTILE_SPECS: dict[str, dict[str, Any]] = {
    "privileged": {"privileged": True},
    "host-network": {"host_network": True},
    "host-root-mount": {"volumes": [leases_pb2.VolumeMount(host_path="/", container_path="/h")]},
    "docker-socket": {
        "volumes": [
            leases_pb2.VolumeMount(
                host_path="/var/run/docker.sock", container_path="/var/run/docker.sock"
            )
        ]
    },
    "device-dev-mem": {
        "devices": [leases_pb2.DeviceMapping(host_path="/dev/mem", container_path="/dev/mem")]
    },
    "cap-sys-admin": {"cap_add": ["SYS_ADMIN"]},
    "cap-all": {"cap_add": ["ALL"]},
    "a-billion-gpus": {"gpu_count": 10**9},
    # uint64 on the wire: "negative memory" arrives as 2**64 - 1.
    "memory-minus-one": {"memory_bytes": 2**64 - 1},
    "nul-in-env": {"env": {"OK": "a\x00b"}},
    "nul-in-env-name": {"env": {"A\x00B": "x"}},
    "nul-in-command": {"command": ["sh", "-c", "echo\x00rm -rf /"]},
    "a-billion-cpus": {"cpus": 1e9},
}


def test_hostile_specs_are_rejected_with_a_reason_and_never_created(
    agent_on_fake: tuple[Cluster, FakeCoordinator], record_property: Any
) -> None:
    """Each hostile LeaseAssign is answered REJECTED with a non-empty reason; Docker
    never holds a container for any of them, and the agent keeps its session."""
    c, fake = agent_on_fake
    for index, fields in enumerate(HOSTILE_SPECS.values()):
        fake.send(_assign(f"hostile-{index}", _spec(**fields)))
    reasons: dict[str, str] = {}
    for index, name in enumerate(HOSTILE_SPECS):
        lease_id = f"hostile-{index}"
        update = wait_update(fake, lease_id, lambda u: u.state in TERMINAL, f"{name} answered")
        assert update.state == S.LEASE_STATE_REJECTED, (name, update)
        assert update.reason, name
        assert [u.state for u in fake.updates(lease_id)] == [S.LEASE_STATE_REJECTED], name
        reasons[name] = update.reason
    assert not _lease_containers(c.node_id)
    _alive(c)
    assert fake.sessions == 1
    report(record_property, "10-hostile-specs", cases=len(reasons), reasons=reasons)


def _hostile_messages() -> st.SearchStrategy[Any]:
    text = st.text(max_size=80)
    ids = st.one_of(text, st.sampled_from(["", "x" * 5000, "../../etc", "a\x00b", "fuzz-ok"]))
    spec = st.builds(
        leases_pb2.LeaseSpec,
        image=st.one_of(text, st.just(IMAGE)),
        command=st.lists(text, max_size=3),
        gpu_count=st.integers(0, 2**32 - 1),
        memory_bytes=st.integers(0, 2**64 - 1),
        cpus=st.floats(allow_nan=True, allow_infinity=True),
        privileged=st.booleans(),
        cap_add=st.lists(text, max_size=2),
    )
    typed = st.one_of(
        st.builds(
            lambda i, s, e: coordinator_pb2.CoordinatorMessage(
                lease_assign=leases_pb2.LeaseAssign(lease_id=i, spec=s, expires_at_unix_nanos=e)
            ),
            ids,
            spec,
            st.integers(-(2**63), 2**63 - 1),
        ),
        st.builds(
            lambda i, g: coordinator_pb2.CoordinatorMessage(
                lease_cancel=leases_pb2.LeaseCancel(lease_id=i, grace_seconds=g)
            ),
            ids,
            st.integers(0, 2**32 - 1),
        ),
        st.builds(
            lambda i, n: coordinator_pb2.CoordinatorMessage(
                lease_update_ack=leases_pb2.LeaseUpdateAck(lease_id=i, update_seq=n)
            ),
            ids,
            st.integers(0, 2**64 - 1),
        ),
        # Out of order: handshake messages mid-session.
        st.just(
            coordinator_pb2.CoordinatorMessage(
                welcome=coordinator_pb2.Welcome(session_id="again", node_id="someone-else")
            )
        ),
        st.just(
            coordinator_pb2.CoordinatorMessage(
                hello_challenge=coordinator_pb2.HelloChallenge(nonce=b"n", protocol_version="9.9")
            )
        ),
        st.builds(
            lambda ms: coordinator_pb2.CoordinatorMessage(
                params_update=coordinator_pb2.ParamsUpdate(
                    params=common_pb2.NodeParams(heartbeat_interval_ms=ms)
                )
            ),
            # Not below 100 ms: the agent does not bound this (docs/faults.md), and a
            # 1 ms heartbeat would only measure how busy the test host gets.
            st.integers(100, 2**32 - 1),
        ),
        st.just(coordinator_pb2.CoordinatorMessage()),  # no body at all
    )
    # Malformed: bytes that are not (or not quite) a CoordinatorMessage.
    raw = st.binary(min_size=1, max_size=256)
    return st.one_of(typed, raw)


def test_fuzzed_coordinator_stream_never_crashes_the_agent(
    agent_on_fake: tuple[Cluster, FakeCoordinator], record_property: Any
) -> None:
    """A hypothesis-generated stream of malformed, out-of-order and hostile messages,
    then one oversized frame: the agent process never exits, each broken session is
    followed by a reconnect, and afterwards it still runs a good lease."""
    c, fake = agent_on_fake
    sent = {"n": 0, "probes": 0}

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(_hostile_messages(), min_size=1, max_size=8))
    def burst(messages: list[Any]) -> None:
        wait_for("a live session", c.connected, 30, 0.1)
        before = fake.sessions
        for message in messages:
            fake.send(message)
            sent["n"] += 1
        # A cancel of a fresh id is answered (CANCELLED, "before it was assigned") only
        # once the agent has read everything queued before it on this session.
        sent["probes"] += 1
        probe = f"probe-{sent['probes']}"
        fake.send(_cancel(probe))
        wait_for(
            "the probe answered, or a new session",
            lambda: (_alive(c), bool(fake.updates(probe)) or fake.sessions > before)[1],
            30,
            0.05,
        )
        if not fake.updates(probe):
            # The burst broke the session (as malformed bytes must): ask again on the new one.
            wait_for("a live session", c.connected, 30, 0.1)
            fake.send(_cancel(probe))
            wait_update(fake, probe, lambda u: u.state in TERMINAL, f"{probe} answered")
        _alive(c)

    burst()
    sessions_before_big = fake.sessions
    fake.send(b"\x0a" + b"\xff" * 4 + b"\x7f" + b"x" * (5 * 1024 * 1024))  # > gRPC's 4 MiB
    wait_for(
        "a reconnect after the oversized frame", lambda: fake.sessions > sessions_before_big, 60
    )
    _alive(c)
    wait_for("a live session", c.connected, 30, 0.1)
    fake.send(_assign("after-fuzz", _spec()))
    wait_update(fake, "after-fuzz", lambda u: u.state == S.LEASE_STATE_RUNNING, "good lease runs")
    crashed = c.log_events("component failed")
    assert not crashed, crashed
    report(
        record_property,
        "10-fuzzed-stream",
        messages=sent["n"],
        probes=sent["probes"],
        sessions=fake.sessions,
    )
