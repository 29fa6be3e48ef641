"""Host ports of direct mode: which port of ``services.port_range`` serves which lease port.

Kept in ``<state_dir>/direct-ports.json`` (written atomically), with each lease's
endpoint token hash, so an agent restarted while a service runs re-opens the same
ports (buyers' URLs stay valid) and checks the same token. A port stays taken until
its lease ends; one another process holds is skipped at allocation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "direct-ports.json"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PortsExhausted(Exception):
    """No port of the range is free."""


@dataclass
class LeasePorts:
    ports: dict[str, int] = field(default_factory=dict)  # port name -> host port
    token_sha256: bytes = b""


def bindable(address: Address, port: int) -> bool:
    """Whether nothing else holds ``address:port`` now (a test bind, closed at once)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((str(address), port))
        except OSError:
            return False
    return True


class PortBook:
    def __init__(
        self,
        state_dir: Path,
        address: Address,
        port_range: range,
        *,
        free: Callable[[Address, int], bool] = bindable,
    ) -> None:
        self.path = state_dir / FILE_NAME
        self.address = address
        self.range = port_range
        self._free = free
        self._lock = threading.Lock()
        self._leases: dict[str, LeasePorts] = self._read()

    def _read(self) -> dict[str, LeasePorts]:
        try:
            raw: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A torn or foreign file: starting over only moves ports, it opens nothing.
            log.warning("direct port book unreadable; starting empty", extra={"error": str(exc)})
            return {}
        leases: dict[str, LeasePorts] = {}
        for lease_id, entry in (raw.get("leases") or {}).items():
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                ports = {str(k): int(v) for k, v in (entry.get("ports") or {}).items()}
                leases[str(lease_id)] = LeasePorts(
                    ports={k: v for k, v in ports.items() if v in self.range},
                    token_sha256=bytes.fromhex(str(entry.get("token_sha256") or "")),
                )
        return leases

    def _write(self) -> None:
        data = {
            "leases": {
                lease_id: {"ports": entry.ports, "token_sha256": entry.token_sha256.hex()}
                for lease_id, entry in sorted(self._leases.items())
            }
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(self.path)

    def allocate(self, lease_id: str, names: Sequence[str]) -> dict[str, int]:
        """Host ports for the lease's ``names``: those it already holds (a restarted
        agent), new ones for the rest, lowest free first."""
        with self._lock:
            entry = self._leases.setdefault(lease_id, LeasePorts())
            taken = {p for e in self._leases.values() for p in e.ports.values()}
            candidates = (p for p in self.range if p not in taken)
            for name in names:
                if name in entry.ports:
                    continue
                for port in candidates:
                    if self._free(self.address, port):
                        entry.ports[name] = port
                        break
                else:
                    self._write()
                    raise PortsExhausted(
                        f"no free port left in services.port_range "
                        f"{self.range.start}-{self.range.stop - 1} on {self.address}"
                    )
            self._write()
            return {name: entry.ports[name] for name in names}

    def ports(self, lease_id: str) -> dict[str, int]:
        with self._lock:
            entry = self._leases.get(lease_id)
            return dict(entry.ports) if entry else {}

    def set_token(self, lease_id: str, token_sha256: bytes) -> None:
        with self._lock:
            entry = self._leases.setdefault(lease_id, LeasePorts())
            if entry.token_sha256 != token_sha256:
                entry.token_sha256 = token_sha256
                self._write()

    def token(self, lease_id: str) -> bytes:
        with self._lock:
            entry = self._leases.get(lease_id)
            return entry.token_sha256 if entry else b""

    def release(self, lease_id: str) -> None:
        with self._lock:
            if self._leases.pop(lease_id, None) is not None:
                self._write()

    def retain(self, lease_ids: Iterable[str]) -> list[str]:
        """Forget every lease not in ``lease_ids`` (ended while the agent was down)."""
        keep = set(lease_ids)
        with self._lock:
            gone = [lease_id for lease_id in self._leases if lease_id not in keep]
            for lease_id in gone:
                del self._leases[lease_id]
            if gone:
                self._write()
            return gone
