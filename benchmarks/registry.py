"""Where benchmarks register themselves; kept apart from the runner so that
``python -m benchmarks.run`` (module ``__main__``) and the benchmark modules share one registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""  # human-readable, e.g. "< 100 ms"
    ok: bool | None = None  # None: informational, no target


Benchmark = Callable[[bool], list[Figure]]
REGISTRY: dict[str, Benchmark] = {}


def register(name: str) -> Callable[[Benchmark], Benchmark]:
    def decorate(fn: Benchmark) -> Benchmark:
        if name in REGISTRY and REGISTRY[name] is not fn:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = fn
        return fn

    return decorate
