"""``Leases``: the buyer's API (``gpu-scheduler submit|leases|lease|cancel|logs``).

Submit checks the spec's shape here, with an error naming the field, so a
buyer learns at once what the agents would reject anyway; then it stores the
lease as pending and asks the dispatcher for a placement pass.
"""

from __future__ import annotations

import datetime
import logging
import math
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from gpuagent import bounds, leaserules, market
from gpuagent.direct_url import direct_url
from gpuagent.v1 import leases_pb2, leases_pb2_grpc

from . import output_fetch, outputs_store
from .auth.interceptor import Principal, caller
from .lease_dispatch import LeaseDispatcher
from .leases_store import (
    IdempotencyConflict,
    LeaseRefused,
    LeaseRow,
    LeaseStore,
    NewLease,
    state_name,
)
from .ledger import format_micros, reservation_micros
from .registry import Registry
from .storage import Conn

if TYPE_CHECKING:
    from .endpoint_tokens import EndpointTokens
    from .verify import Verifier

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE = 100
MAX_PAGE = 1000
# List answers stop adding leases past this many bytes, well under gRPC's 4 MiB
# default, so a page of big specs never outgrows what a client accepts.
MAX_PAGE_BYTES = 2 * 1024 * 1024


class SpecError(ValueError):
    """The spec cannot be run by any agent; the message names the field."""


def validate_spec(spec: leases_pb2.LeaseSpec) -> None:
    """Raise SpecError for the first field no agent would accept."""
    try:
        bounds.check(spec, "spec")
    except bounds.BoundsError as exc:
        raise SpecError(str(exc)) from None
    if not spec.image.strip():
        raise SpecError("spec.image: required (an image reference such as busybox:1.36)")
    at = leaserules.control_char(spec.image)
    if at is not None:
        raise SpecError(f"spec.image: control character at position {at}; not an image reference")
    for name, limit in leaserules.UINT64_FIELDS.items():
        value = getattr(spec, name)
        if value > limit:
            raise SpecError(f"spec.{name}: at most {limit}, got {value}")
    argv = leaserules.argv_bytes(list(spec.command), list(spec.args))
    if argv > leaserules.MAX_ARGV_BYTES:
        raise SpecError(
            f"spec.command/args: {argv} bytes together, "
            f"over the {leaserules.MAX_ARGV_BYTES} allowed"
        )
    env = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in spec.env.items())
    if env > leaserules.MAX_ENV_BYTES:
        raise SpecError(f"spec.env: {env} bytes, over the {leaserules.MAX_ENV_BYTES} allowed")
    if not 1 <= spec.gpu_count <= leaserules.MAX_GPUS_PER_LEASE:
        raise SpecError(
            f"spec.gpu_count: must be 1..{leaserules.MAX_GPUS_PER_LEASE}, got {spec.gpu_count}"
        )
    if not math.isfinite(spec.cpus) or spec.cpus < 0:
        raise SpecError(f"spec.cpus: must be a finite number >= 0, got {spec.cpus}")
    for name in leaserules.SCHEDULER_REFUSED_FIELDS:
        field = spec.DESCRIPTOR.fields_by_name[name]
        value = getattr(spec, name)
        if (field.is_repeated and len(value)) or (not field.is_repeated and value):
            raise SpecError(
                f"spec.{name}: not allowed; agents never grant it and would reject the lease"
            )
    if spec.network_mode not in leaserules.BUYER_NETWORK_MODES:
        raise SpecError(
            f"spec.network_mode: {spec.network_mode[:64]!r} is not allowed "
            "(empty for the lease's own network, or none)"
        )
    if spec.network_mode == "none" and spec.ports:
        raise SpecError(f"spec.network_mode: {leaserules.PORTS_WITHOUT_NETWORK}")
    for key in spec.env:
        if not key or "=" in key or "\0" in key:
            raise SpecError(f"spec.env[{key!r}]: names must be non-empty without '=' or NUL")
    # Ports, restart policy and health check: the agent's own rules (gpuagent.leaserules).
    ports = [leaserules.Port(p.name, p.container_port, p.protocol) for p in spec.ports]
    try:
        leaserules.check_ports(ports)
        leaserules.check_restart(spec.restart, spec.max_restarts)
        if spec.HasField("health"):
            h = spec.health
            leaserules.check_health(
                leaserules.Health(
                    h.path,
                    h.port,
                    h.initial_delay,
                    h.period,
                    h.timeout,
                    h.failure_threshold,
                    h.startup_grace,
                ),
                ports,
            )
        # Batch outputs (PROTOCOL.md "Lease outputs"): never a path outside /scratch.
        leaserules.check_outputs(
            list(spec.outputs),
            spec.output_max_bytes,
            spec.output_retention_seconds,
            spec.outputs_required,
        )
    except leaserules.RuleError as exc:
        raise SpecError(f"spec.{exc}") from None
    validate_constraints(spec.constraints)
    try:
        leaserules.check_verify(
            spec.verify.replicas, list(spec.outputs), len(spec.ports), spec.restart
        )
    except leaserules.RuleError as exc:
        raise SpecError(f"spec.{exc}") from None


