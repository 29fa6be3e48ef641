"""Accounts, token hashes and the audit log, as rows in the scheduler database.

Plain functions over a ``Conn`` inside the caller's transaction, so
the server runs them on its database thread (``Database.call``) and
``gpu-scheduler acl bootstrap`` runs them on the database file directly: an action
and its audit entry commit together or not at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..storage import Conn
from . import tokens

Role = Literal["admin", "buyer", "provider"]
ROLES: tuple[Role, ...] = ("admin", "buyer", "provider")
ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BOOTSTRAP_ACCOUNT = "admin"
_BOOTSTRAP_KEY = "acl_bootstrapped_ns"
MAX_DESCRIPTION = 256
MAX_TTL_S = 10 * 365 * 86400  # ten years: longer is "never" (0), said explicitly
ENROLLMENT_TTL_S = 86400
MAX_AUDIT_DETAIL = 1024


class AclError(ValueError):
    """A request the ACL refuses; the message says which field and why."""


class AlreadyBootstrapped(AclError):
    """``acl bootstrap`` ran before; the first admin token was already printed."""


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    created_ns: int
    active_tokens: int = 0


@dataclass(frozen=True)
class Token:
    token_id: str
    account: str
    kind: tokens.Kind
    description: str
    created_ns: int
    expires_ns: int
    revoked_ns: int
    role: Role  # the account's role, joined in for the authenticator

    def valid_at(self, now_ns: int) -> bool:
        return not self.revoked_ns and (not self.expires_ns or now_ns < self.expires_ns)


@dataclass(frozen=True)
class AuditEntry:
    ts_ns: int
    account: str
    action: str
    target: str
    detail: str
    peer: str


def check_account_name(name: str) -> None:
    if not ACCOUNT_RE.match(name):
        raise AclError(
            f"account name {name[:80]!r}: 1-64 of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def create_account(conn: Conn, name: str, role: str, now_ns: int) -> Account:
    check_account_name(name)
    if role not in ROLES:
        raise AclError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    if conn.execute("SELECT 1 FROM acl_accounts WHERE name = ?", (name,)).fetchone():
        raise AclError(f"account {name!r} already exists")
    conn.execute(
        "INSERT INTO acl_accounts (name, role, created_ns) VALUES (?, ?, ?)", (name, role, now_ns)
    )
    return Account(name, role, now_ns)


def account(conn: Conn, name: str, now_ns: int = 0) -> Account | None:
    row = conn.execute(
        "SELECT a.name, a.role, a.created_ns, (SELECT COUNT(*) FROM acl_tokens t"
        " WHERE t.account = a.name AND t.revoked_ns = 0 AND (t.expires_ns = 0 OR t.expires_ns > ?))"
        " FROM acl_accounts a WHERE a.name = ?",
        (now_ns, name),
    ).fetchone()
    return Account(*row) if row else None


def accounts(conn: Conn, now_ns: int) -> list[Account]:
    rows = conn.execute(
        "SELECT a.name, a.role, a.created_ns, (SELECT COUNT(*) FROM acl_tokens t"
        " WHERE t.account = a.name AND t.revoked_ns = 0 AND (t.expires_ns = 0 OR t.expires_ns > ?))"
        " FROM acl_accounts a ORDER BY a.name",
        (now_ns,),
    ).fetchall()
    return [Account(*r) for r in rows]


def _ttl_ns(ttl_seconds: int) -> int:
    if ttl_seconds < 0 or ttl_seconds > MAX_TTL_S:
        raise AclError(f"ttl: must be 0 (no expiry) to {MAX_TTL_S} seconds, got {ttl_seconds}")
    return ttl_seconds * 1_000_000_000


def issue(
    conn: Conn,
    account_name: str,
    kind: tokens.Kind,
    now_ns: int,
    *,
    ttl_seconds: int = 0,
    description: str = "",
) -> tuple[Token, str]:
    """Store a new token's hash; (its row, the whole token, to be shown once)."""
    found = account(conn, account_name, now_ns)
    if found is None:
        raise AclError(f"account {account_name[:80]!r} does not exist")
    if kind == "enrollment" and found.role != "provider":
        raise AclError(
            f"account {account_name!r} is a {found.role}: enrolment tokens bind nodes to a "
            "provider account"
        )
    if len(description) > MAX_DESCRIPTION:
        raise AclError(f"description: at most {MAX_DESCRIPTION} characters")
    expires = now_ns + _ttl_ns(ttl_seconds) if ttl_seconds else 0
    token_id, secret = tokens.new_token(kind)
    conn.execute(
        "INSERT INTO acl_tokens (token_id, account, kind, hash, description, created_ns,"
        " expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (token_id, account_name, kind, tokens.token_hash(secret), description, now_ns, expires),
    )
    return Token(token_id, account_name, kind, description, now_ns, expires, 0, found.role), secret


