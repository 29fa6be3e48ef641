"""The reference scheduler's configuration (same approach as the agent's)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpuagent.configload import load_config
from gpuagent.logsetup import LogFormat, LogLevel
from gpuagent.units import Duration

from .storage import Target, parse_target

DEFAULT_CONFIG_PATH = Path("/etc/gpu-scheduler/config.yaml")

ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "GPU_SCHEDULER_LISTEN": ("server", "listen"),
    "GPU_SCHEDULER_DB": ("database", "path"),
    "GPU_SCHEDULER_DB_URL": ("database", "url"),
    "GPU_SCHEDULER_LOG_LEVEL": ("log", "level"),
}

SECRET_KEYS = frozenset({"key_file", "password", "token"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogConfig(Strict):
    level: LogLevel = "info"
    format: LogFormat = "auto"


class ServerConfig(Strict):
    listen: str = Field(default="127.0.0.1:7443", description="host:port for gRPC")
    insecure: bool = Field(default=False, description="plaintext gRPC; only for loopback demos")
    cert_file: Path | None = Field(
        default=None,
        description="server certificate; unset = a self-signed CA and certificate are "
        "generated under the database's directory on first start",
    )
    key_file: Path | None = None
    client_ca_file: Path | None = Field(
        default=None, description="require client certificates signed by this CA (mTLS)"
    )
    keepalive_time: Duration = 20.0
    keepalive_timeout: Duration = 10.0
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        return self


class DatabaseConfig(Strict):
    path: Path = Field(
        default=Path("/var/lib/gpu-scheduler/scheduler.db"),
        description="the SQLite file when no url is set; its directory holds the TLS files "
        "and secrets.key either way",
    )
    url: str | None = Field(
        default=None,
        description="sqlite:///path (= path) or postgresql://user@host:5432/db "
        "(docs/scaling.md); the password never goes here",
    )
    password_file: Path | None = Field(
        default=None,
        description="first line: the PostgreSQL password (else $GPU_SCHEDULER_DB_PASSWORD)",
    )
    pool_size: int = Field(
        default=4, ge=1, le=64, description="PostgreSQL connections (and threads) per replica"
    )

    @model_validator(mode="after")
    def _url(self) -> DatabaseConfig:
        if self.url is not None:
            parse_target(self.url, environ={})  # shape only; the password is read at open
        return self

    def target(self) -> Target:
        """Where the database is, the password read (never log ``conninfo``)."""
        if self.url is None:
            return parse_target(self.path)
        return parse_target(self.url, password_file=self.password_file)

    @property
    def is_postgres(self) -> bool:
        return self.url is not None and parse_target(self.url, environ={}).dialect == "postgresql"


class ReplicaConfig(Strict):
    """One of several `gpu-scheduler serve` on one PostgreSQL (docs/scaling.md)."""

    id: str = Field(
        default="", max_length=128, description="this replica's name; '' = hostname-pid"
    )
    advertise: str = Field(
        default="", max_length=256, description="host:port agents reach this replica at"
    )
    relay_url: str = Field(
        default="",
        max_length=256,
        pattern=r"^(https?://[^\s/?#]+)?$",
        description="scheme://host[:port] buyers reach this replica's embedded relay at; "
        "another replica's relay redirects a lease whose node this replica holds here",
    )
    heartbeat_interval: Duration = Field(
        default=1.0, gt=0, description="replica row heartbeat; leadership moves within it"
    )
    dead_after: Duration = Field(
        default=5.0, gt=0, description="a replica (or this one's database) silent this long"
    )
    home_first: Duration = Field(
        default=1.0,
        ge=0,
        le=60,
        description="a lease submitted on another replica is left to it this long to offer "
        "to the nodes it holds (it says sooner when none fits); 0 = every replica at once",
    )


class LivenessConfig(Strict):
    # The range every agent clamps a coordinator's interval to (agent/link/session.py,
    # PROTOCOL.md): outside it, agents would beat at another pace than liveness assumes.
    heartbeat_interval: Duration = Field(default=10.0, ge=0.1, le=300.0)
    suspect_after_missed: int = Field(default=3, ge=1)
    offline_grace: Duration = Field(
        default=45.0, description="no heartbeat for this long -> offline (must exceed keepalive)"
    )
    restart_grace: Duration = Field(
        default=120.0, description="after a scheduler restart, no node goes offline before this"
    )


class PlacementConfig(Strict):
    assign_timeout: Duration = Field(
        default=30.0, description="a node must answer a LeaseAssign within this, else the next"
    )
    max_attempts: int = Field(
        default=5, ge=1, description="failed offers (rejected/timeout) before a lease ends"
    )
    retry_interval: Duration = Field(
        default=5.0, gt=0, description="placement pass for pending leases at least this often"
    )
    default_price_micros_per_gpu_hour: int = Field(
        default=0,
        ge=0,
        description="a node's ask for a GPU model it does not price (no offer price, no label)",
    )
    price_label: str = Field(
        default="price_micros_per_gpu_hour",
        min_length=1,
        description="Hello label holding an older agent's one ask (micro-units per GPU-hour); "
        "read only from agents whose Hello has no offer prices (docs/market.md)",
    )
    require_isolation: bool | None = Field(
        default=None,
        description="place only on nodes whose isolation self-test verified; null = "
        "required from nodes with the egress policy on and real GPUs",
    )


class MetricsConfig(Strict):
    listen: str | None = Field(
        default="127.0.0.1:9471",
        description="host:port for /metrics; loopback by default, null = off",
    )
    cert_file: Path | None = Field(default=None, description="serve /metrics over TLS")
    key_file: Path | None = None
    basic_auth_user: str | None = Field(
        default=None, description="require HTTP basic auth with this user name"
    )
    basic_auth_password_file: Path | None = Field(
        default=None, description="file holding the basic-auth password (one line)"
    )

    @model_validator(mode="after")
    def _pairs(self) -> MetricsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if (self.basic_auth_user is None) != (self.basic_auth_password_file is None):
            raise ValueError("basic_auth_user and basic_auth_password_file must be set together")
        return self


class AuthConfig(Strict):
    """Who may do what (docs/security.md)."""

    registration: Literal["token", "open"] = Field(
        default="token",
        description="token: a node joins only with an enrolment token of a provider account; "
        "open: any node key joins (permissionless networks where stake is the gate)",
    )
    client_cert_accounts: dict[str, str] = Field(
        default_factory=dict,
        description="mTLS: a verified client certificate's subject CN or SAN -> account name "
        "(needs server.client_ca_file)",
    )


class ChallengeSize(Strict):
    """A fixed challenge size: C is n x n, the inner dimension is ``inner``."""

    n: int = Field(ge=1, le=65536)
    inner: int = Field(ge=4, le=2**22, multiple_of=4)


class AttestationConfig(Strict):
    enabled: bool = Field(default=True, description="challenge nodes at all")
    required: bool = Field(
        default=True, description="place leases only on GPUs with a passed, unexpired attestation"
    )
    interval: Duration = Field(default=86400.0, gt=0, description="re-attest each node this often")
    jitter: Duration = Field(
        default=7200.0, ge=0, description="up to this much earlier, so nodes do not align"
    )
    random_mean: Duration = Field(
        default=86400.0,
        ge=0,
        description="also attest at unannounced random times, on average this far apart; 0 = off",
    )
    validity: Duration = Field(
        default=93600.0, gt=0, description="a passed attestation counts this long (> interval)"
    )
    retry_after: Duration = Field(
        default=600.0, gt=0, description="re-attest this soon after a failure"
    )
    target_seconds: float = Field(
        default=2.0, gt=0, description="challenge sized to take this long at the SKU's peak"
    )
    size: ChallengeSize | None = Field(
        default=None, description="fixed challenge size instead of per-SKU sizing (tests)"
    )
    dtype: Literal["fp16", "bf16"] = "fp16"
    open_rows: int = Field(default=8, ge=1, le=256, description="rows revealed per GPU")
    sample_columns: int = Field(
        default=32, ge=1, le=4096, description="secret columns checked per row"
    )
    network_allowance: Duration = Field(
        default=0.05, ge=0, description="round trip allowed before one is measured"
    )
    max_network_allowance: Duration = Field(
        default=1.0, ge=0, description="cap on the measured round trip a node is allowed"
    )
    open_timeout: Duration = Field(default=30.0, gt=0, description="reveal -> openings deadline")
    accept_simulated: bool = Field(
        default=False,
        description="DEMO ONLY: judge GPUs the agent marks simulated against a lenient band",
    )
    simulated_size: ChallengeSize = Field(
        default_factory=lambda: ChallengeSize(n=512, inner=4096),
        description="challenge size for simulated GPUs (the CPU computes it)",
    )
    simulated_time_limit: Duration = Field(
        default=120.0, gt=0, description="simulated band: challenge -> commit at most this long"
    )

    @model_validator(mode="after")
    def _validity(self) -> AttestationConfig:
        if self.required and not self.enabled:
            raise ValueError(
                "required: true with enabled: false would give no GPU a lease; "
                "set required: false to run without attestation"
            )
        if self.enabled and self.validity <= self.interval:
            raise ValueError(
                f"validity ({self.validity:g}s) must exceed interval ({self.interval:g}s), "
                "or every node would go unattested before its next attestation"
            )
        return self


class LedgerConfig(Strict):
    """Amounts are integer micro-units (1 unit = 1_000_000); see docs/ledger.md."""

    escrow: bool = Field(
        default=True,
        description="submit reserves price x GPUs x max duration from the buyer's balance; "
        "false = leases need no funds (usage is still stored and costed)",
    )
    min_collateral_micros: int = Field(
        default=0,
        ge=0,
        description="unslashed stake a node needs before leases go to it; 0 = none",
    )
    slash_attestation_micros: int = Field(
        default=10_000_000, ge=0, description="slashed from a node's stake per failed attestation"
    )
    slash_verify_micros: int = Field(
        default=10_000_000,
        ge=0,
        description="slashed from a node's stake per redundant-run copy outvoted by its majority",
    )
    slash_uptime_micros: int = Field(
        default=10_000_000,
        ge=0,
        description="slashed once per uptime_window while measured uptime < the commitment",
    )
    uptime_window: Duration = Field(
        default=86400.0, gt=0, description="uptime is measured over this window"
    )
    uptime_check_interval: Duration = Field(
        default=3600.0, gt=0, description="compare uptime with commitments this often"
    )
    default_credit_micros: int = Field(
        default=0, ge=0, description="DEMO: balance a new buyer account starts with"
    )
    final_record_grace: Duration = Field(
        default=600.0,
        gt=0,
        description="escrow waits this long after a lease ends for its final record",
    )
    clock_skew_allowance: Duration = Field(
        default=60.0, ge=0, description="records may start this long after the lease ended"
    )


class RelayCoordinatorConfig(Strict):
    """Where a standalone relay (``gpu-scheduler relay``) asks for routes."""

    address: str = Field(default="127.0.0.1:7443", description="the coordinator's gRPC address")
    ca_file: Path | None = Field(default=None, description="CA of its certificate")
    token_file: Path | None = Field(default=None, description="an admin API token, one line")
    insecure: bool = Field(default=False, description="plaintext gRPC; loopback tests only")


class RelayConfig(Strict):
    """The relay for service leases (docs/services.md)."""

    mode: Literal["embedded", "external", "off"] = Field(
        default="embedded",
        description="embedded: inside `serve`; external: agents are sent to tunnel_address, "
        "where `gpu-scheduler relay` runs; off: no service endpoints",
    )
    listen: str = Field(default="127.0.0.1:8443", description="host:port buyers connect to")
    domain: str = Field(
        default="relay.localhost",
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$",
        max_length=200,
        description="buyer URLs are <lease>-<port>.<domain>; at least two labels, since TLS "
        "clients accept no wildcard right under a top-level name (*.localhost); "
        "*.relay.localhost is loopback on one machine",
    )
    public_port: int | None = Field(
        default=None, ge=1, le=65535, description="port in buyer URLs; default: listen's"
    )
    insecure_http: bool = Field(
        default=False, description="plain HTTP instead of TLS; refused unless listen is loopback"
    )
    cert_file: Path | None = Field(default=None, description="wildcard certificate for *.domain")
    key_file: Path | None = None
    idle_timeout: Duration = Field(
        default=600.0,
        gt=0,
        description="close a buyer connection (HTTP or a tcp stream) idle both ways this long",
    )
    route_ttl: Duration = Field(
        default=5.0, gt=0, description="cache a lease's route (and token hash) this long"
    )
    open_timeout: Duration = Field(
        default=10.0, gt=0, description="wait this long for an agent to take a connection"
    )
    ping_interval: Duration = Field(default=20.0, gt=0, description="tunnel keepalive")
    tcp_listen: str | None = Field(
        default=None, description="host:port of the TCP relay (token handshake); None = off"
    )
    tunnel_address: str = Field(
        default="",
        description="what agents dial for the tunnel; empty = the coordinator's own address",
    )
    tunnel_server_name: str = Field(default="", description="TLS name agents verify")
    tunnel_listen: str = Field(
        default="127.0.0.1:7444", description="standalone relay: its Tunnel gRPC listener"
    )
    coordinator: RelayCoordinatorConfig = Field(default_factory=RelayCoordinatorConfig)

    @model_validator(mode="after")
    def _plain_http_on_loopback_only(self) -> RelayConfig:
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        if self.insecure_http and host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(
                f"relay.insecure_http: plain HTTP is allowed on a loopback listen address only "
                f"(got {self.listen}); buyers' tokens would cross the network in clear"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("relay.cert_file and relay.key_file go together")
        if self.mode == "external" and not self.tunnel_address:
            raise ValueError(
                "relay.mode external needs relay.tunnel_address: where agents reach the relay"
            )
        return self


class SchedulerConfig(Strict):
    log: LogConfig = Field(default_factory=LogConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)

    @model_validator(mode="after")
    def _cert_accounts(self) -> SchedulerConfig:
        if self.auth.client_cert_accounts and self.server.client_ca_file is None:
            raise ValueError(
                "auth.client_cert_accounts needs server.client_ca_file: without it client "
                "certificates are not verified"
            )
        return self


def load_scheduler_config(path: Path | None) -> SchedulerConfig:
    return load_config(SchedulerConfig, path, ENV_OVERRIDES)
