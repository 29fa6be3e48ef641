"""Where each connection attempt goes: every DNS record of every configured address.

``coordinator.address`` may name several replicas as a list, or as one DNS name with
several A/AAAA records. gRPC's own resolver would take care of a name, but with
pick_first every agent of the fleet would connect to the first record (one replica
holding all nodes) and the link would never learn which replica it is on. So the link
resolves the name itself before each attempt and dials one record per attempt:

- each agent orders the records by rendezvous hashing on its node id: the same agent
  keeps preferring the same replica, different agents spread evenly, and when a
  replica goes away its agents spread over the rest (a rotation would send them all
  to the next one); a record added or removed moves only the agents it concerns;
- the channel is still told the name (``grpc.default_authority``), so TLS verifies
  the certificate against the name and ``:authority`` is what a by-name dial sends.

Left to gRPC, unchanged: IP literals, target URIs (``dns:``, ``ipv4:``, ``unix:``...),
``localhost`` (one machine, nothing to spread, and gRPC tries its ::1 and 127.0.0.1 in
one attempt where per-record dialing would spend a backoff step on the family the
server does not listen on), and a name that does not resolve (gRPC reports the real
error, and the next attempt resolves again).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GetAddrInfo = Callable[..., list[tuple[Any, ...]]]

# An RFC 1123 host name; anything else (a URI, a bare IPv6, a typo) goes to gRPC as is.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")

# Names whose last resolution failed: a failure is logged once per streak, not per
# attempt (an outage of the resolver would otherwise log at every backoff step).
_failing: set[str] = set()


@dataclass(frozen=True)
class Target:
    """One connection attempt: the configured address and what the channel dials."""

    configured: str
    dial: str

    @property
    def expanded(self) -> bool:
        return self.dial != self.configured

    @property
    def authority(self) -> str | None:
        """The name the channel presents and verifies when it dials a record's IP."""
        return self.configured if self.expanded else None

    def __str__(self) -> str:
        return f"{self.configured} ({self.dial})" if self.expanded else self.configured


def _name_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) when ``address`` is ``name:port`` with a DNS name worth resolving."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if not _HOSTNAME.fullmatch(host):
        return None  # a URI scheme, a bracketed or bare IPv6, an empty host
    try:
        ipaddress.ip_address(host)
        return None  # an IPv4 literal: nothing to resolve
    except ValueError:
        pass
    bare = host.rstrip(".").lower()
    if bare == "localhost" or bare.endswith(".localhost"):
        return None
    if bare.rpartition(".")[2].isdigit():
        return None  # "127.1", "3232235777": numeric forms, not names (no TLD is numeric)
    return host, int(port)


def _ordered(records: Sequence[str], key: str) -> list[str]:
    # Rendezvous (highest random weight) order; sha256, not hash(): stable across runs.
    return sorted(records, key=lambda ip: hashlib.sha256(f"{key}|{ip}".encode()).digest())


def expand(address: str, key: str = "", *, getaddrinfo: GetAddrInfo | None = None) -> list[str]:
    """The addresses to dial for ``address``, in this agent's order (``key``: its node id).

    A DNS name becomes its TCP records as ``ip:port`` (``[ip]:port`` for IPv6),
    deduplicated; anything else, and a name that does not resolve, comes back as
    ``[address]``. Blocking (it may query DNS): async code runs it in a thread.
    """
    parsed = _name_and_port(address)
    if parsed is None:
        return [address]
    host, port = parsed
    resolve = socket.getaddrinfo if getaddrinfo is None else getaddrinfo
    try:
        # AI_ADDRCONFIG: no AAAA records on a host without IPv6 (each would cost an
        # attempt); glibc ignores it when only loopback is configured.
        infos = resolve(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
            flags=socket.AI_ADDRCONFIG,
        )  # fmt: skip
    except (OSError, UnicodeError) as exc:
        _failed(address, str(exc))
        return [address]
    if address in _failing:
        _failing.discard(address)
        log.info("the coordinator's name resolves again", extra={"address": address})
    records: set[str] = set()
    for family, _type, _proto, _canon, sockaddr in infos:
        if family == socket.AF_INET:
            records.add(f"{sockaddr[0]}:{port}")
        elif family == socket.AF_INET6:
            records.add(f"[{sockaddr[0]}]:{port}")
    return _ordered(list(records), key) if records else [address]


def _failed(address: str, error: str) -> None:
    if address not in _failing:
        _failing.add(address)
        log.warning(
            "cannot resolve the coordinator's name; gRPC will try it as given",
            extra={"address": address, "error": error},
        )


class TargetCycle:
    """The link's place among its targets: all records of all configured addresses in
    turn, then the first again. Each attempt resolves afresh, so DNS changes are seen."""

    def __init__(
        self, key: str, *, timeout: float = 10.0, getaddrinfo: GetAddrInfo | None = None
    ) -> None:
        self.key = key
        self.timeout = timeout  # a resolver that hangs must not hold the link (or its stop)
        self._getaddrinfo = getaddrinfo
        self._entry = 0  # index into the configured addresses
        self._record = 0  # index into that address's records
        self._count = 1  # how many records it had at the last pick

    async def pick(self, addresses: Sequence[str]) -> Target:
        """The target of the next attempt."""
        address = addresses[self._entry % len(addresses)]
        try:
            records = await asyncio.wait_for(
                asyncio.to_thread(expand, address, self.key, getaddrinfo=self._getaddrinfo),
                self.timeout,
            )
        except TimeoutError:
            _failed(address, f"no answer from the resolver within {self.timeout}s")
            records = [address]
        self._count = len(records)
        return Target(address, records[self._record % len(records)])

    def advance(self) -> None:
        """After an attempt or a session ended, whatever ended it: the next record, or
        the next address once this one's records are all tried."""
        self._record += 1
        if self._record >= self._count:
            self._record = 0
            self._entry += 1
