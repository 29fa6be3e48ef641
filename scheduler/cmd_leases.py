# ruff: noqa: T201 - a CLI module: printing is its output
"""``gpu-scheduler submit|leases|lease show|cancel|logs``: the buyer's commands.

Same connection options and defaults as ``gpu-scheduler nodes``. A lease is
described by a YAML file (format in docs/leases-buyer.md), by flags, or both
(flags win).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuagent import leaserules, market
from gpuagent.configload import ConfigError, format_validation_error, read_yaml
from gpuagent.units import ByteSize, Duration, format_duration, parse_duration
from gpuagent.v1 import leases_pb2, leases_pb2_grpc

from .cli import UsageError
from .client import RpcFailed, connection_parent, invoke
from .cmd_nodes import format_size
from .leases_store import TERMINAL, state_name, state_value
from .ledger import format_micros

_T = TypeVar("_T")
_R = TypeVar("_R")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortFile(_Strict):
    container_port: int = Field(ge=1, le=65535)
    protocol: str = Field(default="tcp", pattern="^(http|tcp|udp)$")
    name: str = Field(default="", max_length=leaserules.MAX_PORT_NAME)


class HealthFile(_Strict):
    """``health:`` (docs/leases-buyer.md); the scheduler checks the values at submit."""

    path: str = Field(default="/", max_length=leaserules.MAX_HEALTH_PATH)
    port: str | int = ""
    initial_delay: Duration = Field(default=0.0, ge=0)
    period: Duration = Field(default=0.0, ge=0)
    timeout: Duration = Field(default=0.0, ge=0)
    failure_threshold: int = Field(default=0, ge=0, le=leaserules.MAX_RESTARTS)
    startup_grace: Duration = Field(default=0.0, ge=0)

    def to_proto(self) -> leases_pb2.HealthCheck:
        return leases_pb2.HealthCheck(
            path=self.path,
            port=str(self.port),
            initial_delay=self.initial_delay,
            period=self.period,
            timeout=self.timeout,
            failure_threshold=self.failure_threshold,
            startup_grace=self.startup_grace,
        )


class RegistryAuthFile(_Strict):
    username: str = ""
    password: str = ""
    server: str = ""


class ConstraintsFile(_Strict):
    """Where the lease may go (docs/leases-buyer.md "Constraints")."""

    region: str = ""
    countries: list[str] = Field(default_factory=list, max_length=market.MAX_COUNTRIES)
    min_uptime: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    node_selector: dict[str, str] = Field(default_factory=dict)
    min_bandwidth: int = Field(default=0, ge=0, le=market.MAX_BANDWIDTH_BPS)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _market_check(market.check_name, value)

    @field_validator("countries", mode="before")
    @classmethod
    def _countries(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [c for c in value.split(",") if c]
        if isinstance(value, list):
            out = []
            for index, code in enumerate(value):
                try:
                    out.append(market.check_country(str(code), f"[{index}]"))
                except market.MarketError as exc:
                    raise ValueError(str(exc)) from None
            return out
        return value

    @field_validator("min_uptime", mode="before")
    @classmethod
    def _uptime(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                return float(value.strip()[:-1]) / 100
            except ValueError:
                raise ValueError(f"{value!r} is not a ratio (0.99 or 99%)") from None
        return value

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return _market_check(market.check_selector, value)

    @field_validator("min_bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, value: Any) -> Any:
        return _market_check(market.parse_bandwidth, value)

    def to_proto(self) -> leases_pb2.Constraints:
        return leases_pb2.Constraints(
            region=self.region,
            countries=self.countries,
            min_uptime_ratio=self.min_uptime,
            node_selector=self.node_selector,
            min_bandwidth_bits_per_second=self.min_bandwidth,
        )


def _market_check(check: Callable[[_T, str], _R], value: _T) -> _R:
    """Run a gpuagent.market check inside a validator: pydantic adds the key path."""
    try:
        return check(value, "value")
    except market.MarketError as exc:
        raise ValueError(str(exc).removeprefix("value")) from None


class VerifyFile(_Strict):
    """``verify: {replicas: 2|3}``: redundant copies on distinct providers (verification.md)."""

    replicas: int = Field(default=0, ge=0, le=leaserules.MAX_VERIFY_REPLICAS)


class LeaseFile(_Strict):
    """The YAML lease file (docs/leases-buyer.md)."""

    image: str = Field(min_length=1)
    command: list[str] | str = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(default=1, ge=1, le=64)
    gpu_model: str = ""
    # Bounds from gpuagent.leaserules: the scheduler refuses more, so say so here, in
    # one line naming the key, rather than fail inside protobuf with a traceback.
    gpu_memory: ByteSize = Field(default=0, le=leaserules.MAX_SIZE_BYTES)
    cpus: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    memory: ByteSize = Field(default=0, le=leaserules.MAX_SIZE_BYTES)
    shm: ByteSize = Field(default=0, le=leaserules.MAX_SIZE_BYTES)
    scratch: ByteSize = Field(default=0, le=leaserules.MAX_SIZE_BYTES)
    ports: list[PortFile] = Field(default_factory=list, max_length=leaserules.MAX_PORTS)
    # "" (unset) rather than "never" by default: a batch lease's spec stays as it was.
    restart: str = Field(default="", pattern="^(|never|on-failure|always)$")
    max_restarts: int = Field(default=0, ge=0, le=leaserules.MAX_RESTARTS)
    health: HealthFile | None = None
    # "lease": the lease's own network (internet yes, LAN/host no); "none": loopback only.
    network: Literal["lease", "none"] = "lease"
    max_duration: Duration = Field(default=0.0, le=leaserules.MAX_DURATION_S)
    price_max: int = Field(
        default=0, ge=0, le=leaserules.MAX_PRICE_MICROS, description="micro-units per GPU-hour"
    )
    buyer: str = ""
    node: str = ""
    replace_on_lost: bool = False
    idempotency_key: str = ""
    registry_auth: RegistryAuthFile | None = None
    constraints: ConstraintsFile = Field(default_factory=ConstraintsFile)
    # Services: no endpoint token asked at the relay (docs/services.md).
    public: bool = False
    verify: VerifyFile = Field(default_factory=VerifyFile)
    # Batch results (docs/leases-buyer.md "Outputs"): paths or globs under /scratch.
    outputs: list[str] = Field(default_factory=list)
    output_max: ByteSize = Field(default=0, le=leaserules.MAX_SIZE_BYTES)
    output_retention: Duration = Field(default=0.0, ge=0, le=leaserules.MAX_OUTPUT_RETENTION_S)
    outputs_required: bool = False

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: Any) -> Any:
        # The shared rules, here too, so the buyer hears of a bad path before submitting.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            try:
                leaserules.check_outputs(value)
            except leaserules.RuleError as exc:
                raise ValueError(str(exc).removeprefix("outputs").removeprefix(": ")) from None
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, value: Any) -> Any:
        # YAML turns `DEBUG: 1` into an int; an environment value is always text.
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value

    def command_list(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else self.command

    def to_request(self) -> leases_pb2.SubmitLeaseRequest:
        spec = leases_pb2.LeaseSpec(
            image=self.image,
            command=self.command_list(),
            args=self.args,
            env=self.env,
            gpu_count=self.gpus,
            gpu_model=self.gpu_model,
            gpu_min_memory_bytes=self.gpu_memory,
            cpus=self.cpus,
            memory_bytes=self.memory,
            shm_bytes=self.shm,
            scratch_bytes=self.scratch,
            ports=[
                leases_pb2.PortSpec(
                    container_port=p.container_port, protocol=p.protocol, name=p.name
                )
                for p in self.ports
            ],
            max_duration_seconds=round(self.max_duration),
            network_mode="none" if self.network == "none" else "",
            price_micro_per_gpu_hour=self.price_max,
            restart=self.restart,
            max_restarts=self.max_restarts,
            constraints=self.constraints.to_proto(),
            public=self.public,
            outputs=self.outputs,
            output_max_bytes=self.output_max,
            output_retention_seconds=round(self.output_retention),
            outputs_required=self.outputs_required,
        )
        if self.verify.replicas:
            spec.verify.replicas = self.verify.replicas
        if self.health is not None:
            spec.health.CopyFrom(self.health.to_proto())
        if self.registry_auth is not None:
            spec.registry_auth.CopyFrom(leases_pb2.RegistryAuth(**self.registry_auth.model_dump()))
        return leases_pb2.SubmitLeaseRequest(
            spec=spec,
            idempotency_key=self.idempotency_key,
            node_id=self.node,
            buyer=self.buyer,
            replace_on_lost=self.replace_on_lost,
        )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = connection_parent()
    submit = sub.add_parser(
        "submit", parents=[conn], help="submit a lease from a YAML file and/or flags"
    )
    submit.add_argument("file", type=Path, nargs="?", help="lease YAML (docs/leases-buyer.md)")
    submit.add_argument("--image", help="container image")
    submit.add_argument("--gpus", type=int, help="GPU count (default 1)")
    submit.add_argument("--gpu-model", help="substring of the GPU name, e.g. 4090")
    submit.add_argument("--gpu-memory", help="minimum memory per GPU, e.g. 24GiB")
    submit.add_argument("--cmd", help="command, shell-quoted: --cmd \"sh -c 'echo hi'\"")
    submit.add_argument("--env", action="append", metavar="K=V", help="environment (repeatable)")
    submit.add_argument("--price-max", type=int, help="ceiling, micro-units per GPU-hour")
    submit.add_argument("--max-duration", help="hard stop after this long, e.g. 10m")
    submit.add_argument(
        "--network",
        choices=("lease", "none"),
        help="lease: its own network (default); none: no network at all, only loopback",
    )
    submit.add_argument("--buyer", help="account billed")
    submit.add_argument("--node", help="pin to this node (id or unique prefix)")
    submit.add_argument(
        "--replace-on-lost", action="store_true", default=None, help="re-place if the node dies"
    )
    submit.add_argument("--idempotency-key", help="retry-safe key; becomes the lease id")
    submit.add_argument(
        "--verify-replicas",
        type=int,
        metavar="N",
        help="run N (2 or 3) copies on distinct providers and compare their outputs",
    )
    submit.add_argument("--region", help="constraint: only nodes in this region")
    submit.add_argument(
        "--country",
        action="append",
        metavar="CC",
        help="constraint: only nodes in these countries (ISO 3166-1 alpha-2; repeatable)",
    )
    submit.add_argument("--min-uptime", help="constraint: uptime over 30 days, 0.99 or 99%%")
    submit.add_argument(
        "--selector", action="append", metavar="K=V", help="constraint: node label (repeatable)"
    )
    submit.add_argument("--min-bandwidth", help="constraint: measured bandwidth, e.g. 1Gbit/s")
    submit.add_argument(
        "--dry-run",
        action="store_true",
        help="quote only: the node, price and escrow, reserving nothing "
        "(exit 0: placeable now, 3: it would wait)",
    )
    submit.add_argument("--wait", action="store_true", help="follow state changes until it ends")
    submit.add_argument(
        "--wait-timeout", type=parse_duration, help="with --wait: give up after this long"
    )
    submit.set_defaults(handler=_submit)

    leases = sub.add_parser("leases", parents=[conn], help="list leases")
    leases.add_argument(
        "--state", action="append", help="filter by state (repeatable): pending, running..."
    )
    leases.add_argument("--node", default="", help="filter by node id")
    leases.add_argument("--buyer", default="", help="filter by buyer")
    leases.set_defaults(handler=_list)

    lease = sub.add_parser("lease", parents=[conn], help="one lease in detail")
    lease_sub = lease.add_subparsers(dest="lease_command", metavar="ACTION", required=True)
    show = lease_sub.add_parser("show", parents=[conn], help="state, placement and history")
    show.add_argument("lease_id", metavar="ID")
    show.set_defaults(handler=_show)
    url = lease_sub.add_parser(
        "url", parents=[conn], help="the relay URL of a service port (one line, for scripts)"
    )
    url.add_argument("lease_id", metavar="ID")
    url.add_argument("port", metavar="PORT", nargs="?", help="declared name or number")
    url.set_defaults(handler=_url)
    rotate = lease_sub.add_parser(
        "rotate-token", parents=[conn], help="replace the lease's endpoint token"
    )
    rotate.add_argument("lease_id", metavar="ID")
    rotate.set_defaults(handler=_rotate)

    cancel = sub.add_parser("cancel", parents=[conn], help="cancel a lease")
    cancel.add_argument("lease_id", metavar="ID")
    cancel.add_argument("--reason", default="", help="shown in the lease's history")
    cancel.set_defaults(handler=_cancel)

    logs = sub.add_parser("logs", parents=[conn], help="last output the node reported")
    logs.add_argument("lease_id", metavar="ID")
    logs.add_argument("--tail", type=int, default=0, help="last N lines only")
    logs.set_defaults(handler=_logs)


class _Failed(Exception):
    """An RPC failed; already reported on stderr."""


def _call(args: argparse.Namespace, fn: str, request: Any) -> Any:
    try:
        return invoke(args, leases_pb2_grpc.LeasesStub, fn, request)
    except RpcFailed:
        raise _Failed from None


def _state(state: int) -> str:
    return state_name(state)


def _when(unix_nanos: int) -> str:
    if not unix_nanos:
        return "-"
    return datetime.fromtimestamp(unix_nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def endpoint_lines(endpoints: Any) -> list[str]:
    """One line per endpoint: name, protocol and port, url, readiness, last check, restarts."""
    lines = []
    for e in endpoints:
        state = "ready" if e.ready else "not ready"
        check = f"last check {_when(e.last_check_unix_nanos)}"
        if e.last_result:
            check += f" ({leaserules.clip(e.last_result, 120)})"
        lines.append(
            f"{e.name:<15} {e.protocol}/{e.container_port}  {e.url or '-'}  {state}  "
            f"{check}  restarts {e.restarts}"
        )
    return lines


def output_lines(lease: leases_pb2.Lease) -> list[str]:
    """The node's signed commitment to the lease's outputs (PROTOCOL.md "Lease outputs")."""
    if not lease.HasField("outputs"):
        if not lease.spec.outputs:
            return []
        pending = "none yet (reported when the lease ends)"
        return [f"outputs:     {pending if _state(lease.state) not in TERMINAL else 'none kept'}"]
    o = lease.outputs
    lines = [
        "outputs:",
        f"  digest:    {o.digest.hex()}  (Merkle root, {format_size(o.chunk_bytes)} chunks)",
        f"  size:      {format_size(o.size)} ({o.size} bytes), {o.file_count} file(s)",
        f"  missing:   {', '.join(o.missing) or 'none'}",
        f"  retained until: {_when(o.retained_until_unix_nanos)} UTC on {o.node_id}",
    ]
    seconds = retention_seconds(lease)
    if seconds is not None:
        lines.append(
            f"  retention: {format_duration(round(seconds))} after the end, "
            f"{o.size * seconds / 3600 / 1024**3:.3g} GiB-hours"
        )
    return lines


def retention_seconds(lease: leases_pb2.Lease) -> float | None:
    """How long the node keeps the outputs after the lease's end (the metered figure,
    with OutputCommitment.size: PROTOCOL.md "Usage"); None before the end is known."""
    if not lease.HasField("outputs") or not lease.ended_at_unix_nanos:
        return None
    return max(0, lease.outputs.retained_until_unix_nanos - lease.ended_at_unix_nanos) / 1e9


def build_request(args: argparse.Namespace) -> leases_pb2.SubmitLeaseRequest:
    """The SubmitLeaseRequest from the file (if any) with flags on top."""
    source = str(args.file) if args.file is not None else "command line"
    data: dict[str, Any] = read_yaml(args.file) if args.file is not None else {}
    flags = {
        "image": args.image,
        "gpus": args.gpus,
        "gpu_model": args.gpu_model,
        "gpu_memory": args.gpu_memory,
        "command": args.cmd,
        "price_max": args.price_max,
        "max_duration": args.max_duration,
        "network": args.network,
        "buyer": args.buyer,
        "node": args.node,
        "replace_on_lost": args.replace_on_lost,
        "idempotency_key": args.idempotency_key,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.env:
        env = dict(data.get("env") or {})
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        data["env"] = env
    constraints = dict(data.get("constraints") or {})
    for key, value in (
        ("region", args.region),
        (
            "countries",
            [c for item in args.country for c in item.split(",")] if args.country else None,
        ),
        ("min_uptime", args.min_uptime),
        ("min_bandwidth", args.min_bandwidth),
    ):
        if value is not None:
            constraints[key] = value
    if args.selector:
        selector = dict(constraints.get("node_selector") or {})
        for item in args.selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--selector {item!r}: expected KEY=VALUE")
            selector[key] = value
        constraints["node_selector"] = selector
    if constraints:
        data["constraints"] = constraints
    if args.verify_replicas is not None:
        data["verify"] = {**(data.get("verify") or {}), "replicas": args.verify_replicas}
    if "image" not in data:
        raise UsageError("no image: give a lease file or --image")
    try:
        return LeaseFile.model_validate(data).to_request()
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(LeaseFile, exc)) from None


QUOTE_WOULD_WAIT = 3  # submit --dry-run: the lease would wait (0: placeable now)


def _submit(args: argparse.Namespace) -> int:
    request = build_request(args)
    if args.dry_run:
        return _quote(args, request)
    try:
        lease = _call(args, "Submit", request)
    except _Failed:
        return 1
    if getattr(args, "json", False) and not args.wait:
        print(json.dumps(MessageToDict(lease), indent=2))
        return 0
    print(f"{lease.lease_id}  {_state(lease.state)}")
    if lease.endpoint_token:
        print(f"endpoint token: {lease.endpoint_token}  (send as Authorization: Bearer)")
    if not args.wait:
        return 0
    return _follow(args, lease.lease_id, args.wait_timeout)


def quote_lines(quote: leases_pb2.LeaseQuote) -> list[str]:
    if quote.placeable:
        lines = [
            f"would place on {quote.node_id}: {len(quote.gpu_uuids)} x {quote.gpu_model or 'GPU'}"
            f" at {format_micros(quote.ask_micros_per_gpu_hour)}/GPU-hour",
        ]
    else:
        lines = ["would wait: no node takes it now"]
    lines.append(f"escrow:  submit reserves {format_micros(quote.escrow_micros)}")
    lines.append(f"why:     {quote.reason}")
    if quote.excluded:
        lines.append(
            "excluded: " + "; ".join(f"{n} {kind}" for kind, n in sorted(quote.excluded.items()))
        )
    lines.append(f"candidates: {quote.candidates}")
    return lines


def _quote(args: argparse.Namespace, request: leases_pb2.SubmitLeaseRequest) -> int:
    try:
        quote = _call(args, "Quote", request)
    except _Failed:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(quote, always_print_fields_with_no_presence=True), indent=2))
    else:
        print("\n".join(quote_lines(quote)))
    return 0 if quote.placeable else QUOTE_WOULD_WAIT


def _follow(args: argparse.Namespace, lease_id: str, limit: float | None) -> int:
    """Print each new history event until the lease ends; exit 0 only if it succeeded."""
    # No streaming RPC yet: poll Get, which returns the full history.
    deadline = time.monotonic() + limit if limit else None
    seen = 0
    while True:
        try:
            lease = _call(args, "Get", leases_pb2.GetLeaseRequest(lease_id=lease_id))
        except _Failed:
            return 1
        for event in lease.events[seen:]:
            where = f" on {event.node_id}" if event.node_id else ""
            reason = f": {event.reason}" if event.reason else ""
            print(f"{_when(event.at_unix_nanos)}  {_state(event.state)}{where}{reason}")
        seen = len(lease.events)
        state = _state(lease.state)
        if state in TERMINAL:
            if lease.HasField("exit_code"):
                print(f"exit code {lease.exit_code}")
            return 0 if state == "succeeded" else 1
        if deadline is not None and time.monotonic() > deadline:
            print(f"still {state} after {format_duration(limit or 0)}; not waiting longer")
            return 1
        time.sleep(0.5)


def _list(args: argparse.Namespace) -> int:
    states = []
    for name in args.state or []:
        try:
            states.append(state_value(name))
        except ValueError:
            raise UsageError(f"--state {name!r}: not a lease state") from None
    leases: list[leases_pb2.Lease] = []
    token = ""
    while True:
        request = leases_pb2.ListLeasesRequest(
            states=states, node_id=args.node, buyer=args.buyer, page_token=token
        )
        try:
            response = _call(args, "List", request)
        except _Failed:
            return 1
        leases.extend(response.leases)
        token = response.next_page_token
        if not token:
            break
    if getattr(args, "json", False):
        print(json.dumps([MessageToDict(x) for x in leases], indent=2))
        return 0
    rows = [("LEASE", "STATE", "GPUS", "IMAGE", "NODE", "BUYER", "CREATED", "REASON")]
    for x in leases:
        rows.append(
            (
                x.lease_id,
                _state(x.state),
                str(x.spec.gpu_count),
                x.spec.image,
                x.node_id or "-",
                x.buyer or "-",
                _when(x.created_at_unix_nanos),
                x.reason[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not leases:
        print("(no leases)")
    return 0


def copy_lines(copies: Any) -> list[str]:
    """One line per copy of a verified lease: id, role, node, provider, state, digest."""
    return [
        f"{c.lease_id}  {c.role:<8}  node {c.node_id or '-'}  provider {c.provider or '-'}  "
        f"{_state(c.state)}  digest {c.digest.hex()[:16] or '-'}  {c.outcome}"
        for c in copies
    ]


def _show(args: argparse.Namespace) -> int:
    try:
        lease = _call(args, "Get", leases_pb2.GetLeaseRequest(lease_id=args.lease_id))
    except _Failed:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(lease), indent=2))
        return 0
    spec = lease.spec
    command = shlex.join([*spec.command, *spec.args]) or "(image default)"
    gpus = f"{spec.gpu_count}"
    if spec.gpu_model:
        gpus += f" x {spec.gpu_model}"
    if spec.gpu_min_memory_bytes:
        gpus += f" (>= {format_size(spec.gpu_min_memory_bytes)} each)"
    lines = [
        f"lease:       {lease.lease_id}",
        f"state:       {_state(lease.state)}" + (f" ({lease.reason})" if lease.reason else ""),
        f"buyer:       {lease.buyer or '-'}",
        f"image:       {spec.image}",
        f"command:     {command}",
        f"gpus:        {gpus}",
        "network:     "
        + ("none (loopback only)" if spec.network_mode == "none" else "its own (egress policy)"),
        f"price:       ceiling {spec.price_micro_per_gpu_hour}, accepted "
        f"{lease.accepted_price_micro_per_gpu_hour} micro-units per GPU-hour",
        "max runtime: "
        + (format_duration(spec.max_duration_seconds) if spec.max_duration_seconds else "none"),
        (
            f"node:        {lease.node_id or '-'}  gpus {', '.join(lease.gpu_uuids) or '-'}"
            if not lease.copies
            else "node:        - (a verified lease runs as the copies below)"
        ),
        f"attempts:    {lease.attempts}"
        + ("  (re-placed if its node is lost)" if lease.replace_on_lost else ""),
        f"created:     {_when(lease.created_at_unix_nanos)}",
        f"started:     {_when(lease.started_at_unix_nanos)}",
        f"ended:       {_when(lease.ended_at_unix_nanos)}",
    ]
    if lease.HasField("exit_code"):
        lines.append(f"exit code:   {lease.exit_code}")
    if spec.restart and spec.restart != "never":
        lines.append(f"restart:     {spec.restart}, {lease.restarts} restart(s) so far")
    if lease.endpoints:
        lines.append("endpoints:")
        lines.extend(f"  {line}" for line in endpoint_lines(lease.endpoints))
    lines.extend(output_lines(lease))
    if lease.endpoint_token:
        lines.append(f"endpoint token: {lease.endpoint_token}")
    elif spec.public and spec.ports:
        lines.append("endpoint token: none (public)")
    if lease.parent_lease_id:
        lines.append(f"copy of:     {lease.parent_lease_id} (a verified lease)")
    if lease.copies:
        lines.append(f"verify:      {lease.verify_state} ({len(lease.copies)} copies)")
        lines.extend(f"  {line}" for line in copy_lines(lease.copies))
    lines.append("history:")
    for event in lease.events:
        where = f" on {event.node_id}" if event.node_id else ""
        reason = f": {event.reason}" if event.reason else ""
        lines.append(f"  {_when(event.at_unix_nanos)}  {_state(event.state)}{where}{reason}")
    print("\n".join(lines))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    request = leases_pb2.CancelLeaseRequest(lease_id=args.lease_id, reason=args.reason)
    try:
        lease = _call(args, "Cancel", request)
    except _Failed:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(lease), indent=2))
        return 0
    state = _state(lease.state)
    note = "" if state in TERMINAL else " (cancel sent to the node; it stops shortly)"
    print(f"{lease.lease_id}  {state}{note}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    request = leases_pb2.LeaseLogsRequest(lease_id=args.lease_id, tail_lines=max(args.tail, 0))
    try:
        response = _call(args, "Logs", request)
    except _Failed:
        return 1
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(response), indent=2))
        return 0
    sys.stdout.write(response.log_tail)
    if response.log_tail and not response.log_tail.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def _url(args: argparse.Namespace) -> int:
    """One URL on stdout: where the provider serves the port itself (direct mode), else
    the relay's address for it, from the relay settings of the file ``serve`` reads."""
    from .cli import load_config_from_args
    from .relay.directory import declared_ports
    from .relay.server import buyer_url

    try:
        lease = _call(args, "Get", leases_pb2.GetLeaseRequest(lease_id=args.lease_id))
    except _Failed:
        return 1
    ports = declared_ports(lease.spec)
    if not ports:
        print(f"error: lease {lease.lease_id} declares no ports", file=sys.stderr)
        return 1
    if args.port is None:
        port = ports[0]
    else:
        found = [p for p in ports if args.port in (p.name, str(p.container_port))]
        if not found:
            names = ", ".join(p.name for p in ports)
            print(
                f"error: lease {lease.lease_id} declares no port {args.port!r} (it has {names})",
                file=sys.stderr,
            )
            return 1
        port = found[0]
    # A port the provider's agent serves itself (direct mode): the URL the coordinator
    # filled from its report; otherwise the relay's.
    direct = [e.url for e in lease.endpoints if e.name == port.name and e.direct_address]
    if direct and direct[0]:
        print(direct[0])
        return 0
    print(buyer_url(load_config_from_args(args).relay, lease.lease_id, port.name))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    request = leases_pb2.RotateEndpointTokenRequest(lease_id=args.lease_id)
    try:
        answer = _call(args, "RotateEndpointToken", request)
    except _Failed:
        return 1
    if answer.token:
        print(answer.token)
    else:
        print(f"rotated; the buyer of {answer.lease_id} reads the new token with lease show")
    return 0
