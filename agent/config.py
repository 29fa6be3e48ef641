"""The agent's configuration: pydantic models loaded from YAML.

Every model forbids unknown keys so a typo fails at load with its key path.
``config.example.yaml`` documents every option and must load as-is (tested).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpuagent import market
from gpuagent.configload import load_config
from gpuagent.leaserules import MAX_PRICE_MICROS
from gpuagent.logsetup import LogFormat, LogLevel
from gpuagent.units import ByteSize, Duration

DEFAULT_CONFIG_PATH = Path("/etc/gpu-agent/config.yaml")

# Environment variables that override single keys, for what differs per host.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "GPU_AGENT_COORDINATOR_ADDRESS": ("coordinator", "address"),
    "GPU_AGENT_COORDINATOR_INSECURE": ("coordinator", "insecure"),
    "GPU_AGENT_NODE_NAME": ("node", "name"),
    "GPU_AGENT_STATE_DIR": ("node", "state_dir"),
    "GPU_AGENT_GPU_BACKEND": ("gpu", "backend"),
    "GPU_AGENT_LOG_LEVEL": ("log", "level"),
    "GPU_AGENT_STATUS_LISTEN": ("status", "listen"),
}

# Keys whose values are masked by ``gpu-agent config show``.
SECRET_KEYS = frozenset({"password", "token", "client_key_file", "auth", "enrollment_token"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocationConfig(Strict):
    """Where the node is (docs/market.md): buyers filter and constrain leases by it."""

    region: str = Field(default="", description="free-form, e.g. eu-west; wins over node.region")
    country: str = Field(default="", description="ISO 3166-1 alpha-2 code, e.g. DE")
    zone: str = Field(default="", description="free-form, e.g. fra-1")

    @field_validator("region", "zone")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return market.check_name(value, "value")
        except market.MarketError as exc:
            raise ValueError(str(exc).removeprefix("value: ")) from None

    @field_validator("country")
    @classmethod
    def _country(cls, value: str) -> str:
        if not value:
            return value
        try:
            return market.check_country(value, "value")
        except market.MarketError as exc:
            raise ValueError(str(exc).removeprefix("value: ")) from None


# An ask per GPU-hour: whole micro-units, never negative (0 = free).
Price = Annotated[int, Field(ge=0, le=MAX_PRICE_MICROS, strict=True)]


class NodeConfig(Strict):
    name: str | None = Field(
        default=None, description="Human name shown by the coordinator; defaults to the hostname"
    )
    state_dir: Path = Field(
        default=Path("/var/lib/gpu-agent"),
        description="Identity key, state DB and usage outbox live here",
    )
    region: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    price_micros_per_gpu_hour: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PRICE_MICROS,
        description="one ask for every GPU (as pricing '*'); None = coordinator default",
    )
    pricing: dict[str, Price] = Field(
        default_factory=dict,
        description="ask per GPU-hour in micro-units, per GPU model: a key is a "
        "case-insensitive substring of the GPU name (longest match wins), '*' = any other",
    )
    location: LocationConfig = Field(default_factory=LocationConfig)

    @field_validator("pricing")
    @classmethod
    def _price_keys(cls, value: dict[str, int]) -> dict[str, int]:
        for key in value:
            if not key.strip() or len(key) > 128:
                raise ValueError(f"key {key[:40]!r}: a GPU model name (1-128 characters) or '*'")
        return value

    def asks(self) -> dict[str, int]:
        """``pricing`` with ``price_micros_per_gpu_hour`` as its '*' when it has none."""
        out = dict(self.pricing)
        if self.price_micros_per_gpu_hour is not None:
            out.setdefault(market.ANY_MODEL, self.price_micros_per_gpu_hour)
        return out

    def where(self) -> LocationConfig:
        """``location``, its region defaulting to the older ``node.region``."""
        if self.location.region or not self.region:
            return self.location
        return self.location.model_copy(update={"region": self.region})


class LogConfig(Strict):
    level: LogLevel = "info"
    format: LogFormat = "auto"


class CoordinatorConfig(Strict):
    address: str | tuple[str, ...] = Field(
        default="localhost:7443",
        description="host:port of the coordinator's gRPC endpoint; for several scheduler "
        "replicas a list of them, or a DNS name with several records (each record tried "
        "in turn on each reconnect; agent/link/targets.py)",
    )

    @field_validator("address", mode="before")
    @classmethod
    def _address_list(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:  # the environment's spelling: a,b
            value = value.split(",")
        if isinstance(value, list | tuple):
            given = tuple(str(a).strip() for a in value)
            if not given or not all(given):
                raise ValueError("a list of host:port, none empty")
            return given[0] if len(given) == 1 else given
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        """The coordinator addresses to try, in order (docs/scaling.md)."""
        return self.address if isinstance(self.address, tuple) else (self.address,)

    insecure: bool = Field(default=False, description="plaintext gRPC; only for loopback demos")
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    server_name: str | None = Field(
        default=None, description="TLS name to verify instead of the host in address"
    )
    keepalive_time: Duration = 20.0
    keepalive_timeout: Duration = 10.0
    call_timeout: Duration = 10.0
    reconnect_initial: Duration = 1.0
    reconnect_max: Duration = 120.0
    stop_leases_after_disconnect: Duration | None = Field(
        default=None,
        description="stop running leases after this long without a coordinator; off by default",
    )
    enrollment_token: str | None = Field(
        default=None,
        description="from 'gpu-scheduler nodes enroll': binds this node to the provider "
        "account on its first connection",
    )
    enrollment_token_file: Path | None = Field(
        default=None, description="a file holding the enrolment token (instead of the value)"
    )
    bandwidth_probe_interval: Duration = Field(
        default=market.PROBE_INTERVAL_SECONDS,
        ge=0,
        description="measure throughput from the coordinator this often (and at every "
        "registration); 0 = never",
    )
    bandwidth_probe_bytes: ByteSize = Field(
        default=market.PROBE_DEFAULT_BYTES,
        ge=64 * 1024,
        le=market.PROBE_MAX_BYTES,
        description="bytes one probe reads (the coordinator caps it too)",
    )

    def enrollment(self) -> str:
        """The enrolment token to present, "" for none; the file is read on each call so a
        token dropped in place after start is used on the next connection."""
        if self.enrollment_token:
            return self.enrollment_token.strip()
        if self.enrollment_token_file is not None:
            try:
                return self.enrollment_token_file.read_text(encoding="utf-8").strip()
            except OSError:
                return ""
        return ""

    @model_validator(mode="after")
    def _mtls_pair(self) -> CoordinatorConfig:
        if self.enrollment_token and self.enrollment_token_file is not None:
            raise ValueError("set enrollment_token or enrollment_token_file, not both")
        if self.enrollment_token is not None and not self.enrollment_token.strip().startswith(
            "gse_"
        ):
            raise ValueError(
                "enrollment_token: not an enrolment token (they start with gse_; "
                "get one with 'gpu-scheduler nodes enroll')"
            )
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be set together")
        if self.keepalive_timeout <= 0 or self.keepalive_time <= 0:
            raise ValueError("keepalive_time and keepalive_timeout must be positive")
        return self


# The keys of agent.gpu.profiles.PROFILES (a test holds the two equal).
SimulatedProfile = Literal[
    "h100-sxm-80gb",
    "h200-sxm-141gb",
    "b200",
    "a100-sxm-80gb",
    "l4",
    "rtx-5090",
    "rtx-4090",
    "rtx-3080",
]


class SimulatedFault(Strict):
    """A fault the simulated backend injects ``after`` seconds from its start."""

    gpu: int = Field(ge=0, description="index of the simulated GPU")
    kind: Literal["xid", "ecc", "thermal", "lost"]
    code: int | None = Field(
        default=None, ge=1, description="Xid code for kind xid (default 79: fallen off the bus)"
    )
    after: Duration = 0.0

    @model_validator(mode="after")
    def _code_only_for_xid(self) -> SimulatedFault:
        if self.code is not None and self.kind != "xid":
            raise ValueError(f"code applies only to kind xid, not {self.kind}")
        return self


class SimulatedGpuConfig(Strict):
    profile: SimulatedProfile = "h100-sxm-80gb"
    count: int = Field(default=8, ge=0, le=64)
    faults: list[SimulatedFault] = Field(
        default_factory=list, description="faults injected on a schedule, for demos and drills"
    )

    @model_validator(mode="after")
    def _faults_name_existing_gpus(self) -> SimulatedGpuConfig:
        for n, fault in enumerate(self.faults):
            if fault.gpu >= self.count:
                raise ValueError(
                    f"faults[{n}].gpu is {fault.gpu} but only {self.count} simulated GPUs exist"
                )
        return self


class GpuConfig(Strict):
    backend: Literal["nvml", "amd", "simulated", "auto"] = Field(
        default="nvml",
        description="amd = AMD Instinct through amdsmi; auto = NVML when the library loads, "
        "else amdsmi when it finds AMD GPUs, else simulated (loudly)",
    )
    health_interval: Duration = 5.0
    simulated: SimulatedGpuConfig = Field(default_factory=SimulatedGpuConfig)


class RuntimeConfig(Strict):
    docker_host: str = Field(
        default="unix:///var/run/docker.sock", description="Docker Engine API endpoint"
    )
    runtime: str | None = Field(default=None, description="OCI runtime, e.g. runsc; None = default")
    allowed_registries: list[str] = Field(
        default_factory=list, description="empty = any registry not denied"
    )
    denied_registries: list[str] = Field(default_factory=list)
    allowed_capabilities: list[str] = Field(
        default_factory=list, description="capabilities a lease may add back after cap_drop=ALL"
    )
    max_gpus_per_lease: int = Field(default=8, ge=1)
    max_memory: ByteSize = 256 * 1024**3
    max_cpus: float = Field(default=64.0, gt=0)
    max_shm: ByteSize = 64 * 1024**3
    max_scratch: ByteSize = 500 * 1024**3
    cpu_reserve: float = Field(
        default=1.0, ge=0, description="CPUs kept for the host and the agent, never leased"
    )
    memory_reserve: ByteSize = 4 * 1024**3
    min_free_state_disk: ByteSize = Field(
        default=256 * 1024**2,
        description="free space under node.state_dir below which new leases are refused "
        "and /readyz fails (the state DB and usage outbox must be writable)",
    )
    pids_limit: int = Field(default=4096, ge=16)
    read_only_rootfs: bool = False
    stop_grace: Duration = 30.0
    pull_timeout: Duration = 1800.0
    pull_policy: Literal["if-not-present", "always", "never"] = Field(
        default="if-not-present", description="when to pull a lease's image"
    )
    default_memory: ByteSize = Field(
        default=1024**3, description="memory limit for leases that do not ask for one"
    )
    default_cpus: float = Field(default=1.0, gt=0, description="CPUs for leases that do not ask")
    scratch_dir: Path | None = Field(
        default=None, description="per-lease scratch dirs; default <state_dir>/scratch"
    )
    scratch_mode: Literal["auto", "loop", "measured"] = Field(
        default="auto",
        description="loop: a nosuid,nodev ext4 image per lease, hard quota (needs root); "
        "measured: a directory, stopped when over quota; auto: loop where it works",
    )
    default_scratch: ByteSize = Field(
        default=10 * 1024**3, description="scratch quota of leases that do not ask for one"
    )
    scratch_check_interval: Duration = Field(
        default=10.0, description="how often scratch use is measured in measured mode"
    )
    writable_layer_size: ByteSize | None = Field(
        default=50 * 1024**3,
        description="bound on a container's writable layer (Docker storage-opt size), "
        "where the storage driver supports it (overlay2 on xfs with pquota); null = none",
    )

    @field_validator("allowed_capabilities")
    @classmethod
    def _caps_upper(cls, caps: list[str]) -> list[str]:
        return [c.upper().removeprefix("CAP_") for c in caps]


class IsolationConfig(Strict):
    """Tenant isolation on the host: one network per lease, egress policy, published ports.

    docs/leases.md ("Isolation") describes the model; the firewall rules live in
    ``agent.isolation.firewall``.
    """

    subnet_pool: ipaddress.IPv4Network = Field(
        default=ipaddress.IPv4Network("10.213.0.0/16"),
        description="lease networks' subnets are carved from this; keep it off the LAN",
    )
    subnet_prefix: int = Field(
        default=28, ge=8, le=29, description="prefix length of each lease's subnet"
    )
    # Linux interface names are at most 15 characters; the rest is a hash of the lease.
    bridge_prefix: str = Field(
        default="gpua-",
        pattern=r"^[a-z][a-z0-9-]{0,6}$",
        description="lease bridges are named <prefix><hash>; the firewall matches <prefix>+",
    )
    spare_networks: int = Field(
        default=2,
        ge=0,
        le=64,
        description="lease networks made ahead so a lease start does not wait for one; 0 = none",
    )
    publish_address: ipaddress.IPv4Address | ipaddress.IPv6Address = Field(
        default=ipaddress.IPv4Address("127.0.0.1"),
        description="host address a lease's ports are published on; never 0.0.0.0 or ::",
    )
    egress_policy: bool = Field(
        default=True,
        description="block lease traffic to private, shared, link-local and multicast "
        "ranges and to the host itself",
    )
    egress_allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list, description="destinations leases may reach despite the policy"
    )
    firewall_chain: str = Field(
        default="GPU-AGENT",
        pattern=r"^[A-Z][A-Z0-9-]{0,19}$",
        description="prefix of the agent's own iptables chains (<name>-FWD, <name>-IN)",
    )
    recheck_interval: Duration = Field(
        default=30.0, description="how often the firewall rules are verified (and restored)"
    )
    self_test: bool = Field(
        default=True, description="probe the isolation with two containers at start"
    )
    self_test_image: str = Field(
        default="busybox:1.36",
        min_length=1,
        description="image of the probe containers (sh, httpd, nc); never pulled by the agent",
    )

    @field_validator("publish_address")
    @classmethod
    def _not_unspecified(
        cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if value.is_unspecified:
            raise ValueError(
                f"{value} would publish lease ports on every address of the host; "
                "name one address (127.0.0.1 when services go through the relay)"
            )
        return value

    @model_validator(mode="after")
    def _pool_fits(self) -> IsolationConfig:
        if self.subnet_prefix < self.subnet_pool.prefixlen:
            raise ValueError(
                f"subnet_prefix /{self.subnet_prefix} is larger than subnet_pool {self.subnet_pool}"
            )
        if self.recheck_interval <= 0:
            raise ValueError("recheck_interval must be positive")
        return self


class ServicesConfig(Strict):
    """How buyers reach service leases (docs/services.md): through the relay (default; the
    agent dials out, no port opens on the host), or ``direct`` on an address of this host
    for a provider with a public address (agent/direct/)."""

    mode: Literal["relay", "direct"] = "relay"
    advertise_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = Field(
        default=None,
        description="direct mode: the address of this host buyers connect to; the only "
        "address direct listeners bind (never 0.0.0.0 or ::)",
    )
    advertise_host: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$",
        description="direct mode: the host name in buyers' URLs (matching cert_file); "
        "default: advertise_address",
    )
    port_range: str = Field(
        default="30000-30999",
        description="direct mode: host ports the agent allocates from, FIRST-LAST",
    )
    cert_file: Path | None = Field(
        default=None, description="direct mode: TLS certificate of the direct listeners"
    )
    key_file: Path | None = None
    idle_timeout: Duration = Field(
        default=600.0, gt=0, description="direct mode: close a connection idle both ways this long"
    )
    insecure_http: bool = Field(
        default=False,
        description="direct mode without TLS; only on a loopback advertise_address (tests), "
        "since buyers' tokens would cross the network in clear",
    )

    @field_validator("advertise_address")
    @classmethod
    def _one_address(
        cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if value is not None and (value.is_unspecified or value.is_multicast):
            raise ValueError(
                f"{value} is no single address of this host; name the one buyers reach"
            )
        return value

    @field_validator("port_range")
    @classmethod
    def _range(cls, value: str) -> str:
        first, dash, last = value.partition("-")
        if not dash or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"{value!r}: expected FIRST-LAST, e.g. 30000-30999")
        low, high = int(first), int(last)
        if not 1024 <= low <= high <= 65535:
            raise ValueError(f"{value!r}: need 1024 <= FIRST <= LAST <= 65535")
        return f"{low}-{high}"

    def ports(self) -> range:
        low, high = self.port_range.split("-")
        return range(int(low), int(high) + 1)

    @model_validator(mode="after")
    def _direct_needs(self) -> ServicesConfig:
        if self.mode != "direct":
            return self
        if self.advertise_address is None:
            raise ValueError("mode direct needs advertise_address (an address of this host)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is None and not self.insecure_http:
            raise ValueError(
                "mode direct needs cert_file and key_file (TLS: buyers send their endpoint "
                "token), or insecure_http: true on a loopback advertise_address"
            )
        if self.cert_file is None and not self.advertise_address.is_loopback:
            raise ValueError(
                f"insecure_http on {self.advertise_address} would send buyers' tokens across "
                "the network in clear; allowed on a loopback address only"
            )
        return self


class MeteringConfig(Strict):
    sample_interval: Duration = 5.0
    record_interval: Duration = 60.0
    batch_size: int = Field(default=500, ge=1, le=10_000)
    outbox_alert_records: int = Field(
        default=100_000, ge=1, description="pending records above this raise an alert metric"
    )

    @model_validator(mode="after")
    def _intervals(self) -> MeteringConfig:
        if self.sample_interval <= 0:
            raise ValueError("sample_interval must be positive")
        if self.record_interval < self.sample_interval:
            raise ValueError("record_interval must be at least sample_interval")
        return self


class StatusConfig(Strict):
    listen: str = Field(
        default="127.0.0.1:9470",
        description="host:port for /metrics, /healthz, /readyz and the status API",
    )
    scrape_timeout: Duration = 2.0


class AttestationConfig(Strict):
    backend: Literal["auto", "torch", "cupy", "numpy"] = "auto"


class OutputsConfig(Strict):
    """Batch leases' declared outputs, kept after the lease for the buyer to fetch
    (PROTOCOL.md "Lease outputs"). The disk floor is runtime.min_free_state_disk: a
    pack that would take the outputs directory's file system under it fails."""

    directory: Path | None = Field(default=None, description="None = <state_dir>/outputs")
    max_bytes: ByteSize = Field(
        default=10 * 1024**3, ge=0, description="largest archive a lease may ask for"
    )
    default_retention: Duration = Field(default=86400.0, ge=0)
    max_retention: Duration = Field(default=7 * 86400.0, ge=0)
    gc_interval: Duration = Field(default=60.0, gt=0, description="how often expiry is checked")

    @model_validator(mode="after")
    def _retention(self) -> OutputsConfig:
        if self.default_retention > self.max_retention:
            raise ValueError("default_retention must not exceed max_retention")
        return self


class AgentConfig(Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)

    def outputs_dir(self) -> Path:
        """Where retained lease outputs live: outputs.directory, else <state_dir>/outputs."""
        return Path(self.outputs.directory or self.node.state_dir / "outputs")

    def scratch_root(self) -> Path:
        """Where lease scratch dirs live: runtime.scratch_dir, else <state_dir>/scratch."""
        return Path(self.runtime.scratch_dir or self.node.state_dir / "scratch")


def load_agent_config(path: Path | None) -> AgentConfig:
    """Load and validate; raises ``ConfigError`` with one line per problem."""
    return load_config(AgentConfig, path, ENV_OVERRIDES)
