"""The scheduler's submit check and the agent's assign check apply one set of rules
(gpuagent/leaserules.py): what the agent would refuse, the buyer hears at submit."""

from __future__ import annotations

import pytest
from google.protobuf.json_format import MessageToDict

from agent.config import RuntimeConfig
from agent.leases import LeaseRejected
from agent.leases.spec import FreeCapacity, check_spec, parse_spec, validate_lease_id
from gpuagent import leaserules
from gpuagent.v1 import leases_pb2
from scheduler.leases_service import SpecError, validate_spec

FREE = FreeCapacity(gpus=[f"GPU-{i}" for i in range(128)], memory_bytes=2**40, cpus=512.0)


def _agent_refuses(spec: leases_pb2.LeaseSpec) -> bool:
    raw = MessageToDict(spec, preserving_proto_field_name=True)
    try:
        check_spec(parse_spec(raw), RuntimeConfig(max_gpus_per_lease=1024), FREE)
    except LeaseRejected:
        return True
    return False


def _scheduler_refuses(spec: leases_pb2.LeaseSpec) -> bool:
    try:
        validate_spec(spec)
    except SpecError:
        return True
    return False


@pytest.mark.parametrize(
    ("count", "refused"),
    [(1, False), (leaserules.MAX_GPUS_PER_LEASE, False), (leaserules.MAX_GPUS_PER_LEASE + 1, True)],
)
def test_gpu_count_limit_is_the_same_on_both_sides(count: int, refused: bool) -> None:
    """Was 64 at the scheduler and 1024 at the agent."""
    spec = leases_pb2.LeaseSpec(image="busybox:1.36", command=["true"], gpu_count=count)
    assert _scheduler_refuses(spec) is refused
    assert _agent_refuses(spec) is refused


@pytest.mark.parametrize("field", leaserules.REFUSED_FIELDS)
def test_every_field_the_agent_always_refuses_is_refused_at_submit(field: str) -> None:
    spec = leases_pb2.LeaseSpec(image="busybox:1.36", command=["true"], gpu_count=1)
    if field == "volumes":
        spec.volumes.add(host_path="/etc", container_path="/x")
    elif field == "devices":
        spec.devices.add(host_path="/dev/mem", container_path="/dev/mem")
    else:
        setattr(spec, field, True)
    assert _agent_refuses(spec)
    assert _scheduler_refuses(spec)


def test_wire_spec_hostile_fields_are_all_listed() -> None:
    """Every LeaseSpec field the proto marks "always rejected" (numbers 32 and up) is
    in the scheduler's list, so a new one cannot be forgotten at submit."""
    hostile = {f.name for f in leases_pb2.LeaseSpec.DESCRIPTOR.fields if f.number >= 32}
    assert hostile == set(leaserules.SCHEDULER_REFUSED_FIELDS)


@pytest.mark.parametrize(
    ("lease_id", "valid"),
    [("l-1", True), ("a" * 128, True), ("a" * 129, False), ("../x", False), ("-x", False)],
)
def test_lease_id_rule_is_the_same_on_both_sides(lease_id: str, valid: bool) -> None:
    assert bool(leaserules.LEASE_ID_RE.match(lease_id)) is valid
    if valid:
        assert validate_lease_id(lease_id) == lease_id
    else:
        with pytest.raises(LeaseRejected, match="must be 1-128 characters"):
            validate_lease_id(lease_id)
