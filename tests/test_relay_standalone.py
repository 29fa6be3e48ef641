"""`gpu-scheduler relay` as its own process: the coordinator (relay.mode external)
sends agents to its tunnel port, it reads routes and token hashes from the
coordinator's RelayDirectory with an admin token, and buyers reach the service
through it exactly as through the embedded relay."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.agent_stack import IMAGE, running_stack, wait_until
from gpuagent.outputs import ArchiveDigest
from gpuagent.v1 import common_pb2, leases_pb2, leases_pb2_grpc
from tests.images.pyservice import build_pyservice
from tests.test_relay_e2e import _buyer_channel, submit_service

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


def test_a_standalone_relay_serves_checks_tokens_and_sees_rotations() -> None:
    """Through the separate relay process: the right token answers 200, a wrong one
    401; after RotateEndpointToken the old token is refused once the route cache
    (relay.route_ttl) expires, and the new one works."""
    build_pyservice()
    with running_stack(standalone_relay=True) as stack:
        assert "relay" in stack.procs and stack.procs["relay"].poll() is None
        buyer = _buyer_channel(stack)
        try:
            service = submit_service(stack, buyer, "svc-standalone")
            url = f"http://127.0.0.1:{stack.relay_port}/hello"
            host = {"Host": "svc-standalone-8080.relay.localhost"}
            ok = httpx.get(
                url, headers={**host, "Authorization": f"Bearer {service.token}"}, timeout=10
            )
            assert (ok.status_code, ok.text) == (200, "hello from /hello")
            wrong = httpx.get(url, headers={**host, "Authorization": "Bearer gsp_x"}, timeout=10)
            assert wrong.status_code == 401
            new = (
                leases_pb2_grpc.LeasesStub(buyer)
                .RotateEndpointToken(
                    leases_pb2.RotateEndpointTokenRequest(lease_id="svc-standalone"), timeout=10
                )
                .token
            )

            def old_refused() -> bool:
                reply = httpx.get(
                    url, headers={**host, "Authorization": f"Bearer {service.token}"}, timeout=10
                )
                return reply.status_code == 401

            wait_until("for the old token to be refused", old_refused, 15)
            fresh = httpx.get(url, headers={**host, "Authorization": f"Bearer {new}"}, timeout=10)
            assert fresh.status_code == 200
            _outputs_through_the_standalone_relay(stack, buyer)
        finally:
            buyer.close()


def _outputs_through_the_standalone_relay(stack: object, buyer: object) -> None:
    """A batch lease's outputs come through the separate relay too: it checks the
    buyer's ticket with the coordinator (RelayDirectory.OutputRoute) and the bytes
    match the node's commitment; without the ticket, 401."""
    stub = leases_pb2_grpc.LeasesStub(buyer)  # type: ignore[arg-type]
    stub.Submit(
        leases_pb2.SubmitLeaseRequest(
            spec=leases_pb2.LeaseSpec(
                image=IMAGE,
                command=["sh", "-c", "mkdir -p /scratch/out && echo far > /scratch/out/r.txt"],
                gpu_count=1,
                cpus=0.1,
                memory_bytes=32 * 1024**2,
                max_duration_seconds=600,
                outputs=["out"],
            ),
            idempotency_key="outputs-standalone",
        ),
        timeout=10,
    )

    def ended() -> bool:
        got = stub.Get(leases_pb2.GetLeaseRequest(lease_id="outputs-standalone"), timeout=5)
        return got.state == common_pb2.LEASE_STATE_SUCCEEDED and got.HasField("outputs")

    wait_until("for the outputs lease to succeed", ended, 90)
    ticket = stub.OutputTicket(
        leases_pb2.OutputTicketRequest(lease_id="outputs-standalone"), timeout=10
    )
    port = stack.relay_port  # type: ignore[attr-defined]
    assert ticket.url == f"http://relay.localhost:{port}/_outputs/outputs-standalone"
    where = f"http://127.0.0.1:{port}/_outputs/outputs-standalone"
    got = httpx.get(where, headers={"Authorization": f"Bearer {ticket.ticket}"}, timeout=30)
    assert got.status_code == 200, got.text
    digest = ArchiveDigest()
    digest.update(got.content)
    assert (digest.root(), digest.size) == (ticket.commitment.digest, ticket.commitment.size)
    assert httpx.get(where, timeout=10).status_code == 401
