"""The agent's HTTP endpoint and `gpu-agent status`, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest

from agent.cli import main
from agent.cmd_status import base_url, render
from agent.metrics.nvml_source import NvmlGpuSource
from agent.metrics.readiness import CheckResult, Readiness, docker_check, nvml_check
from agent.metrics.server import ListenError, StatusApp, StatusServer, parse_listen
from agent.metrics.status import (
    StatusDocument,
    coordinator_section,
    gpus_section,
    leases_section,
    readiness_section,
    usage_section,
)
from tests.metrics_fakes import FakeNvml, populated_telemetry


class Node:
    """A status server wired the way the daemon wires it, on an ephemeral port."""

    def __init__(self, hang: threading.Event | None = None) -> None:
        self.nvml = FakeNvml.with_gpus(2)
        self.telemetry = populated_telemetry(self.nvml, timeout=0.3)
        self.connected = True
        self.readiness = Readiness(timeout=0.3)
        self.readiness.add("coordinator", lambda: CheckResult(self.connected, "stream up"))
        self.readiness.add("nvml", nvml_check(NvmlGpuSource(self.nvml)))
        doc = StatusDocument()
        leases = {self.nvml.gpus[0].uuid: "lease-a"}
        doc.add("coordinator", coordinator_section(self.telemetry.agent, "sched:7443"))
        doc.add("gpus", gpus_section(self.telemetry.gpu, lambda: leases))
        doc.add("leases", leases_section(lambda: {"running": 1, "pulling": 0}))
        doc.add("usage", usage_section(self.telemetry.agent))
        doc.add("readiness", readiness_section(self.readiness))
        app = StatusApp(self.telemetry.registry, readiness=self.readiness, status=doc.build)
        self.server = StatusServer("127.0.0.1:0", app)

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    n.server.start()
    yield n
    n.server.stop()


def test_healthz_and_metrics(node: Node) -> None:
    """/healthz answers ok and /metrics serves the registry in the Prometheus format."""
    assert httpx.get(node.url + "/healthz").text == "ok\n"
    metrics = httpx.get(node.url + "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'gpu_utilization_ratio{gpu="0",lease_id="lease-a"' in metrics.text


def test_readyz_reports_each_check_and_503_when_one_fails(node: Node) -> None:
    """/readyz is 200 with every check ok, 503 naming the failing check otherwise."""
    ready = httpx.get(node.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["nvml"] == {"ok": True, "detail": "2 GPUs"}
    node.connected = False
    not_ready = httpx.get(node.url + "/readyz")
    assert not_ready.status_code == 503
    body = not_ready.json()
    assert body["ready"] is False
    assert body["checks"]["coordinator"]["ok"] is False
    assert body["checks"]["nvml"]["ok"] is True


def test_readyz_is_bounded_when_a_check_hangs(node: Node) -> None:
    """A hung NVML makes /readyz answer 503 ("timed out") within the bound, not hang."""
    release = threading.Event()
    node.nvml.hang = release
    try:
        started = time.monotonic()
        response = httpx.get(node.url + "/readyz", timeout=5)
        assert time.monotonic() - started < 2.0
        assert response.status_code == 503
        assert "timed out" in response.json()["checks"]["nvml"]["detail"]
        # The scrape too answers in time, from the last good sample.
        started = time.monotonic()
        metrics = httpx.get(node.url + "/metrics", timeout=5)
        assert time.monotonic() - started < 2.0
        assert 'gpu_agent_collector_success{collector="gpu"} 0.0' in metrics.text
    finally:
        release.set()


def test_status_document_sections(node: Node) -> None:
    """/status is JSON with the agent, coordinator, GPUs, leases and usage sections."""
    httpx.get(node.url + "/metrics")  # one GPU sample, as after the first scrape
    doc = httpx.get(node.url + "/status").json()
    assert doc["agent"]["pid"] > 0
    assert doc["coordinator"]["connected"] is True
    assert doc["coordinator"]["address"] == "sched:7443"
    assert [g["lease_id"] for g in doc["gpus"]["devices"]] == ["lease-a", None]
    assert doc["gpus"]["cuda_version"] == "12.4"
    assert doc["leases"]["by_state"] == {"running": 1}
    assert doc["usage"]["records_pending"] == 3


def test_status_before_any_scrape_reads_the_gpus_once(node: Node) -> None:
    """With no scrape yet, /status takes one bounded GPU read instead of showing none."""
    doc = httpx.get(node.url + "/status").json()
    assert len(doc["gpus"]["devices"]) == 2
    assert doc["gpus"]["sample_age_seconds"] < 5


def test_failing_status_section_is_reported_not_fatal() -> None:
    """A section that raises becomes {"error": ...}; the rest of the document is served."""
    doc = StatusDocument()

    def broken() -> Any:
        raise RuntimeError("lease db unavailable")

    doc.add("leases", broken)
    doc.add("ok", lambda: {"fine": True})
    built = doc.build()
    assert built["leases"] == {"error": "RuntimeError: lease db unavailable"}
    assert built["ok"] == {"fine": True}


def test_actions_are_reserved_and_methods_checked(node: Node) -> None:
    """POST /drain is 501 until implemented, GET /drain 405, POST /metrics 405, unknown 404."""
    drain = httpx.post(node.url + "/drain", json={})
    assert drain.status_code == 501
    assert "not implemented" in drain.json()["error"]
    assert httpx.get(node.url + "/drain").status_code == 405
    assert httpx.post(node.url + "/metrics").status_code == 405
    assert httpx.get(node.url + "/nope").status_code == 404


def test_registered_action_receives_the_json_body() -> None:
    """A registered action gets the parsed body; bad JSON is a 400 that says why."""
    seen: list[Any] = []
    app = StatusApp(
        populated_telemetry().registry,
        actions={"drain": lambda body: seen.append(body) or {"draining": True}},
    )
    server = StatusServer("127.0.0.1:0", app)
    server.start()
    try:
        url = "http://{}:{}".format(*server.address)
        ok = httpx.post(url + "/drain", json={"reason": "maintenance"})
        assert ok.json() == {"result": {"draining": True}}
        assert seen == [{"reason": "maintenance"}]
        bad = httpx.post(
            url + "/drain", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400
        assert "not JSON" in bad.json()["error"]
    finally:
        server.stop()


def test_actions_need_the_control_token_json_and_no_browser() -> None:
    """With a control token, an action without it (or with another) is 401, a form post
    415, and anything a browser sends (Origin, Sec-Fetch-*) 403 even with the token;
    reads stay open. Nothing reached the action but the one good request."""
    seen: list[Any] = []
    app = StatusApp(
        populated_telemetry().registry,
        actions={"drain": lambda body: seen.append(body) or {"draining": True}},
        control_token="t0ken",
    )
    server = StatusServer("127.0.0.1:0", app)
    server.start()
    try:
        url = "http://{}:{}".format(*server.address) + "/drain"
        good = {"Authorization": "Bearer t0ken"}
        assert httpx.post(url, json={}).status_code == 401
        assert httpx.post(url, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        form = httpx.post(url, data={"a": "b"}, headers=good)
        assert form.status_code == 415
        for browser in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            assert httpx.post(url, json={}, headers={**good, **browser}).status_code == 403
        assert seen == []
        assert httpx.post(url, json={"x": 1}, headers=good).status_code == 200
        assert seen == [{"x": 1}]
        assert httpx.get(url.replace("/drain", "/healthz")).status_code == 200
    finally:
        server.stop()


def test_listen_parsing_and_bind_errors() -> None:
    """Malformed addresses and ports in use fail with the config key and the cause."""
    assert parse_listen("127.0.0.1:9470") == ("127.0.0.1", 9470)
    assert parse_listen("[::1]:9470") == ("::1", 9470)
    assert parse_listen(":9470") == ("0.0.0.0", 9470)
    with pytest.raises(ListenError, match="expected host:port"):
        parse_listen("localhost")
    with pytest.raises(ListenError, match="out of range"):
        parse_listen("127.0.0.1:70000")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = StatusServer(f"127.0.0.1:{port}", StatusApp(populated_telemetry().registry))
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}: cannot listen"):
            server.start()


@pytest.mark.asyncio
async def test_component_serves_until_stop() -> None:
    """run(stop) serves while the agent runs and closes the socket when stop is set."""
    server = StatusServer("127.0.0.1:0", StatusApp(populated_telemetry().registry))
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    deadline = time.monotonic() + 5
    while server.address[1] == 0:
        assert time.monotonic() < deadline, "server did not start"
        await asyncio.sleep(0.01)
    url = "http://{}:{}/healthz".format(*server.address)
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        stop.set()
        await asyncio.wait_for(task, 5)
        with pytest.raises(httpx.ConnectError):
            await client.get(url)


def test_docker_readiness_check_against_the_engine(docker_client: docker.DockerClient) -> None:
    """The Docker check passes against the real engine and fails against a dead engine."""
    readiness = Readiness(timeout=5)
    readiness.add("docker", docker_check(docker_client.ping))
    assert readiness.evaluate()["checks"]["docker"] == {"ok": True, "detail": "reachable"}
    # A closed TCP port rather than a missing unix socket: docker-py leaks the socket of
    # a failed unix connect. An explicit API version, or the client dials at construction.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = docker.DockerClient(base_url=f"tcp://127.0.0.1:{port}", version="1.43", timeout=1)
    try:
        readiness.add("docker", docker_check(dead.ping))
        result = readiness.evaluate()
    finally:
        dead.close()
    assert result["ready"] is False
    assert "ConnectionError" in result["checks"]["docker"]["detail"]


def test_cli_status_prints_a_report(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpu-agent status` prints the node summary and exits 0 when the agent is ready."""
    httpx.get(node.url + "/metrics")
    host, port = node.server.address
    assert main(["status", "--address", f"{host}:{port}"]) == 0
    out = capsys.readouterr().out
    assert "coordinator  connected (sched:7443)" in out
    assert "ready        yes" in out
    assert "gpus         2 (0 cordoned), driver 550.54.15, CUDA 12.4" in out
    assert "lease lease-a" in out
    assert "usage        3 records pending" in out


