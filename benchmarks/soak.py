"""Soak: lease churn against the real agent and scheduler; is anything leaking?

Short leases are submitted continuously (each runs ``sleep 1``) for ``--minutes``,
while the agent's RSS and open file descriptors are sampled. A least-squares slope
per hour of each says whether they grow; a healthy agent's slopes stay near zero
after warm-up. ``make bench`` runs a short smoke; the issue's hour-long soak is
``python -m benchmarks.soak --minutes 60``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Sequence

from .agent_stack import GPUS, Stack, running_stack
from .registry import Figure, register

TERMINAL = {"LEASE_STATE_SUCCEEDED", "LEASE_STATE_FAILED", "LEASE_STATE_CANCELLED"}


def slope_per_hour(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, in value per hour."""
    if len(samples) < 2:
        return 0.0
    return (
        statistics.linear_regression([t for t, _ in samples], [v for _, v in samples]).slope * 3600
    )


def churn(stack: Stack, seconds: float, sample_every: float) -> dict[str, float]:
    proc = stack.agent
    started = time.monotonic()
    rss: list[tuple[float, float]] = []
    fds: list[tuple[float, float]] = []
    active: set[str] = set()
    done = 0
    next_sample = started
    for n in itertools.count():
        now = time.monotonic()
        if now - started >= seconds:
            break
        # Keep the GPUs busy: top up to GPUS short leases in flight.
        if len(active) < GPUS:
            lease_id = f"soak-{n}-{time.time_ns()}"
            stack.submit(lease_id, seconds=1)
            active.add(lease_id)
        for lease_id in list(active):
            if stack.lease_state(lease_id) in TERMINAL:
                active.discard(lease_id)
                done += 1
        if now >= next_sample:
            rss.append((now - started, proc.memory_info().rss / 1e6))
            fds.append((now - started, float(proc.num_fds())))
            next_sample += sample_every
        time.sleep(0.2)  # the submit loop's pace, not synchronisation
    # Ignore the first quarter: caches and pools fill once, then must stay flat.
    warm = [s for s in rss if s[0] >= seconds / 4]
    warm_fds = [s for s in fds if s[0] >= seconds / 4]
    return {
        "leases": float(done),
        "rss_start": rss[0][1] if rss else 0.0,
        "rss_end": rss[-1][1] if rss else 0.0,
        "rss_slope": slope_per_hour(warm),
        "fds_end": fds[-1][1] if fds else 0.0,
        "fds_slope": slope_per_hour(warm_fds),
    }


def run_soak(minutes: float) -> list[Figure]:
    with running_stack() as stack:
        m = churn(stack, minutes * 60, sample_every=max(1.0, minutes * 60 / 120))
    window = f"{minutes:g} min"
    return [
        Figure(f"soak ({window}): leases run to completion", m["leases"], "leases"),
        Figure(f"soak ({window}): agent RSS start", m["rss_start"], "MB"),
        Figure(f"soak ({window}): agent RSS end", m["rss_end"], "MB"),
        Figure(f"soak ({window}): RSS slope after warm-up", m["rss_slope"], "MB/h"),
        Figure(f"soak ({window}): open fds at end", m["fds_end"], "fds"),
        Figure(f"soak ({window}): fd slope after warm-up", m["fds_slope"], "fds/h"),
    ]


@register("soak")
def bench(smoke: bool) -> list[Figure]:
    return run_soak(0.5 if smoke else 5.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    for figure in run_soak(args.minutes):
        print(f"{figure.name:<48} {figure.value:>10.2f} {figure.unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
