"""Cordoned GPUs, persisted as JSON in the state dir so they survive restarts.

The running daemon and ``gpu-agent cordon|uncordon`` share one file
(``<state_dir>/cordons.json``). Writers take an exclusive ``flock`` on a lock
file for the read-modify-write and replace the file atomically, so a reader
never sees half a file and two writers never lose each other's update. The
daemon re-reads the file when its identity (inode, mtime, size) changes.

An uncordon leaves a ``released`` entry that the daemon consumes: it forgives
what it saw up to that moment (Xids, the ECC count, see ``health.py``) and
stores the acknowledged ECC count under ``acknowledged``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

CordonSource = Literal["health", "operator"]

FILENAME = "cordons.json"
_VERSION = 1


class CordonFileError(Exception):
    """The cordon file cannot be read or written; the message says which and why."""


@dataclass(frozen=True)
class Cordon:
    uuid: str
    reason: str
    source: CordonSource
    since: float  # unix seconds
    index: int | None = None


@dataclass
class _State:
    cordons: dict[str, Cordon]
    released: dict[str, float]  # uuid -> when it was uncordoned, until the daemon consumes it
    acknowledged: dict[str, int]  # uuid -> uncorrected ECC count forgiven by an uncordon


class CordonStore:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / FILENAME
        self._lock_path = self.path.with_name(FILENAME + ".lock")
        self._clock = clock
        self._state = _State({}, {}, {})
        self._identity: tuple[int, int, int] | None = None

    # -- reading -----------------------------------------------------------------

    def load(self) -> None:
        """Read the file (a missing file means no cordons); raises ``CordonFileError``."""
        self._state = self._read()
        self._identity = self._stat()

    def reload_if_changed(self) -> bool:
        """Re-read when another process replaced the file; True when it did."""
        identity = self._stat()
        if identity == self._identity:
            return False
        self.load()
        return True

    def cordons(self) -> dict[str, Cordon]:
        return dict(self._state.cordons)

    def get(self, uuid: str) -> Cordon | None:
        return self._state.cordons.get(uuid)

    def is_cordoned(self, uuid: str) -> bool:
        return uuid in self._state.cordons

    def released(self) -> dict[str, float]:
        return dict(self._state.released)

    def acknowledged_ecc(self, uuid: str) -> int:
        return self._state.acknowledged.get(uuid, 0)

    # -- writing ---------------------------------------------------------------------

    def cordon(
        self, uuid: str, reason: str, source: CordonSource, index: int | None = None
    ) -> Cordon:
        """Cordon ``uuid``; an existing cordon is kept as it is (first reason wins)."""
        with self._update() as state:
            existing = state.cordons.get(uuid)
            if existing is not None:
                return existing
            entry = Cordon(uuid, reason, source, self._clock(), index)
            state.cordons[uuid] = entry
            state.released.pop(uuid, None)
            return entry

    def uncordon(self, uuid: str) -> Cordon | None:
        """Lift the cordon on ``uuid``; returns it, or None when there was none."""
        with self._update() as state:
            entry = state.cordons.pop(uuid, None)
            state.released[uuid] = self._clock()
            return entry

    def consume_release(self, uuid: str, ecc_uncorrected: int | None) -> None:
        """The daemon has applied an uncordon: record what it forgave."""
        with self._update() as state:
            state.released.pop(uuid, None)
            if ecc_uncorrected is not None:
                state.acknowledged[uuid] = ecc_uncorrected

    def set_acknowledged_ecc(self, uuid: str, count: int) -> None:
        with self._update() as state:
            state.acknowledged[uuid] = count

    # -- file plumbing -------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CordonFileError(f"{self.path}: cannot stat: {exc.strerror}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> _State:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _State({}, {}, {})
        except OSError as exc:
            raise CordonFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(text)
            return _parse(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise CordonFileError(
                f"{self.path}: not a valid cordon file ({exc}); fix or remove it "
                "(removing it lifts every cordon)"
            ) from None

    @contextlib.contextmanager
    def _update(self) -> Iterator[_State]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = self._lock_path.open("a")
        except OSError as exc:
            raise CordonFileError(
                f"{self._lock_path}: cannot open: {exc.strerror}; run as the agent's user "
                "or root, or point node.state_dir elsewhere"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            yield state
            self._write(state)
            self._state = state
            self._identity = self._stat()

    def _write(self, state: _State) -> None:
        data: dict[str, Any] = {
            "version": _VERSION,
            "cordons": {u: asdict(c) for u, c in sorted(state.cordons.items())},
            "released": dict(sorted(state.released.items())),
            "acknowledged": dict(sorted(state.acknowledged.items())),
        }
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cordons.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(self.path)
            # The rename itself must reach the disk too, or a crash can undo it.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise CordonFileError(f"{self.path}: cannot write: {exc.strerror}") from None


def _parse(data: Any) -> _State:
    if not isinstance(data, dict):
        raise ValueError("top level must be an object")
    if data.get("version") != _VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r}")
    cordons = {}
    for uuid, raw in dict(data.get("cordons", {})).items():
        source = raw["source"]
        if source not in ("health", "operator"):
            raise ValueError(f"cordon {uuid}: unknown source {source!r}")
        index = raw.get("index")
        cordons[str(uuid)] = Cordon(
            uuid=str(uuid),
            reason=str(raw["reason"]),
            source=source,
            since=float(raw["since"]),
            index=int(index) if index is not None else None,
        )
    released = {str(u): float(t) for u, t in dict(data.get("released", {})).items()}
    acknowledged = {str(u): int(n) for u, n in dict(data.get("acknowledged", {})).items()}
    return _State(cordons, released, acknowledged)
