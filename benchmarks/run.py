"""``make bench``: run every registered benchmark, print figures beside targets, save JSON.

To add a benchmark: write a module with a function ``(smoke: bool) -> list[Figure]``
decorated with ``@register("name")`` (both from :mod:`benchmarks.registry`) and add
the module to ``BENCHMARK_MODULES``.
``--smoke`` asks each benchmark for CI-sized inputs (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .registry import REGISTRY

BENCHMARK_MODULES: tuple[str, ...] = (
    "benchmarks.attest_bench",
    "benchmarks.outbox_bench",
    "benchmarks.ingest_bench",
    "benchmarks.scrape_bench",
    "benchmarks.lease_start_bench",
    "benchmarks.footprint_bench",
    "benchmarks.fleet",
    "benchmarks.fleet_replicas",
    "benchmarks.soak",
    "benchmarks.relay_bench",
)
DEFAULT_OUTPUT = Path("bench-results.json")


def load_all() -> None:
    for module in BENCHMARK_MODULES:
        importlib.import_module(module)


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CI-sized inputs")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    load_all()
    names = args.only or sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; known: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    results: dict[str, object] = {"smoke": args.smoke, "benchmarks": {}}
    failed = missed = False
    print(f"{'benchmark':<14} {'figure':<44} {'value':>12} {'unit':<8} {'target':<14} ok")
    for name in names:
        started = time.perf_counter()
        try:
            figures = REGISTRY[name](args.smoke)
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed = True
            results["benchmarks"][name] = {"error": traceback.format_exc()}  # type: ignore[index]
            continue
        for f in figures:
            mark = "" if f.ok is None else ("yes" if f.ok else "NO")
            missed |= f.ok is False
            print(f"{name:<14} {f.name:<44} {_format_value(f.value):>12} {f.unit:<8} "
                  f"{f.target:<14} {mark}")  # fmt: skip
        results["benchmarks"][name] = {  # type: ignore[index]
            "seconds": time.perf_counter() - started,
            "figures": [asdict(f) for f in figures],
        }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
