"""Fetching a lease's outputs: download tickets for the relay, and mismatch reports.

A buyer asks ``Leases.OutputTicket`` (its own lease only) and gets a bearer ticket for
the relay's ``/_outputs/<lease-id>`` URL. The ticket is stateless: the lease id and an
expiry under an HMAC keyed from the scheduler's secret box, so any replica and a
standalone relay's coordinator check it without a table or a database round trip, and
a ticket for one lease opens no other. It carries no power beyond reading that one
archive until it expires.

When the CLI finds that what arrived is not what the node signed, it reports it
(``ReportOutputMismatch``); the report is kept once per lease and buyer and shown on
the node (``nodes show``): a buyer's claim, not a verdict, so it is never slashed on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from collections.abc import Callable

from gpuagent.v1 import nodes_pb2

from .db import Database
from .secretbox import SecretBox
from .storage import Conn

# "gpu scheduler output": greppable in leaked logs; one prefix per kind of secret.
TICKET_PREFIX = "gso_"
TICKET_TTL_S = 3600  # long enough to fetch a big archive; a resume asks for a new one
MAX_TICKET_CHARS = 128
MAX_DETAIL_CHARS = 512
_MAC_BYTES = 20
_PURPOSE = "output-ticket-v1"


class OutputTickets:
    def __init__(
        self, secrets: SecretBox, clock: Callable[[], float] = time.time, ttl: float = TICKET_TTL_S
    ) -> None:
        self.secrets = secrets
        self.clock = clock
        self.ttl = ttl
        self._key = b""

    def _mac(self, lease_id: str, expires_s: int) -> bytes:
        if not self._key:
            self._key = self.secrets.derive_key(_PURPOSE)
        message = struct.pack(">Q", expires_s) + lease_id.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, lease_id: str) -> tuple[str, int]:
        """(ticket, expiry in unix nanoseconds) for downloading ``lease_id``'s outputs."""
        expires_s = int(self.clock() + self.ttl)
        body = struct.pack(">Q", expires_s) + self._mac(lease_id, expires_s)
        return TICKET_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("="), expires_s * (
            10**9
        )

    def check(self, lease_id: str, ticket: str) -> bool:
        """True when ``ticket`` was issued for ``lease_id`` and has not expired."""
        if not ticket.startswith(TICKET_PREFIX) or len(ticket) > MAX_TICKET_CHARS:
            return False
        encoded = ticket[len(TICKET_PREFIX) :]
        try:
            body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return False
        if len(body) != 8 + _MAC_BYTES:
            return False
        # One spelling per ticket: base64's ignored trailing bits and its +/ aliases
        # would otherwise let one ticket be written several ways (logs, rate limits).
        if base64.urlsafe_b64encode(body).decode().rstrip("=") != encoded:
            return False
        (expires_s,) = struct.unpack(">Q", body[:8])
        if expires_s < self.clock():
            return False
        return hmac.compare_digest(body[8:], self._mac(lease_id, expires_s))


def record_mismatch(
    conn: Conn, *, lease_id: str, reporter: str, node_id: str, now_ns: int, detail: str
) -> bool:
    """Keep one buyer's report on one lease; False when that buyer had reported it."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO output_mismatches"
        " (lease_id, reporter, node_id, reported_ns, detail) VALUES (?, ?, ?, ?, ?)",
        (lease_id, reporter, node_id, now_ns, detail[:MAX_DETAIL_CHARS]),
    )
    return cursor.rowcount == 1


async def mismatches(db: Database, node_id: str) -> list[nodes_pb2.OutputMismatch]:
    """The reports against ``node_id``, oldest first (the latest 100)."""

    def read(conn: Conn) -> list[tuple[str, str, int, str]]:
        return conn.execute(
            "SELECT lease_id, reporter, reported_ns, detail FROM output_mismatches"
            " WHERE node_id = ? ORDER BY reported_ns DESC LIMIT 100",
            (node_id,),
        ).fetchall()

    rows = await db.call(read)
    return [
        nodes_pb2.OutputMismatch(
            lease_id=str(lease), reporter=str(who), reported_at_unix_nanos=int(at), detail=text
        )
        for lease, who, at, text in reversed(rows)
    ]
