"""``Acl``: accounts, tokens, enrolment tokens and the audit log over gRPC.

Roles are checked by the interceptor (``policy.RULES``); this module checks the
finer rule that a non-admin acts only on its own account, and writes each change
and its audit entry in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from gpuagent.v1 import acl_pb2, acl_pb2_grpc

from ..db import Database
from ..storage import Conn
from . import store, tokens
from .interceptor import Authenticator, Principal, caller

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

ROLE_PB: dict[str, acl_pb2.Role.ValueType] = {
    "admin": acl_pb2.ROLE_ADMIN,
    "buyer": acl_pb2.ROLE_BUYER,
    "provider": acl_pb2.ROLE_PROVIDER,
}
ROLE_NAME = {v: k for k, v in ROLE_PB.items()}
MAX_AUDIT = 1000


def token_pb(found: store.Token) -> acl_pb2.ApiToken:
    return acl_pb2.ApiToken(
        token_id=found.token_id,
        account=found.account,
        description=found.description,
        created_at_unix_nanos=found.created_ns,
        expires_at_unix_nanos=found.expires_ns,
        revoked_at_unix_nanos=found.revoked_ns,
        kind=found.kind,
    )


def account_pb(found: store.Account) -> acl_pb2.AclAccount:
    return acl_pb2.AclAccount(
        name=found.name,
        role=ROLE_PB[found.role],
        created_at_unix_nanos=found.created_ns,
        active_tokens=found.active_tokens,
    )


async def _abort(context: Context, code: grpc.StatusCode, text: str) -> NoReturn:
    await context.abort(code, text)
    raise AssertionError("abort returned")


class AclService(acl_pb2_grpc.AclServicer):
    def __init__(
        self, db: Database, authenticator: Authenticator, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.authenticator = authenticator
        self.clock = clock

    def _now(self) -> int:
        return round(self.clock() * 1e9)

    async def _txn(self, context: Context, fn: Callable[[Conn], T]) -> T:
        try:
            return await self.db.call(fn)
        except store.AclError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _own_account(self, context: Context, who: Principal, named: str) -> str:
        """The account a request acts on: its own for non-admins (naming another is refused)."""
        if not named or named == who.account:
            return who.account
        if not who.is_admin():
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"account {who.account!r} may act only on its own tokens, not {named[:80]!r}",
            )
        return named

    async def WhoAmI(
        self, request: acl_pb2.WhoAmIRequest, context: Context
    ) -> acl_pb2.WhoAmIResponse:
        who = caller()
        return acl_pb2.WhoAmIResponse(
            account=who.account, role=ROLE_PB[who.role], token_id=who.token_id
        )

    async def CreateAccount(
        self, request: acl_pb2.CreateAccountRequest, context: Context
    ) -> acl_pb2.AclAccount:
        who, now = caller(), self._now()
        role = ROLE_NAME.get(request.role)
        if role is None:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "role: admin, buyer or provider"
            )

        def txn(conn: Conn) -> store.Account:
            made = store.create_account(conn, request.name, role, now)
            store.audit(
                conn, now, who.account, "account.create", made.name, f"role={role}", who.peer
            )
            return made

        return account_pb(await self._txn(context, txn))

    async def ListAccounts(
        self, request: acl_pb2.ListAccountsRequest, context: Context
    ) -> acl_pb2.ListAccountsResponse:
        now = self._now()
        found = await self.db.call(lambda conn: store.accounts(conn, now))
        return acl_pb2.ListAccountsResponse(accounts=[account_pb(a) for a in found])

    async def _issue(
        self, context: Context, account: str, kind: tokens.Kind, ttl: int, description: str
    ) -> acl_pb2.CreateTokenResponse:
        """Mint a token for ``account`` (the caller's own unless admin) and audit it;
        store.issue refuses a bad ttl, description or account."""
        who, now = caller(), self._now()
        target = await self._own_account(context, who, account)
        action = "token.create" if kind == "api" else "enrollment.create"

        def txn(conn: Conn) -> tuple[store.Token, str]:
            made, secret = store.issue(
                conn, target, kind, now, ttl_seconds=ttl, description=description
            )
            store.audit(
                conn, now, who.account, action, made.token_id, f"account={target}", who.peer
            )
            return made, secret

        made, secret = await self._txn(context, txn)
        return acl_pb2.CreateTokenResponse(token=token_pb(made), secret=secret)

    async def CreateToken(
        self, request: acl_pb2.CreateTokenRequest, context: Context
    ) -> acl_pb2.CreateTokenResponse:
        return await self._issue(
            context, request.account, "api", request.ttl_seconds, request.description
        )

    async def ListTokens(
        self, request: acl_pb2.ListTokensRequest, context: Context
    ) -> acl_pb2.ListTokensResponse:
        who = caller()
        named = request.account
        target = (
            "" if (who.is_admin() and not named) else await self._own_account(context, who, named)
        )
        found = await self.db.call(lambda conn: store.list_tokens(conn, target))
        return acl_pb2.ListTokensResponse(tokens=[token_pb(t) for t in found])

    async def RevokeToken(
        self, request: acl_pb2.RevokeTokenRequest, context: Context
    ) -> acl_pb2.ApiToken:
        who, now = caller(), self._now()

        def txn(conn: Conn) -> store.Token | None:
            found = store.token(conn, request.token_id)
            # Someone else's token id answers as a missing one: ids cannot be probed.
            if found is None or (not who.is_admin() and found.account != who.account):
                return None
            revoked = store.revoke(conn, request.token_id, now)
            store.audit(
                conn,
                now,
                who.account,
                "token.revoke",
                revoked.token_id,
                f"account={revoked.account}",
                who.peer,
            )
            return revoked

        revoked = await self._txn(context, txn)
        if revoked is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no token {request.token_id[:40]!r}")
        self.authenticator.forget(revoked.token_id)
        return token_pb(revoked)

    async def CreateEnrollmentToken(
        self, request: acl_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> acl_pb2.CreateTokenResponse:
        ttl = request.ttl_seconds or store.ENROLLMENT_TTL_S
        return await self._issue(context, request.account, "enrollment", ttl, request.description)

    async def Audit(self, request: acl_pb2.AuditRequest, context: Context) -> acl_pb2.AuditResponse:
        limit = min(request.limit or 100, MAX_AUDIT)
        found = await self.db.call(
            lambda conn: store.audit_entries(conn, limit, request.account, request.action)
        )
        return acl_pb2.AuditResponse(
            entries=[
                acl_pb2.AuditEntry(
                    at_unix_nanos=e.ts_ns,
                    account=e.account,
                    action=e.action,
                    target=e.target,
                    detail=e.detail,
                    peer=e.peer,
                )
                for e in found
            ]
        )
