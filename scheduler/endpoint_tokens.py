"""Per-lease endpoint tokens in the scheduler's database (table ``endpoint_tokens``).

Created in Submit's own transaction (a lease never exists without one), sealed with
the scheduler's secret box so its buyer can read it back (``lease show``), and hashed
for the relay, which checks requests against the hash alone (scheduler/relay/).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .db import Database
from .leases_store import LeaseRow, LeaseStore
from .relay.tokens import new_token, token_hash
from .secretbox import SecretBox
from .storage import Conn

_CONTEXT = "endpoint-token:"


class EndpointTokens:
    def __init__(
        self, db: Database, secrets: SecretBox, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.secrets = secrets
        self.clock = clock
        # Called with a lease id whose token changed (the in-process relay drops its cache).
        self.on_rotate: list[Callable[[str], None]] = []

    def register(self, store: LeaseStore) -> None:
        store.add_hooks(on_submitted=self._on_submitted)

    def _write(self, conn: Conn, lease_id: str) -> str:
        token = new_token()
        conn.execute(
            "INSERT INTO endpoint_tokens (lease_id, token_sha256, token_enc, rotated_ns)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(lease_id) DO UPDATE SET"
            " token_sha256 = excluded.token_sha256, token_enc = excluded.token_enc,"
            " rotated_ns = excluded.rotated_ns",
            (
                lease_id,
                token_hash(token),
                self.secrets.seal(token.encode(), _CONTEXT + lease_id),
                round(self.clock() * 1e9),
            ),
        )
        return token

    def _on_submitted(self, conn: Conn, row: LeaseRow) -> None:
        self._write(conn, row.lease_id)

    async def token(self, lease_id: str) -> str:
        """The lease's current token ("" for a lease from before tokens existed)."""

        def read(conn: Conn) -> bytes | None:
            found = conn.execute(
                "SELECT token_enc FROM endpoint_tokens WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            return bytes(found[0]) if found else None

        sealed = await self.db.call(read)
        if sealed is None:
            return ""
        return self.secrets.open(sealed, _CONTEXT + lease_id).decode()

    async def hash_of(self, lease_id: str) -> bytes:
        def read(conn: Conn) -> bytes:
            found = conn.execute(
                "SELECT token_sha256 FROM endpoint_tokens WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            return bytes(found[0]) if found else b""

        return await self.db.call(read)

    async def rotate(self, lease_id: str) -> str:
        """A new token for the lease; the old one stops working."""
        token = await self.db.call(lambda conn: self._write(conn, lease_id))
        for listener in self.on_rotate:
            listener(lease_id)
        return token
