"""Price history per GPU model (docs/market.md): the median ask of the online nodes,
sampled every ``SAMPLE_EVERY`` seconds, and the price of each lease placed, kept
``RETENTION`` (30 days, with uptime's coverage) in ``price_history``.

Placements are buffered in memory and written with the next sample, so the
placement pass never waits on the database for this. The gauges the metrics
endpoint serves are computed at each sample: the median ask now and the median
accepted price over the last ``ACCEPTED_WINDOW``.
"""

from __future__ import annotations

import logging
import sqlite3
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .db import Database

log = logging.getLogger(__name__)

SAMPLE_EVERY = 300.0
RETENTION = 30 * 86400.0
ACCEPTED_WINDOW = 86400.0


@dataclass(frozen=True)
class ModelPrices:
    ask_median_micros: int | None  # now, over the online nodes with this model
    accepted_median_micros: int | None  # over the last ACCEPTED_WINDOW


def median(values: Iterable[int]) -> int:
    """The median, rounded down to whole micro-units (low median of an even count)."""
    return int(statistics.median_low(list(values)))


class PriceHistory:
    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self.db = db
        self.clock = clock
        self._placed: list[tuple[str, int, int]] = []  # (model, at_ns, micros), unwritten
        self.current: dict[str, ModelPrices] = {}

    def placed(self, gpu_model: str, ask_micros: int) -> None:
        """A lease was placed on GPUs of ``gpu_model`` at ``ask_micros`` per GPU-hour."""
        if gpu_model:
            self._placed.append((gpu_model[:256], round(self.clock() * 1e9), ask_micros))

    async def sample(self, asks: Mapping[str, list[int]]) -> dict[str, ModelPrices]:
        """Write the median ask of each model and the buffered placements; refresh the
        gauges. ``asks``: model -> the asks of the online nodes that have it."""
        now_ns = round(self.clock() * 1e9)
        placed, self._placed = self._placed, []
        ask_rows = [(m, now_ns, "ask", median(v)) for m, v in asks.items() if v]
        since = now_ns - round(ACCEPTED_WINDOW * 1e9)

        def write(conn: sqlite3.Connection) -> dict[str, list[int]]:
            conn.executemany(
                "INSERT INTO price_history (gpu_model, at_ns, kind, micros_per_gpu_hour)"
                " VALUES (?, ?, ?, ?)",
                [*ask_rows, *((m, at, "accepted", p) for m, at, p in placed)],
            )
            accepted: dict[str, list[int]] = {}
            for model, price in conn.execute(
                "SELECT gpu_model, micros_per_gpu_hour FROM price_history"
                " WHERE kind = 'accepted' AND at_ns >= ?",
                (since,),
            ):
                accepted.setdefault(model, []).append(price)
            return accepted

        try:
            accepted = await self.db.call(write)
        except Exception:
            self._placed[:0] = placed  # kept for the next sample
            raise
        models = set(asks) | set(accepted)
        self.current = {
            m: ModelPrices(
                median(asks[m]) if asks.get(m) else None,
                median(accepted[m]) if accepted.get(m) else None,
            )
            for m in sorted(models)
        }
        return self.current

    async def history(self, gpu_model: str, kind: str, since_s: float) -> list[tuple[int, int]]:
        """(at_ns, micros) of one model's rows of ``kind`` since ``since_s`` (unix)."""
        since = round(since_s * 1e9)
        return await self.db.call(
            lambda conn: conn.execute(
                "SELECT at_ns, micros_per_gpu_hour FROM price_history"
                " WHERE gpu_model = ? AND kind = ? AND at_ns >= ? ORDER BY at_ns",
                (gpu_model, kind, since),
            ).fetchall()
        )

    async def prune(self) -> int:
        """Drop rows older than RETENTION; returns how many."""
        horizon = round((self.clock() - RETENTION) * 1e9)
        return await self.db.call(
            lambda conn: (
                conn.execute("DELETE FROM price_history WHERE at_ns < ?", (horizon,)).rowcount
            )
        )
