"""Lease spec parsing, host policy checks, states, the GPU allocator and the state DB."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import RuntimeConfig
from agent.leases import GpuAllocator, LeaseRejected, LeaseState, RejectCode, StateDB
from agent.leases.allocator import AllocationError
from agent.leases.records import LeaseRecord, LeaseUpdate
from agent.leases.spec import FreeCapacity, GpuDescription, check_spec, parse_image, parse_spec
from agent.leases.states import InvalidTransition, check_transition

FREE = FreeCapacity(gpus=["GPU-1", "GPU-2"], memory_bytes=8 * 1024**3, cpus=8.0)


def _reject(
    raw: dict[str, object], policy: RuntimeConfig | None = None, free: FreeCapacity = FREE
) -> RejectCode:
    with pytest.raises(LeaseRejected) as info:
        check_spec(parse_spec(raw), policy or RuntimeConfig(), free)
    return info.value.rejection.code


def test_wire_spec_with_proto_field_names_and_string_numbers_parses() -> None:
    """MessageToDict output (uint64 as strings, empty defaults) parses to the same spec."""
    spec = parse_spec(
        {
            "image": "ghcr.io/acme/train@sha256:" + "a" * 64,
            "memory_bytes": "1073741824",
            "ports": [{"container_port": 8080, "protocol": ""}],
            "registry_auth": {"username": "", "password": "", "server": ""},
        }
    )
    assert spec.memory_bytes == 1024**3
    assert spec.ports[0].protocol == "tcp"
    assert spec.registry_auth is None


def test_registry_password_never_reaches_the_stored_spec() -> None:
    """Credentials are used for the pull only: not in the DB copy, not in repr."""
    spec = parse_spec(
        {"image": "busybox", "registry_auth": {"username": "u", "password": "hunter2"}}
    )
    assert "hunter2" not in str(spec.stored()) and "hunter2" not in repr(spec)


def test_image_references_split_like_docker() -> None:
    """Registry host only when the first part looks like one; digests win over tags."""
    assert parse_image("busybox").registry == "docker.io"
    assert parse_image("acme/x:1").registry == "docker.io"
    ref = parse_image("localhost:5000/a/b:2@sha256:" + "0" * 64)
    assert (ref.registry, ref.repository, ref.pull_tag) == (
        "localhost:5000",
        "localhost:5000/a/b",
        "sha256:" + "0" * 64,
    )
    with pytest.raises(ValueError, match="not an image reference"):
        parse_image("UPPER/case")


def test_registry_allow_and_deny_lists_apply() -> None:
    """A denied registry, or one missing from a non-empty allow list, is refused by name."""
    deny = RuntimeConfig(denied_registries=["docker.io"])
    assert _reject({"image": "busybox"}, deny) is RejectCode.REGISTRY_DENIED
    allow = RuntimeConfig(allowed_registries=["*.acme.io"])
    assert _reject({"image": "quay.io/x/y"}, allow) is RejectCode.REGISTRY_DENIED
    check_spec(parse_spec({"image": "reg.acme.io/x/y"}), allow, FREE)


def test_allow_listed_capability_is_accepted_others_are_not() -> None:
    """cap_add is checked against runtime.allowed_capabilities; ALL never passes."""
    policy = RuntimeConfig(allowed_capabilities=["net_bind_service"])
    check_spec(parse_spec({"image": "busybox", "cap_add": ["CAP_NET_BIND_SERVICE"]}), policy, FREE)
    assert _reject({"image": "busybox", "cap_add": ["ALL"]}, policy) is RejectCode.CAPABILITY


def test_gpu_constraints_filter_by_model_and_memory() -> None:
    """gpu_model and gpu_min_memory_bytes count only GPUs that match."""
    details = {
        "GPU-1": GpuDescription("NVIDIA H100 80GB HBM3", 80 * 1024**3),
        "GPU-2": GpuDescription("NVIDIA RTX 4090", 24 * 1024**3),
    }
    free = FreeCapacity(
        gpus=["GPU-1", "GPU-2"], memory_bytes=8 * 1024**3, cpus=8, gpu_details=details
    )
    check_spec(
        parse_spec({"image": "x", "gpu_count": 1, "gpu_model": "h100"}), RuntimeConfig(), free
    )
    assert (
        _reject({"image": "x", "gpu_count": 2, "gpu_min_memory_bytes": "40GiB"}, free=free)
        is RejectCode.INSUFFICIENT_GPUS
    )


def test_memory_beyond_what_is_free_is_rejected() -> None:
    """Within the per-lease limit but more than the host has free: insufficient_memory."""
    assert _reject({"image": "x", "memory_bytes": "16GiB"}) is RejectCode.INSUFFICIENT_MEMORY


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=2)
        ),
    )
)
def test_arbitrary_input_is_parsed_or_rejected_never_crashes(raw: dict[str, object]) -> None:
    """Whatever the coordinator sends, the outcome is a spec or a LeaseRejected."""
    try:
        parse_spec(raw)
    except LeaseRejected as exc:
        assert exc.rejection.message


def test_overlong_reason_is_bounded() -> None:
    """A huge hostile value cannot make the rejection reason unbounded."""
    with pytest.raises(LeaseRejected) as info:
        parse_spec({"image": "x", "gpu_count": "9" * 100_000})
    assert len(info.value.rejection.message) <= 1024


def test_transitions_follow_the_lifecycle() -> None:
    """Forward steps and early endings are allowed; terminal states are final."""
    check_transition(LeaseState.STARTING, LeaseState.RUNNING)
    check_transition(LeaseState.PULLING, LeaseState.CANCELLED)
    with pytest.raises(InvalidTransition):
        check_transition(LeaseState.SUCCEEDED, LeaseState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(LeaseState.ASSIGNED, LeaseState.RUNNING)


def test_allocator_never_gives_a_gpu_twice_and_is_idempotent() -> None:
    """Disjoint allocations, same answer on repeat, a coordinator's taken GPU refused."""
    alloc = GpuAllocator()
    gpus = ["G0", "G1", "G2"]
    first = alloc.allocate("a", 2, gpus)
    assert alloc.allocate("a", 2, gpus) == first
    assert alloc.allocate("b", 1, gpus) == ("G2",)
    with pytest.raises(AllocationError):
        alloc.allocate("c", 1, gpus)
    alloc.release("a")
    with pytest.raises(AllocationError, match="not free"):
        alloc.allocate("c", 1, gpus, wanted=["G2"])
    assert alloc.allocate("c", 1, gpus, wanted=["G1"]) == ("G1",)


