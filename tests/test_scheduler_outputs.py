"""The coordinator's side of lease outputs: a commitment is stored only when it is the
sending node's signed word on that very lease (real scheduler, real gRPC, loopback)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.json_format import MessageToDict

from gpuagent.outputs import CHUNK_BYTES, output_commitment_signing_bytes
from gpuagent.v1 import leases_pb2
from scheduler import outputs_store
from scheduler.cmd_leases import output_lines
from scheduler.leases_service import SpecError, validate_spec
from tests.coordinator_harness import db_rows, until
from tests.test_scheduler_leases import Env, FakeAgent, S, accept, make_env

DIGEST = bytes(range(32))


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with make_env(tmp_path) as e:
        yield e


def _commitment(
    agent: FakeAgent, lease_id: str, *, sign: object = None, **fields: object
) -> leases_pb2.OutputCommitment:
    values: dict[str, object] = {
        "lease_id": lease_id,
        "node_id": agent.node_id,
        "digest": DIGEST,
        "size": 10240,
        "chunk_bytes": CHUNK_BYTES,
        "file_count": 2,
        "missing": ["none/*.bin"],
        "retained_until_unix_nanos": 1_900_000_000 * 10**9,
    }
    values.update(fields)
    c = leases_pb2.OutputCommitment(**values)  # type: ignore[arg-type]
    signer = sign or agent.link.identity.sign
    c.signature = signer(  # type: ignore[operator]
        output_commitment_signing_bytes(c.lease_id, c.node_id, c.digest, c.size, c.chunk_bytes)
    )
    return c


async def _ended_with(env: Env, agent: FakeAgent, commitment_for: object) -> leases_pb2.Lease:
    lease = await env.submit(outputs=["results"])
    await env.wait_state(lease.lease_id, S.LEASE_STATE_ASSIGNED)
    commitment = commitment_for(lease.lease_id)  # type: ignore[operator]
    await agent.update(lease.lease_id, S.LEASE_STATE_RUNNING)
    seq = await agent.update(
        lease.lease_id, S.LEASE_STATE_SUCCEEDED, exit_code=0, outputs=commitment
    )
    await until(lambda: (lease.lease_id, seq) in agent.acks, what="terminal update acked")
    return await env.wait_state(lease.lease_id, S.LEASE_STATE_SUCCEEDED)


def _stored(env: Env) -> list[tuple[object, ...]]:
    return db_rows(env.server.config, "SELECT lease_id, node_id, size FROM lease_outputs")


@pytest.mark.asyncio
async def test_a_signed_commitment_is_stored_and_returned_with_the_lease(env: Env) -> None:
    """The node's commitment is stored once, returned by Get and List, printed by
    lease show and carried by --json; get_commitment gives it to the other parts."""
    agent = await env.agent("a", accept)
    done = await _ended_with(env, agent, lambda lid: _commitment(agent, lid))
    assert done.outputs.digest == DIGEST and done.outputs.size == 10240
    assert done.outputs.node_id == agent.node_id and list(done.outputs.missing) == ["none/*.bin"]
    assert _stored(env) == [(done.lease_id, agent.node_id, 10240)]
    listed = await env.stub.List(leases_pb2.ListLeasesRequest(), timeout=5)
    assert [x.outputs.digest for x in listed.leases] == [DIGEST]
    got = await outputs_store.get_commitment(env.server.db, done.lease_id)
    assert got is not None and got.signature == done.outputs.signature
    text = "\n".join(output_lines(done))
    assert DIGEST.hex() in text and "2 file(s)" in text and "none/*.bin" in text
    assert "retained until: 2030-03-17" in text
    assert "GiB-hours" in text
    as_json = json.loads(json.dumps(MessageToDict(done)))
    assert as_json["outputs"]["fileCount"] == 2


@pytest.mark.asyncio
async def test_a_commitment_with_a_wrong_signature_is_refused(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed by another key: not stored, and the agent is told why with a
    ProtocolError; the lease still ends (it must not wedge)."""
    caplog.set_level(logging.WARNING, logger="agent.link.session")
    agent = await env.agent("a", accept)
    other = Ed25519PrivateKey.generate()
    done = await _ended_with(env, agent, lambda lid: _commitment(agent, lid, sign=other.sign))
    assert not done.HasField("outputs")
    assert _stored(env) == []
    await until(lambda: bool(_details(caplog)), what="the agent is told")
    assert any("outputs.signature does not verify" in d for d in _details(caplog))


