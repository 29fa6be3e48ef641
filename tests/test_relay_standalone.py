"""`gpu-scheduler relay` as its own process: the coordinator (relay.mode external)
sends agents to its tunnel port, it reads routes and token hashes from the
coordinator's RelayDirectory with an admin token, and buyers reach the service
through it exactly as through the embedded relay."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.agent_stack import running_stack, wait_until
from gpuagent.v1 import leases_pb2, leases_pb2_grpc
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
        finally:
            buyer.close()
