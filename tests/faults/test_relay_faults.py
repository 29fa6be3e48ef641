"""The service path under faults, with real processes: the agent is killed (-9) while a
service lease is up; buyers get 503 (never a hang) while it is gone, and once it is
back the container is re-adopted, the tunnel reopens and the same request succeeds.
The in-process variant with a cut network (the loopback proxy) is
tests/test_relay_tunnel.py::test_a_cut_tunnel_answers_503_and_service_resumes_on_reconnect."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from benchmarks.agent_stack import BIN, running_stack, wait_until
from tests.images.pyservice import build_pyservice
from tests.test_relay_e2e import _buyer_channel, submit_service

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.timeout(300)]


def test_agent_kill_9_then_restart_the_service_answers_again_within_seconds() -> None:
    build_pyservice()
    with running_stack() as stack:
        buyer = _buyer_channel(stack)
        try:
            service = submit_service(stack, buyer, "svc-kill")
            url = f"http://127.0.0.1:{stack.relay_port}/hits"
            headers = {
                "Host": "svc-kill-8080.relay.localhost",
                "Authorization": f"Bearer {service.token}",
            }
            before = httpx.get(url, headers=headers, timeout=10)
            assert before.status_code == 200
            agent = stack.procs["agent"]
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)

            def down() -> bool:
                return httpx.get(url, headers=headers, timeout=10).status_code == 503

            wait_until("for the relay to notice the tunnel is gone", down, 30)
            stack._start("agent", [str(BIN / "gpu-agent"), "-c", str(stack.agent_cfg), "run"])
            restarted = time.monotonic()

            def up() -> bool:
                return httpx.get(url, headers=headers, timeout=10).status_code == 200

            wait_until("for the service to answer after the restart", up, 60)
            after = httpx.get(url, headers=headers, timeout=10)
            # The same container (re-adopted, not restarted): its request count went on.
            assert int(after.text) > int(before.text)
            print(f"service back {time.monotonic() - restarted:.1f}s after the agent restarted")
        finally:
            buyer.close()