def _details(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "detail", ""))
        for r in caplog.records
        if r.getMessage() == "coordinator reported a protocol error"
    ]


@pytest.mark.asyncio
async def test_a_commitment_naming_another_lease_or_node_is_refused(env: Env) -> None:
    """A valid signature over another lease's id (a replayed commitment) or another
    node's id is refused: the commitment must be this node's word on this lease."""
    agent = await env.agent("a", accept)
    replayed = await _ended_with(env, agent, lambda lid: _commitment(agent, "some-other-lease"))
    assert not replayed.HasField("outputs")
    foreign = await _ended_with(env, agent, lambda lid: _commitment(agent, lid, node_id="n-x"))
    assert not foreign.HasField("outputs")
    assert _stored(env) == []


def test_check_names_what_is_wrong() -> None:
    """outputs_store.check: each refusal names the field."""
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    c = leases_pb2.OutputCommitment(
        lease_id="l", node_id="n", digest=DIGEST, size=1, chunk_bytes=CHUNK_BYTES
    )
    c.signature = key.sign(output_commitment_signing_bytes("l", "n", DIGEST, 1, CHUNK_BYTES))
    outputs_store.check(c, lease_id="l", node_id="n", public_key=public)
    for change, words in (
        ({"size": 2}, "signature"),
        ({"digest": b"x"}, "outputs.digest"),
        ({"chunk_bytes": 4096}, "outputs.chunk_bytes"),
    ):
        bad = leases_pb2.OutputCommitment()
        bad.CopyFrom(c)
        for name, value in change.items():
            setattr(bad, name, value)
        with pytest.raises(outputs_store.BadCommitment, match=words):
            outputs_store.check(bad, lease_id="l", node_id="n", public_key=public)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"outputs": ["../x"]}, "spec.outputs[0]: '../x': '..'"),
        ({"outputs": ["/etc/passwd"]}, "spec.outputs[0]: '/etc/passwd' is outside /scratch"),
        ({"outputs": [""]}, "spec.outputs[0]: empty"),
        ({"outputs": ["a"] * 65}, "spec.outputs: at most 64"),
        ({"output_max_bytes": 5}, "spec.output_max_bytes: set, but no outputs"),
        ({"outputs": ["a"], "output_max_bytes": 2**60}, "spec.output_max_bytes: at most"),
        ({"outputs": ["a"], "output_retention_seconds": 10**9}, "output_retention_seconds"),
        ({"outputs_required": True}, "spec.outputs_required: set, but no outputs"),
    ],
)
def test_hostile_output_specs_are_refused_at_submit(fields: dict[str, object], words: str) -> None:
    """The scheduler's submit check applies the shared rules, naming the key."""
    spec = leases_pb2.LeaseSpec(image="busybox", gpu_count=1, **fields)  # type: ignore[arg-type]
    with pytest.raises(SpecError) as caught:
        validate_spec(spec)
    assert words in str(caught.value)


def test_lease_file_keys_become_the_wire_spec(tmp_path: Path) -> None:
    """outputs / output_max / output_retention / outputs_required in the buyer's YAML;
    a bad path is refused naming the key before anything is sent."""
    from gpuagent.configload import ConfigError
    from scheduler.cmd_leases import build_request, register

    good = tmp_path / "lease.yaml"
    good.write_text(
        "image: busybox\noutputs: [results/*.csv, /scratch/model.pt]\n"
        "output_max: 1GiB\noutput_retention: 2d\noutputs_required: true\n"
    )
    # The real submit parser, so a flag added to submit cannot be missed here.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["submit", str(good)])
    spec = build_request(args).spec
    assert list(spec.outputs) == ["results/*.csv", "/scratch/model.pt"]
    assert spec.output_max_bytes == 1024**3 and spec.output_retention_seconds == 172800
    assert spec.outputs_required
    validate_spec(spec)
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: busybox\noutputs: [ok, ../../etc]\n")
    args.file = bad
    with pytest.raises(ConfigError, match=r"outputs: \[1\]: '../../etc'"):
        build_request(args)