def test_statedb_persists_records_and_outbox_across_reopen(tmp_path: Path) -> None:
    """Records and unacked updates survive a reopen; acks prune; duplicates are refused."""
    db = StateDB.in_state_dir(tmp_path)
    record = LeaseRecord("l1", LeaseState.ASSIGNED, {"image": "x"}, 1.0, 1.0, ("G0",), update_seq=1)
    update = LeaseUpdate("l1", 1, LeaseState.ASSIGNED, 1.0, gpu_uuids=("G0",))
    assert db.insert_new(record, update)
    assert not db.insert_new(record, update)
    db.save(
        record.evolve(state=LeaseState.PULLING, update_seq=2),
        LeaseUpdate("l1", 2, LeaseState.PULLING, 2.0),
    )
    db.close()
    again = StateDB.in_state_dir(tmp_path)
    assert again.schema_version() == 1
    stored = again.get("l1")
    assert stored is not None and stored.state is LeaseState.PULLING and stored.gpu_uuids == ("G0",)
    assert [u.seq for u in again.pending_updates()] == [1, 2]
    assert again.ack_update("l1", 1) == 1
    assert [u.seq for u in again.pending_updates()] == [2]


def test_statedb_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    """A schema newer than this agent's fails with a message naming the file."""
    import sqlite3

    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    from agent.leases.statedb import StateDBError

    with pytest.raises(StateDBError, match="newer than this agent"):
        StateDB.in_state_dir(tmp_path)
