"""``gpu-scheduler acl|accounts|tokens|audit|whoami``: who may do what (docs/security.md).

``acl bootstrap`` works on the database file itself, so only someone who can
read the scheduler's state directory (root or the scheduler's user, on its host)
can mint the first admin token; it runs once per database. Everything else goes
through the server's ``Acl`` service with a token, like every client command.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.json_format import MessageToDict

from gpuagent.text import escape_controls
from gpuagent.units import parse_duration
from gpuagent.v1 import acl_pb2, acl_pb2_grpc

from .auth import store
from .auth.service import ROLE_PB
from .cli import UsageError, load_config_from_args
from .client import RpcFailed, connection_parent, invoke
from .db import DatabaseError, PostgresDatabase, in_transaction, migrate
from .storage import Conn, StorageError, Target

ROLE_TEXT = {v: k for k, v in ROLE_PB.items()}


T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()
    acl = sub.add_parser("acl", help="bootstrap the first admin token (on the scheduler's host)")
    acl_sub = acl.add_subparsers(dest="acl_command", metavar="ACTION", required=True)
    boot = acl_sub.add_parser(
        "bootstrap", help="create the admin account and print its token, once per database"
    )
    boot.add_argument(
        "--token-file", type=Path, help="write the token to this file (0600) instead of stdout"
    )
    boot.set_defaults(handler=_bootstrap)
    reset = acl_sub.add_parser(
        "reset", help="lost admin token: revoke every admin token and allow bootstrap again"
    )
    reset.add_argument("--yes", action="store_true", help="really do it")
    reset.set_defaults(handler=_reset)

    accounts = sub.add_parser("accounts", parents=[conn], help="accounts and their roles (admin)")
    accounts.set_defaults(handler=_accounts_list)
    acc_sub = accounts.add_subparsers(dest="accounts_command", metavar="ACTION")
    acc_sub.add_parser("list", parents=[conn], help="every account").set_defaults(
        handler=_accounts_list
    )
    create = acc_sub.add_parser("create", parents=[conn], help="a new account")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--role", required=True, choices=store.ROLES)
    create.add_argument(
        "--with-token", action="store_true", help="also create and print an API token for it"
    )
    create.set_defaults(handler=_accounts_create)

    tokens = sub.add_parser("tokens", parents=[conn], help="API tokens")
    tokens.set_defaults(handler=_tokens_list)
    tok_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    tlist = tok_sub.add_parser("list", parents=[conn], help="tokens (yours; admin: everyone's)")
    tlist.add_argument("account", nargs="?", default="", metavar="ACCOUNT")
    tlist.set_defaults(handler=_tokens_list)
    tcreate = tok_sub.add_parser("create", parents=[conn], help="a new token, printed once")
    tcreate.add_argument("account", nargs="?", default="", metavar="ACCOUNT")
    tcreate.add_argument(
        "--ttl", metavar="DURATION", help="expires after this long (default never)"
    )
    tcreate.add_argument("--description", default="", help="a note kept with the token")
    tcreate.set_defaults(handler=_tokens_create)
    revoke = tok_sub.add_parser("revoke", parents=[conn], help="revoke a token by its id")
    revoke.add_argument("token_id", metavar="TOKEN_ID")
    revoke.set_defaults(handler=_tokens_revoke)

    audit = sub.add_parser("audit", parents=[conn], help="the audit log, newest first (admin)")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--account", default="", help="only what this account did")
    audit.add_argument("--action", default="", help="only this action (e.g. deposit)")
    audit.set_defaults(handler=_audit)

    whoami = sub.add_parser("whoami", parents=[conn], help="the account your token belongs to")
    whoami.set_defaults(handler=_whoami)


def _txn(args: argparse.Namespace, fn: Callable[[Conn], T]) -> T:
    """``fn(conn)`` in one transaction on the configured database (SQLite or PostgreSQL),
    migrated first: the scheduler need not run."""
    config = load_config_from_args(args).database
    try:
        target = config.target()
    except StorageError as exc:
        raise UsageError(str(exc)) from None
    if target.dialect == "postgresql":
        return _pg_txn(target, fn)
    path = target.path
    assert path is not None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn)
        path.chmod(0o600)
    except (sqlite3.Error, OSError, DatabaseError) as exc:
        raise UsageError(f"{path}: cannot open the scheduler database: {exc}") from None
    try:
        return in_transaction(conn, fn)
    finally:
        conn.close()
        keep_owner(path)


def _pg_txn(target: Target, fn: Callable[[Conn], T]) -> T:
    db = PostgresDatabase(target, pool_size=1)
    try:
        db._open()
        return db.call_sync(fn)
    except DatabaseError as exc:
        raise UsageError(f"cannot open the scheduler database: {exc}") from None
    finally:
        if db._pool is not None:
            db._pool.close()


def keep_owner(db_path: Path) -> None:
    """Root running this on the scheduler's database (the usual way on its host) must
    leave the files the scheduler's: a root-owned WAL or database would stop the
    service (it runs as its own user) from opening them on its next start."""
    if os.geteuid() != 0:
        return
    owner = db_path.parent.stat()
    if owner.st_uid == 0:
        return
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        if path.exists() and path.stat().st_uid != owner.st_uid:
            os.chown(path, owner.st_uid, owner.st_gid)


def _bootstrap(args: argparse.Namespace) -> int:
    try:
        found, secret = _txn(args, lambda c: store.bootstrap(c, time.time_ns()))
    except store.AlreadyBootstrapped as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    if args.token_file is not None:
        write_token_file(args.token_file, secret)
        print(f"admin token {found.token_id} written to {args.token_file}", file=sys.stderr)  # noqa: T201
        return 0
    print(secret)  # noqa: T201
    print(  # noqa: T201
        f"# admin token {found.token_id} for account {found.account!r}: shown only once, "
        "stored only as a hash. Keep it like a root password.",
        file=sys.stderr,
    )
    return 0


def _reset(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError("acl reset revokes every admin token; run it with --yes")
    revoked = _txn(args, lambda c: store.reset_bootstrap(c, time.time_ns()))
    print(f"{revoked} admin tokens revoked; run 'gpu-scheduler acl bootstrap' for a new one")  # noqa: T201
    return 0


def write_token_file(path: Path, secret: str) -> None:
    """Write a token 0600 (created that way, never briefly readable by others)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secret + "\n")
    path.chmod(0o600)