def validate_constraints(c: leases_pb2.Constraints) -> None:
    """Market constraints (docs/leases-buyer.md): a region with no nodes is fine (the
    lease waits); a malformed one is refused here, naming the key."""
    where = "spec.constraints"
    try:
        market.check_name(c.region, f"{where}.region")
        market.check_countries(c.countries, f"{where}.countries")
        market.check_ratio(c.min_uptime_ratio, f"{where}.min_uptime_ratio")
        market.check_selector(c.node_selector, f"{where}.node_selector")
        market.check_bandwidth(
            c.min_bandwidth_bits_per_second, f"{where}.min_bandwidth_bits_per_second"
        )
    except market.MarketError as exc:
        raise SpecError(str(exc)) from None


async def _abort(context: Context, code: grpc.StatusCode, text: str) -> NoReturn:
    await context.abort(code, text)
    raise AssertionError("abort returned")


def _provider_view(lease: leases_pb2.Lease) -> leases_pb2.Lease:
    """A lease as its node's provider may see it: metadata, not the buyer's secrets."""
    lease.spec.ClearField("env")
    return lease


class LeasesService(leases_pb2_grpc.LeasesServicer):
    def __init__(
        self,
        store: LeaseStore,
        dispatcher: LeaseDispatcher,
        registry: Registry,
        *,
        escrow: bool = False,
        tokens: EndpointTokens | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.registry = registry
        self.escrow = escrow  # ledger.escrow: Submit reserves the lease's maximum cost
        self.tokens = tokens
        self.verify: Verifier | None = None  # redundant runs (scheduler/verify.py)
        # (lease id, port name) -> the buyer's URL at the relay; None = no relay.
        self.endpoint_url: Callable[[str, str], str] | None = None
        # Outputs downloads (scheduler/output_fetch.py): tickets and the relay's URL of a
        # lease's archive; None = no relay, so nothing to fetch through.
        self.tickets: output_fetch.OutputTickets | None = None
        self.outputs_url: Callable[[str], str] | None = None

    def _with_urls(self, lease: leases_pb2.Lease) -> leases_pb2.Lease:
        """The coordinator fills each reported endpoint's URL (the agent cannot know it)."""
        for endpoint in lease.endpoints:
            # Direct mode (the agent serves the port itself): its URL before the relay's.
            url = direct_url(endpoint.protocol, endpoint.direct_address, endpoint.direct_tls)
            if not url and self.endpoint_url is not None:
                url = self.endpoint_url(lease.lease_id, endpoint.name)
            endpoint.url = url
        return lease

    async def _with_token(self, who: Principal, lease: leases_pb2.Lease) -> leases_pb2.Lease:
        """The endpoint token goes to the lease's buyer only: not to its provider, and not
        to an admin acting for the buyer (who can rotate it instead)."""
        self._with_urls(lease)
        if self.tokens is not None and lease.buyer == who.account and lease.spec.ports:
            lease.endpoint_token = await self.tokens.token(lease.lease_id)
        return lease

    def _provider_nodes(self, who: Principal) -> set[str]:
        return {r.node_id for r in self.registry.nodes.values() if r.owner == who.account}

    def _visible(self, who: Principal, row: LeaseRow) -> bool:
        if who.is_admin():
            return True
        if who.role == "buyer":
            return row.buyer == who.account
        return row.node_id is not None and row.node_id in self._provider_nodes(who)

    async def _row(self, context: Context, lease_id: str, who: Principal) -> LeaseRow:
        """The lease if the caller may see it; another account's answers as missing."""
        row = await self.store.get(lease_id)
        if row is None or not self._visible(who, row):
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no lease {lease_id[:140]!r}")
        return row

    async def _checked(
        self, request: leases_pb2.SubmitLeaseRequest, context: Context
    ) -> tuple[str, str]:
        """(buyer, pinned node id) of a request Submit would take; else the call aborts."""
        who = caller()
        buyer = who.account
        if request.buyer and request.buyer != who.account:
            if not who.is_admin():
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"buyer: this token is account {who.account!r}; a lease is billed to the "
                    "account that submits it (leave buyer empty)",
                )
            buyer = request.buyer  # an admin submitting on a buyer's behalf
        try:
            validate_spec(request.spec)
        except SpecError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        key = request.idempotency_key
        if key and not leaserules.LEASE_ID_RE.match(key):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"idempotency_key: {leaserules.LEASE_ID_RULE} (it becomes the lease id)",
            )
        if len(buyer) > 128:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "buyer: at most 128 characters")
        pinned = ""
        if request.node_id and request.spec.verify.replicas > 1:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "node_id: a verified lease (spec.verify.replicas) runs on several nodes of "
                "distinct providers; it cannot be pinned to one",
            )
        if request.node_id:
            record = self.registry.find(request.node_id)
            if record is None:
                await _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"node_id: no node with id or unique prefix {request.node_id[:80]!r}",
                )
            pinned = record.node_id
        return buyer, pinned

    async def Quote(
        self, request: leases_pb2.SubmitLeaseRequest, context: Context
    ) -> leases_pb2.LeaseQuote:
        """What Submit would do now: the node, its price, the escrow; nothing reserved."""
        _buyer, pinned = await self._checked(request, context)
        spec = request.spec
        decision = await self.dispatcher.quote(spec, pinned)
        escrow = 0
        copies = max(spec.verify.replicas, 1)
        if self.escrow:
            escrow = copies * reservation_micros(
                spec.price_micro_per_gpu_hour, spec.gpu_count, spec.max_duration_seconds
            )
        quote = leases_pb2.LeaseQuote(
            placeable=decision.placement is not None,
            escrow_micros=escrow,
            reason=decision.summary(),
            excluded=decision.skipped_counts(),
            candidates=decision.candidates,
        )
        if copies > 1 and quote.placeable:
            wait = await self.dispatcher.quote_copies(spec, copies)
            if wait:
                quote.placeable = False
                quote.reason = f"copies would wait: {wait}; {quote.reason}"
        chosen = decision.placement
        if chosen is not None:
            quote.node_id = chosen.node_id
            quote.gpu_uuids.extend(chosen.gpu_uuids)
            quote.ask_micros_per_gpu_hour = chosen.ask_micros
            quote.gpu_model = chosen.gpu_model
        if escrow:
            quote.reason += (
                f"; submit reserves {format_micros(escrow)} (the ceiling "
                f"{format_micros(spec.price_micro_per_gpu_hour)}/GPU-hour x {spec.gpu_count} "
                f"GPU x {spec.max_duration_seconds}s"
                + (f" x {copies} copies" if copies > 1 else "")
                + "); usage is charged at the node's ask"
            )
        if copies > 1:
            quote.reason += (
                f"; verified: {copies} copies on {copies} distinct providers, each billed as "
                "its own lease"
                + (
                    "; if the 2 disagree, a tie-break copy reserves one more copy's escrow"
                    if copies == 2
                    else ""
                )
            )
        return quote

    async def Submit(
        self, request: leases_pb2.SubmitLeaseRequest, context: Context
    ) -> leases_pb2.Lease:
        buyer, pinned = await self._checked(request, context)
        new = NewLease(
            lease_id=request.idempotency_key or f"lease-{uuid.uuid4().hex[:20]}",
            buyer=buyer,
            spec=request.spec,
            pinned_node_id=pinned,
            replace_on_lost=request.replace_on_lost,
        )
        replicas = request.spec.verify.replicas
        also = None
        if replicas > 1:
            if self.verify is None:
                await _abort(
                    context, grpc.StatusCode.UNIMPLEMENTED, "this scheduler runs no verified leases"
                )
            also = self.verify.submit_copies(replicas)
        try:
            row, created = await self.store.submit(new, also=also)
        except IdempotencyConflict as exc:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except LeaseRefused as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if created:
            log.info(
                "lease submitted",
                extra={
                    "lease_id": row.lease_id,
                    "buyer": row.buyer,
                    "image": row.spec.image,
                    "gpus": row.gpu_count,
                    "price_max": row.price_micros_per_gpu_hour,
                    "pinned_node_id": pinned,
                },
            )
            if replicas > 1:
                self.store.stored(replicas)
            self.dispatcher.kick()
        lease = row.to_proto()
        if not created or replicas > 1:
            # Only a redundant run's parent has copies; a new lease is nobody's copy (its
            # id was free). Skipping the read saves a transaction on every Submit.
            lease = await self._verified(lease)
        return await self._with_token(caller(), lease)

    async def _verified(self, lease: leases_pb2.Lease) -> leases_pb2.Lease:
        """A redundant run's parent with its copies; a copy with its parent id."""
        if self.verify is None:
            return lease
        return await self.verify.describe(lease)

    async def Get(self, request: leases_pb2.GetLeaseRequest, context: Context) -> leases_pb2.Lease:
        who = caller()
        row = await self._row(context, request.lease_id, who)
        lease = row.to_proto(await self.store.events(row.lease_id))
        commitment = await outputs_store.get_commitment(self.store.db, row.lease_id)
        if commitment is not None:
            lease.outputs.CopyFrom(commitment)
        lease = await self._verified(lease)
        if who.role == "provider":
            return self._with_urls(_provider_view(lease))
        return await self._with_token(who, lease)

    async def List(
        self, request: leases_pb2.ListLeasesRequest, context: Context
    ) -> leases_pb2.ListLeasesResponse:
        who = caller()
        after = 0
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 19:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token")
            after = int(request.page_token)
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        buyer, node_ids = request.buyer, None
        if who.role == "buyer":
            if buyer and buyer != who.account:
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"buyer: account {who.account!r} may list only its own leases",
                )
            buyer = who.account
        elif who.role == "provider":
            node_ids = self._provider_nodes(who)
            if request.node_id:
                record = self.registry.find(request.node_id)
                if record is None or record.node_id not in node_ids:
                    await _abort(
                        context,
                        grpc.StatusCode.NOT_FOUND,
                        f"node_id: no node of account {who.account!r} matches "
                        f"{request.node_id[:80]!r}",
                    )
        rows, next_after = await self.store.list_leases(
            states=[state_name(s) for s in request.states],
            node_id=request.node_id,
            node_ids=node_ids,
            buyer=buyer,
            limit=size,
            after_rowid=after,
        )
        response = leases_pb2.ListLeasesResponse()
        used = 0
        commitments = await outputs_store.get_commitments(
            self.store.db, [r.lease_id for r in rows if r.spec.outputs]
        )
        for index, row in enumerate(rows):
            lease = self._with_urls(row.to_proto())
            if row.lease_id in commitments:
                lease.outputs.CopyFrom(commitments[row.lease_id])
            if who.role == "provider":
                _provider_view(lease)
            used += lease.ByteSize()
            if used > MAX_PAGE_BYTES and index > 0:
                # The rest goes to the next page: continue after the last one sent.
                next_after = rows[index - 1].rowid
                break
            response.leases.append(lease)
        response.next_page_token = str(next_after) if next_after else ""
        return response

    async def Cancel(
        self, request: leases_pb2.CancelLeaseRequest, context: Context
    ) -> leases_pb2.Lease:
        await self._row(context, request.lease_id, caller())
        result = await self.dispatcher.cancel(request.lease_id, request.reason[:512])
        if result is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no lease {request.lease_id[:140]!r}")
        if self.verify is not None:
            # A redundant run's parent (never placed) ends at once, before its copies, so
            # their ending reads as a cancel: each is paid what it ran (verification.md).
            for copy_id in await self.verify.copy_ids_of(request.lease_id):
                await self.dispatcher.cancel(copy_id, request.reason[:512] or "parent cancelled")
        return await self._verified(result.row.to_proto(await self.store.events(request.lease_id)))

    async def Logs(
        self, request: leases_pb2.LeaseLogsRequest, context: Context
    ) -> leases_pb2.LeaseLogsResponse:
        row = await self._row(context, request.lease_id, caller())
        text = row.log_tail
        if request.tail_lines:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-request.tail_lines :])
        return leases_pb2.LeaseLogsResponse(log_tail=text, updated_at_unix_nanos=row.updated_ns)

    async def RotateEndpointToken(
        self, request: leases_pb2.RotateEndpointTokenRequest, context: Context
    ) -> leases_pb2.EndpointToken:
        who = caller()
        row = await self._row(context, request.lease_id, who)
        if self.tokens is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this scheduler has no endpoints")
        if row.terminal:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {row.lease_id} has ended ({row.state}); its endpoints are gone",
            )
        token = await self.tokens.rotate(row.lease_id)
        log.info("endpoint token rotated", extra={"lease_id": row.lease_id, "by": who.account})
        # An admin rotating for a buyer gets no token: the buyer reads the new one itself.
        return leases_pb2.EndpointToken(
            lease_id=row.lease_id, token=token if row.buyer == who.account else ""
        )

    async def _fetchable(self, context: Context, row: LeaseRow) -> leases_pb2.OutputCommitment:
        """The commitment whose archive the buyer downloads for ``row``: its own, or for a
        redundant run's parent the commitment of a paid copy (the agreed result)."""
        commitment = await outputs_store.get_commitment(self.store.db, row.lease_id)
        if commitment is None and self.verify is not None:
            parent = await self._verified(row.to_proto())
            for copy in parent.copies:
                if copy.outcome == "paid" and copy.digest:
                    commitment = await outputs_store.get_commitment(self.store.db, copy.lease_id)
                    if commitment is not None:
                        break
        if commitment is None:
            if not row.spec.outputs:
                why = f"lease {row.lease_id} declares no outputs"
            elif not row.terminal:
                why = f"lease {row.lease_id} is {row.state}; its outputs are packed when it ends"
            else:
                why = f"lease {row.lease_id} ended ({row.state}) without an output commitment"
            await _abort(context, grpc.StatusCode.NOT_FOUND, why)
        assert commitment is not None
        until = commitment.retained_until_unix_nanos
        now_ns = round(self.store.clock() * 1e9)
        if until and until <= now_ns:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"outputs of lease {commitment.lease_id} are gone: the provider kept them "
                f"until {_utc(until)} (output_retention) and has removed them",
            )
        return commitment

    async def OutputTicket(
        self, request: leases_pb2.OutputTicketRequest, context: Context
    ) -> leases_pb2.OutputDownload:
        who = caller()
        row = await self._row(context, request.lease_id, who)
        if row.buyer != who.account:
            # An admin or a provider may see the lease; its results are the buyer's.
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"only the buyer of lease {row.lease_id} may fetch its outputs",
            )
        if self.tickets is None or self.outputs_url is None:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "this scheduler runs no relay (relay.mode: off); outputs travel through it",
            )
        assert self.tickets is not None and self.outputs_url is not None
        commitment = await self._fetchable(context, row)
        public_key = await self._public_key(commitment.node_id)
        ticket, expires_ns = self.tickets.issue(commitment.lease_id)
        return leases_pb2.OutputDownload(
            lease_id=commitment.lease_id,
            url=self.outputs_url(commitment.lease_id),
            ticket=ticket,
            expires_unix_nanos=expires_ns,
            commitment=commitment,
            node_public_key=public_key,
        )

    async def _public_key(self, node_id: str) -> bytes:
        record = self.registry.nodes.get(node_id)
        if record is not None:
            return record.public_key

        def read(conn: Conn) -> bytes:
            found = conn.execute(
                "SELECT public_key FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
            return bytes(found[0]) if found else b""

        return await self.store.db.call(read)

    async def ReportOutputMismatch(
        self, request: leases_pb2.OutputMismatchReport, context: Context
    ) -> leases_pb2.OutputMismatchAck:
        who = caller()
        if len(request.detail) > output_fetch.MAX_DETAIL_CHARS or len(request.fetched_digest) > 32:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"detail: at most {output_fetch.MAX_DETAIL_CHARS} characters; "
                "fetched_digest: at most 32 bytes",
            )
        row = await self._row(context, request.lease_id, who)
        commitment = await outputs_store.get_commitment(self.store.db, row.lease_id)
        parent = row.spec.verify.replicas > 1 if row.spec.HasField("verify") else False
        if row.buyer != who.account or commitment is None or parent:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {row.lease_id}: only its buyer may report on outputs the node "
                "committed to (a redundant run's copy, not its parent)",
            )
        assert commitment is not None
        if (
            bytes(request.fetched_digest) == bytes(commitment.digest)
            and request.fetched_size == commitment.size
        ):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "fetched_digest and fetched_size are the committed ones: nothing differed",
            )
        detail = request.detail or (
            f"fetched {request.fetched_size} bytes with digest "
            f"{bytes(request.fetched_digest).hex()[:64]}"
        )
        now_ns = round(self.store.clock() * 1e9)
        recorded = await self.store.db.call(
            lambda conn: output_fetch.record_mismatch(
                conn,
                lease_id=row.lease_id,
                reporter=who.account,
                node_id=commitment.node_id,
                now_ns=now_ns,
                detail=detail,
            )
        )
        log.warning(
            "buyer reports outputs that do not match the commitment",
            extra={
                "lease_id": row.lease_id,
                "node_id": commitment.node_id,
                "buyer": who.account,
                "detail": detail[:200],
            },
        )
        return leases_pb2.OutputMismatchAck(recorded=recorded)


def _utc(unix_nanos: int) -> str:
    moment = datetime.datetime.fromtimestamp(unix_nanos / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