def test_cli_status_exits_1_when_not_ready(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """A reachable but unready agent: the report names the failing check, exit code 1."""
    node.connected = False
    host, port = node.server.address
    assert main(["status", "--address", f"{host}:{port}"]) == 1
    assert "ready        NO - coordinator: stream up" in capsys.readouterr().out


def test_cli_status_when_agent_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    """No agent listening: a one-line error saying where it looked, exit code 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"no agent answers at http://127.0.0.1:{port}" in err


def test_cli_json_output(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the document, including the fresh readiness verdict."""
    host, port = node.server.address
    assert main(["status", "--json", "--address", f"{host}:{port}"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["readiness"]["ready"] is True


def test_base_url_maps_wildcards_to_loopback() -> None:
    """An agent bound to every interface is reached on loopback; IPv6 is bracketed."""
    assert base_url("0.0.0.0:9470") == "http://127.0.0.1:9470"
    assert base_url("[::]:9470") == "http://[::1]:9470"
    assert base_url("10.0.0.5:9470") == "http://10.0.0.5:9470"


def test_render_handles_sections_that_failed() -> None:
    """A section that errored on the agent shows as unavailable instead of breaking the report."""
    text = render({"agent": {"version": "1"}, "leases": {"error": "RuntimeError: x"}}, now=0)
    assert "leases       unavailable: RuntimeError: x" in text
