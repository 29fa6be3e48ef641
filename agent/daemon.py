"""The agent process: one asyncio loop, one TaskGroup owning every long-lived task.

Lifecycle follows temporalio's worker: ``run()`` until asked to stop, an
idempotent ``shutdown()``, and ``async with`` for tests. Signal handlers only set
state (uvicorn's rule); the shutdown itself runs in phases on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Self

from gpuagent.aio import TaskSet

from .config import AgentConfig

log = logging.getLogger(__name__)

# A long-lived part of the agent: runs until ``stop`` is set, then returns promptly.
Component = Callable[[asyncio.Event], Awaitable[None]]


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._components: list[tuple[str, Component]] = []
        self._signals = 0
        self.on_reload: Callable[[], Coroutine[Any, Any, None]] | None = None
        self._reload_tasks = TaskSet()
        # Run before components are told to stop (e.g. flush usage while the link is
        # still up), bounded by ``drain_timeout`` so a stuck flush never blocks a stop.
        self.before_stop: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.drain_timeout = 5.0
        self._stopping_task: asyncio.Task[None] | None = None

    def add_component(self, name: str, component: Component) -> None:
        self._components.append((name, component))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def shutdown(self, reason: str = "requested") -> None:
        """Stop in phases: run ``before_stop`` hooks (bounded), then stop every component.

        Idempotent and safe from any task on the loop.
        """
        if self._stop.is_set() or self._stopping_task is not None:
            return
        self._stop_reason = reason
        log.info("agent stopping", extra={"reason": reason})
        if not self.before_stop:
            self._stop.set()
            return
        self._stopping_task = asyncio.get_running_loop().create_task(
            self._drain_then_stop(), name="shutdown"
        )

    async def _drain_then_stop(self) -> None:
        try:
            async with asyncio.timeout(self.drain_timeout):
                for hook in self.before_stop:
                    await hook()
        except TimeoutError:
            log.warning("shutdown hooks ran out of time", extra={"timeout_s": self.drain_timeout})
        except Exception:
            log.exception("shutdown hook failed")
        finally:
            self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self) -> None:
        if self.on_reload is None or self._stop.is_set():
            return
        self._reload_tasks.spawn(self.on_reload(), name="reload")

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            self.shutdown(f"signal {sig.name}")
        else:
            # A second signal means "now": cancel everything still running.
            log.warning("second signal, forcing stop", extra={"signal": sig.name})
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    async def _supervise(self, name: str, component: Component) -> None:
        try:
            await component(self._stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("component failed; shutting down", extra={"component": name})
            self.shutdown(f"{name} failed")
            raise

    async def run(self) -> None:
        log.info(
            "agent starting",
            extra={
                "node_name": self.config.node.name,
                "coordinator": self.config.coordinator.address,
                "gpu_backend": self.config.gpu.backend,
            },
        )
        async with asyncio.TaskGroup() as tg:
            for name, component in self._components:
                tg.create_task(self._supervise(name, component), name=name)
            await self._stop.wait()
        log.info("agent stopped", extra={"reason": self._stop_reason})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown("context exit")
