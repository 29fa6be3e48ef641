"""The buyer's URL of a port served in direct mode, from what the agent reports
(``Endpoint.direct_address``, ``direct_tls``). One home: the coordinator fills
``Endpoint.url`` with it, and ``gpu-scheduler lease url`` prints the same.

The address is the agent's word, so it is parsed, not pasted: ``host:port`` with an
IPv4 literal, a bracketed IPv6 literal or a DNS name, and a port 1..65535. Anything
else yields no URL (the relay's stays).
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def parse_direct_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a well-formed ``host:port``; None otherwise."""
    if len(address) > 300:
        return None
    host, colon, port_text = address.rpartition(":")
    if not colon or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host, port
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _NAME.match(host) or host.replace(".", "").isdigit():
            return None
    return host, port


def direct_url(protocol: str, address: str, tls: bool) -> str:
    """``https://host:port/`` (``http://`` without TLS) for an http port, ``tls://`` or
    ``tcp://host:port`` for a tcp one; "" when the address is malformed."""
    parsed = parse_direct_address(address)
    if parsed is None or protocol not in ("http", "tcp"):
        return ""
    host, port = parsed
    if protocol == "http":
        return f"{'https' if tls else 'http'}://{host}:{port}/"
    return f"{'tls' if tls else 'tcp'}://{host}:{port}"
