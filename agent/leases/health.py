"""Health of a service lease's declared ports, checked from the agent to the container.

The agent reaches the container at its address on the lease's own network (the
host is the bridge's gateway, so no port needs publishing and the egress policy,
which only filters traffic *from* lease bridges, lets the replies through).

One ``ServiceMonitor`` per container start:

- the **health port** (``health.port``, an http port) gets ``GET <path>``; any
  2xx or 3xx status passes;
- every other http or tcp port gets a TCP connect; udp ports are not checked
  (nothing to connect to) and count as ready while the container runs.

Phases, per container start: **startup** lasts until the health check first
passes; checks then run every ``STARTUP_PERIOD_S`` (or ``period`` if shorter) so
readiness is noticed quickly, and failures are not counted, but a container with
no passing check within ``initial_delay + startup_grace`` fails liveness. After
that, checks run every ``period``: **readiness** follows each result (one failed
check takes the endpoint out of rotation, the next pass puts it back) and
**liveness** fails after ``failure_threshold`` consecutive failures. A liveness
failure is handed to the manager, which restarts the container (or fails the
lease under ``restart: never``); the monitor then ends and a new one starts with
the new container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gpuagent import leaserules

from .records import EndpointStatus

log = logging.getLogger(__name__)

STARTUP_PERIOD_S = 1.0
TCP_PERIOD_S = 10.0  # ports without an HTTP check, after they first accepted a connection
MAX_STATUS_LINE = 1024
USER_AGENT = "gpu-agent-health/1"

ChangeCallback = Callable[[], None]
LivenessCallback = Callable[[str], Awaitable[None]]
ResultObserver = Callable[[str, bool], None]  # (check kind "http"/"tcp", passed)


async def http_check(host: str, port: int, path: str, within: float) -> tuple[bool, str]:
    """``GET path`` on ``host:port``; (passed, "ok" or why not)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_STATUS_LINE * 4)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {within:g}s"
    except OSError as exc:
        return False, f"connection failed: {exc.strerror or exc}"
    except (ValueError, asyncio.LimitOverrunError) as exc:
        return False, f"bad answer: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = line.decode("latin-1", errors="replace").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, "ok"
    return False, f"HTTP {status}"


async def tcp_check(host: str, port: int, within: float) -> tuple[bool, str]:
    """A TCP connect to ``host:port``; (passed, "ok" or why not)."""
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return False, f"no connection within {within:g}s"
    except OSError as exc:
        return False, f"connection failed: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True, "ok"


@dataclass
class _Endpoint:
    port: leaserules.Port
    ready: bool = False
    last_check_at: float | None = None
    last_result: str = ""
    passed_once: bool = False

    @property
    def name(self) -> str:
        return leaserules.port_name(self.port)


@dataclass
class ServiceMonitor:
    """Checks one container's ports until cancelled or until its liveness fails."""

    lease_id: str
    host: str  # the container's address on the lease network
    ports: Sequence[leaserules.Port]
    health: leaserules.Health | None
    on_change: ChangeCallback
    on_liveness_failure: LivenessCallback
    on_result: ResultObserver | None = None
    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    _endpoints: dict[str, _Endpoint] = field(default_factory=dict, init=False)
    failures: int = field(default=0, init=False)  # consecutive, health port, after startup

    def __post_init__(self) -> None:
        for port in self.ports:
            endpoint = _Endpoint(port)
            if leaserules.port_protocol(port) == "udp":
                endpoint.ready, endpoint.last_result = True, "not checked (udp)"
            self._endpoints[endpoint.name] = endpoint

    def ready(self, name: str) -> bool:
        endpoint = self._endpoints.get(name)
        return endpoint is not None and endpoint.ready

    def statuses(self, restarts: int) -> tuple[EndpointStatus, ...]:
        return tuple(
            EndpointStatus(
                name=e.name,
                protocol=leaserules.port_protocol(e.port),
                container_port=e.port.container_port,
                ready=e.ready,
                last_check_at=e.last_check_at,
                last_result=e.last_result,
                restarts=restarts,
            )
            for e in self._endpoints.values()
        )

    async def run(self) -> None:
        # TCP ports are checked from the start; only the HTTP check waits initial_delay.
        started = self.mono()
        while True:
            elapsed = self.mono() - started
            changed = await self._check_all(elapsed)
            if changed:
                self.on_change()
            verdict = self._liveness(elapsed)
            if verdict is not None:
                log.warning(
                    "lease liveness check failed", extra={"lease_id": self.lease_id, "why": verdict}
                )
                await self.on_liveness_failure(verdict)
                return
            await asyncio.sleep(self._next_delay(elapsed))

    def _health_endpoint(self) -> _Endpoint | None:
        return self._endpoints.get(self.health.port) if self.health is not None else None

    def _next_delay(self, elapsed: float) -> float:
        target = self._health_endpoint()
        if self.health is not None and target is not None:
            if elapsed < self.health.initial_delay:
                return min(self.health.initial_delay - elapsed, STARTUP_PERIOD_S)
            if not target.passed_once:
                return min(self.health.period, STARTUP_PERIOD_S)
            return self.health.period
        waiting = any(not e.passed_once for e in self._endpoints.values())
        return STARTUP_PERIOD_S if waiting else TCP_PERIOD_S

    async def _check_all(self, elapsed: float) -> bool:
        target = self._health_endpoint()
        due = [
            e
            for e in self._endpoints.values()
            if leaserules.port_protocol(e.port) != "udp"
            and not (
                e is target and self.health is not None and elapsed < self.health.initial_delay
            )
        ]
        results = await asyncio.gather(*(self._check(e, e is target) for e in due))
        return any(results)

    async def _check(self, endpoint: _Endpoint, http: bool) -> bool:
        """Check one port; True when its readiness changed (or it was checked first)."""
        port = endpoint.port.container_port
        if http and self.health is not None:
            passed, result = await http_check(
                self.host, port, self.health.path, self.health.timeout
            )
        else:
            timeout = self.health.timeout if self.health is not None else 5.0
            passed, result = await tcp_check(self.host, port, timeout)
        if self.on_result is not None:
            self.on_result("http" if http else "tcp", passed)
        first = endpoint.last_check_at is None
        changed = first or passed != endpoint.ready
        endpoint.last_check_at = self.wall()
        endpoint.last_result = result
        endpoint.ready = passed
        if http:
            if passed:
                self.failures = 0
            elif endpoint.passed_once:
                self.failures += 1
        if passed:
            endpoint.passed_once = True
        return changed

    def _liveness(self, elapsed: float) -> str | None:
        """Why liveness failed now, or None."""
        health = self.health
        target = self._health_endpoint()
        if health is None or target is None:
            return None
        if not target.passed_once:
            if elapsed >= health.initial_delay + health.startup_grace:
                return (
                    f"health check GET {health.path} on port {target.name} did not pass within "
                    f"the startup grace ({health.initial_delay + health.startup_grace:g}s): "
                    f"{target.last_result or 'not checked'}"
                )
            return None
        if self.failures >= health.failure_threshold:
            return (
                f"health check GET {health.path} on port {target.name} failed "
                f"{self.failures} times in a row: {target.last_result}"
            )
        return None
