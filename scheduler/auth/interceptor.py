"""Authentication once per call, in a server interceptor.

The interceptor wraps each method's handler: before the handler runs, the caller
is found from ``authorization: Bearer <token>`` metadata (or, where configured,
the verified mTLS client certificate), the method's rule is checked, and the
caller is attached to the call (``caller()``). Handlers never parse tokens.

Token rows are cached for a few seconds: a revocation through this server drops
its entry at once; one made elsewhere (``acl bootstrap`` writes the database
directly) is seen within ``CACHE_TTL_S``. Misses are cached too, so a flood of
made-up tokens costs one database read each per TTL, not one per call.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc

from ..db import Database
from . import policy, store, tokens

log = logging.getLogger(__name__)

CACHE_TTL_S = 5.0
CACHE_MAX = 10_000
HOW_TO_GET_ONE = (
    "pass --token, set GPU_SCHEDULER_TOKEN or write ~/.config/gpu-scheduler/token; "
    "an admin creates one with 'gpu-scheduler tokens create ACCOUNT'"
)


@dataclass(frozen=True)
class Principal:
    account: str
    role: store.Role
    token_id: str = ""  # "" when authenticated by client certificate
    peer: str = ""

    def is_admin(self) -> bool:
        return self.role == "admin"


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "gpu_scheduler_principal", default=None
)


def caller() -> Principal:
    """The authenticated caller of the RPC being handled (set by the interceptor)."""
    found = _CURRENT.get()
    if found is None:
        # Only a handler reached without the interceptor gets here: a wiring bug.
        raise RuntimeError("no authenticated caller: the auth interceptor is not installed")
    return found


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class Authenticator:
    def __init__(
        self,
        db: Database,
        cert_accounts: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.cert_accounts = dict(cert_accounts or {})
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[float, store.Token | None]] = OrderedDict()

    def forget(self, token_id: str) -> None:
        """Drop a token from the cache (it was just revoked)."""
        for key, (_, found) in list(self._cache.items()):
            if found is not None and found.token_id == token_id:
                del self._cache[key]

    async def _lookup(self, token_hash: bytes) -> store.Token | None:
        now = time.monotonic()
        hit = self._cache.get(token_hash)
        if hit is not None and now - hit[0] < CACHE_TTL_S:
            return hit[1]
        found = await self.db.call(lambda conn: store.lookup(conn, token_hash))
        self._cache[token_hash] = (now, found)
        self._cache.move_to_end(token_hash)
        while len(self._cache) > CACHE_MAX:
            self._cache.popitem(last=False)
        return found

    async def _valid(
        self, token: str, kind: tokens.Kind, what: str, wrong_kind: str
    ) -> store.Token:
        """The stored row of a well-formed, known, unrevoked, unexpired ``kind`` token,
        or Refusal(UNAUTHENTICATED) saying which of those it is not."""
        try:
            found_kind, _ = tokens.parse(token)
        except tokens.MalformedToken as exc:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"bad {what}: {exc}") from None
        if found_kind != kind:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, wrong_kind)
        found = await self._lookup(tokens.token_hash(token))
        if found is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"bad {what}: unknown to this scheduler")
        if found.revoked_ns:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{what} {found.token_id} was revoked; get a new one",
            )
        if not found.valid_at(round(self.clock() * 1e9)):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED, f"{what} {found.token_id} expired; get a new one"
            )
        return found

    async def token_principal(self, token: str, peer: str = "") -> Principal:
        """The account an API token belongs to, or Refusal(UNAUTHENTICATED)."""
        found = await self._valid(
            token,
            "api",
            "token",
            "bad token: this is an enrolment token (gse_...), which only enrols a node; "
            "API calls need an API token (gst_...)",
        )
        return Principal(found.account, found.role, found.token_id, peer)

    async def enrollment_account(self, token: str) -> str:
        """The provider account an enrolment token is valid for, or Refusal."""
        found = await self._valid(
            token,
            "enrollment",
            "enrolment token",
            "an API token (gst_...) is not an enrolment token: get one with "
            "'gpu-scheduler nodes enroll'",
        )
        return found.account

    async def _cert_principal(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal | None:
        if not self.cert_accounts:
            return None
        auth = context.auth_context()
        names = [n.decode(errors="replace") for n in auth.get("x509_common_name", [])]
        names += [n.decode(errors="replace") for n in auth.get("x509_subject_alternative_name", [])]
        for name in names:
            account_name = self.cert_accounts.get(name)
            if account_name is None:
                continue
            found = await self.db.call(functools.partial(store.account, name=account_name))
            if found is not None:
                return Principal(found.name, found.role, "", context.peer())
        return None

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        headers = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(headers) > 1:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header")
        if headers:
            value = headers[0] if isinstance(headers[0], str) else headers[0].decode()
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "authorization metadata must be 'Bearer <token>'",
                )
            return await self.token_principal(token.strip(), context.peer())
        by_cert = await self._cert_principal(context)
        if by_cert is not None:
            return by_cert
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"no token: {HOW_TO_GET_ONE}")


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        found = policy.rule(method)
        if handler is None or (found is not None and found.public):
            return handler
        if found is None or handler.unary_unary is None:
            # Deny by default: a method without a rule, or a guarded streaming one.
            return _refusing(
                handler, Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method}: denied")
            )
        # grpc.aio handlers are coroutines; the stubs type them as the sync kind.
        guarded = self._guard(method, found, cast(Behavior, handler.unary_unary))
        return cast(Handler, handler._replace(unary_unary=guarded))  # type: ignore[attr-defined]

    def _guard(self, method: str, rule: policy.Rule, behavior: Behavior) -> Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                principal = await self.authenticator.authenticate(context)
            except Refusal as exc:
                log.info(
                    "call refused: %s",
                    exc,
                    extra={"method": method, "peer": context.peer(), "code": exc.code.name},
                )
                await context.abort(exc.code, str(exc))
                raise AssertionError("abort returned") from None
            if principal.role not in rule.roles:
                wanted = " or ".join(sorted(rule.roles))
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method.rsplit('/', 1)[-1]} needs the {wanted} role; account "
                    f"{principal.account!r} is a {principal.role}",
                )
            token = _CURRENT.set(principal)
            try:
                return await behavior(request, context)
            finally:
                _CURRENT.reset(token)

        return guarded


def _refusing(handler: Handler, refusal: Refusal) -> Handler:
    """``handler`` with its behaviour replaced by one that aborts with ``refusal``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(refusal.code, str(refusal))

    kind = (
        "stream_stream"
        if handler.request_streaming and handler.response_streaming
        else "stream_unary"
        if handler.request_streaming
        else "unary_stream"
        if handler.response_streaming
        else "unary_unary"
    )
    return cast(Handler, handler._replace(**{kind: refuse}))  # type: ignore[attr-defined]