# Column names, not a secret (ruff's S105 reads "TOKEN" as one).
_TOKEN_COLUMNS = "t.token_id, t.account, t.kind, t.description, t.created_ns, t.expires_ns," + (
    " t.revoked_ns, a.role"
)


def lookup(conn: Conn, token_hash: bytes) -> Token | None:
    row = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM acl_tokens t JOIN acl_accounts a"  # noqa: S608
        " ON a.name = t.account WHERE t.hash = ?",
        (token_hash,),
    ).fetchone()
    return Token(*row) if row else None


def token(conn: Conn, token_id: str) -> Token | None:
    row = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM acl_tokens t JOIN acl_accounts a"  # noqa: S608
        " ON a.name = t.account WHERE t.token_id = ?",
        (token_id,),
    ).fetchone()
    return Token(*row) if row else None


def list_tokens(conn: Conn, account_name: str = "") -> list[Token]:
    rows = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM acl_tokens t JOIN acl_accounts a"  # noqa: S608
        " ON a.name = t.account WHERE (? = '' OR t.account = ?) ORDER BY t.account, t.created_ns",
        (account_name, account_name),
    ).fetchall()
    return [Token(*r) for r in rows]


def revoke(conn: Conn, token_id: str, now_ns: int) -> Token:
    found = token(conn, token_id)
    if found is None:
        raise AclError(f"no token {token_id[:40]!r}")
    if not found.revoked_ns:
        conn.execute("UPDATE acl_tokens SET revoked_ns = ? WHERE token_id = ?", (now_ns, token_id))
    revoked = token(conn, token_id)
    assert revoked is not None
    return revoked


def audit(
    conn: Conn,
    now_ns: int,
    account_name: str,
    action: str,
    target: str = "",
    detail: str = "",
    peer: str = "",
) -> None:
    conn.execute(
        "INSERT INTO audit_log (ts_ns, account, action, target, detail, peer)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (now_ns, account_name, action, target[:256], detail[:MAX_AUDIT_DETAIL], peer[:256]),
    )


def audit_entries(
    conn: Conn, limit: int, account_name: str = "", action: str = ""
) -> list[AuditEntry]:
    rows = conn.execute(
        "SELECT ts_ns, account, action, target, detail, peer FROM audit_log"
        " WHERE (? = '' OR account = ?) AND (? = '' OR action = ?)"
        " ORDER BY entry_id DESC LIMIT ?",
        (account_name, account_name, action, action, limit),
    ).fetchall()
    return [AuditEntry(*r) for r in rows]


def bootstrap(conn: Conn, now_ns: int, peer: str = "local") -> tuple[Token, str]:
    """Create the first admin account and token, once per database ever."""
    done = conn.execute("SELECT value FROM meta WHERE key = ?", (_BOOTSTRAP_KEY,)).fetchone()
    if done is not None:
        raise AlreadyBootstrapped(
            "the ACL was bootstrapped already; an admin creates further tokens with "
            "'gpu-scheduler tokens create' (a lost admin token: see docs/security.md)"
        )
    if account(conn, BOOTSTRAP_ACCOUNT) is None:
        create_account(conn, BOOTSTRAP_ACCOUNT, "admin", now_ns)
    found, secret = issue(conn, BOOTSTRAP_ACCOUNT, "api", now_ns, description="acl bootstrap")
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_BOOTSTRAP_KEY, str(now_ns)))
    audit(conn, now_ns, BOOTSTRAP_ACCOUNT, "acl.bootstrap", found.token_id, "", peer)
    return found, secret


def reset_bootstrap(conn: Conn, now_ns: int) -> int:
    """Break-glass for a lost admin token (host access to the database required):
    revoke every admin token and allow ``bootstrap`` once more; returns how many."""
    cur = conn.execute(
        "UPDATE acl_tokens SET revoked_ns = ? WHERE revoked_ns = 0 AND account IN"
        " (SELECT name FROM acl_accounts WHERE role = 'admin')",
        (now_ns,),
    )
    conn.execute("DELETE FROM meta WHERE key = ?", (_BOOTSTRAP_KEY,))
    audit(conn, now_ns, "local", "acl.reset", "", f"{cur.rowcount} admin tokens revoked", "local")
    return cur.rowcount