def _call(args: argparse.Namespace, fn: str, request: Any) -> Any:
    try:
        return invoke(args, acl_pb2_grpc.AclStub, fn, request)
    except RpcFailed:
        return None


def _when(unix_nanos: int) -> str:
    if not unix_nanos:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_nanos / 1e9))


def _table(given: Sequence[tuple[str, ...]]) -> None:
    rows = [tuple(escape_controls(c) for c in row) for row in given]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())  # noqa: T201


def _accounts_list(args: argparse.Namespace) -> int:
    response = _call(args, "ListAccounts", acl_pb2.ListAccountsRequest())
    if response is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps([MessageToDict(a) for a in response.accounts], indent=2))  # noqa: T201
        return 0
    rows = [("ACCOUNT", "ROLE", "TOKENS", "CREATED (UTC)")]
    rows += [
        (a.name, ROLE_TEXT.get(a.role, "?"), str(a.active_tokens), _when(a.created_at_unix_nanos))
        for a in response.accounts
    ]
    _table(rows)
    return 0


def _accounts_create(args: argparse.Namespace) -> int:
    try:
        store.check_account_name(args.name)
    except store.AclError as exc:
        raise UsageError(str(exc)) from None
    made = _call(
        args, "CreateAccount", acl_pb2.CreateAccountRequest(name=args.name, role=ROLE_PB[args.role])
    )
    if made is None:
        return 1
    print(f"account {made.name} ({args.role}) created", file=sys.stderr)  # noqa: T201
    if args.with_token:
        token = _call(args, "CreateToken", acl_pb2.CreateTokenRequest(account=made.name))
        if token is None:
            return 1
        print(token.secret)  # noqa: T201
    return 0


def _ttl(text: str | None) -> int:
    if text is None:
        return 0
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if seconds <= 0 or seconds > store.MAX_TTL_S:
        raise UsageError(f"--ttl: more than 0 and at most {store.MAX_TTL_S} seconds (ten years)")
    return round(seconds)


def _tokens_create(args: argparse.Namespace) -> int:
    request = acl_pb2.CreateTokenRequest(
        account=args.account, description=args.description, ttl_seconds=_ttl(args.ttl)
    )
    made = _call(args, "CreateToken", request)
    if made is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"token": made.secret, **MessageToDict(made.token)}, indent=2))  # noqa: T201
        return 0
    print(made.secret)  # noqa: T201
    print(  # noqa: T201
        f"# token {made.token.token_id} for account {made.token.account!r}: shown only once",
        file=sys.stderr,
    )
    return 0


def _tokens_list(args: argparse.Namespace) -> int:
    response = _call(args, "ListTokens", acl_pb2.ListTokensRequest(account=args.account))
    if response is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps([MessageToDict(t) for t in response.tokens], indent=2))  # noqa: T201
        return 0
    now = time.time_ns()
    rows = [("TOKEN ID", "ACCOUNT", "KIND", "STATE", "CREATED (UTC)", "EXPIRES", "DESCRIPTION")]
    for t in response.tokens:
        if t.revoked_at_unix_nanos:
            state = "revoked"
        elif t.expires_at_unix_nanos and t.expires_at_unix_nanos <= now:
            state = "expired"
        else:
            state = "active"
        rows.append(
            (
                t.token_id,
                t.account,
                t.kind,
                state,
                _when(t.created_at_unix_nanos),
                _when(t.expires_at_unix_nanos) if t.expires_at_unix_nanos else "never",
                t.description,
            )
        )
    _table(rows)
    return 0


def _tokens_revoke(args: argparse.Namespace) -> int:
    revoked = _call(args, "RevokeToken", acl_pb2.RevokeTokenRequest(token_id=args.token_id))
    if revoked is None:
        return 1
    print(f"token {revoked.token_id} of {revoked.account} revoked")  # noqa: T201
    return 0


def _audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit: 1..1000")
    request = acl_pb2.AuditRequest(limit=args.limit, account=args.account, action=args.action)
    response = _call(args, "Audit", request)
    if response is None:
        return 1
    if getattr(args, "json", False):
        print(json.dumps([MessageToDict(e) for e in response.entries], indent=2))  # noqa: T201
        return 0
    rows = [("WHEN (UTC)", "ACCOUNT", "ACTION", "TARGET", "DETAIL", "FROM")]
    rows += [
        (_when(e.at_unix_nanos), e.account, e.action, e.target, e.detail, e.peer)
        for e in response.entries
    ]
    _table(rows)
    return 0


def _whoami(args: argparse.Namespace) -> int:
    response = _call(args, "WhoAmI", acl_pb2.WhoAmIRequest())
    if response is None:
        return 1
    print(f"{response.account} ({ROLE_TEXT.get(response.role, '?')})")  # noqa: T201
    return 0
