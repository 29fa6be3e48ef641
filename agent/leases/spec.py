"""The lease spec a buyer sends, and the checks that decide whether this host runs it.

Everything here is untrusted input from the coordinator. ``parse_spec`` turns a
wire dict (field names as in ``gpuagent.v1.LeaseSpec``, e.g. from
``MessageToDict(..., preserving_proto_field_name=True)``) into a ``LeaseSpec``;
``check_spec`` holds it against the host's ``RuntimeConfig`` and what is free.
Both raise ``LeaseRejected`` with a machine code and a sentence the buyer can
read. Fields Docker would honour but this agent never does (``privileged``,
host namespaces, volumes, devices, extra capabilities) are modelled on purpose,
so that a hostile spec is refused by name rather than as an "unknown field".
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gpuagent import leaserules
from gpuagent.configload import format_validation_error
from gpuagent.units import ByteSize, format_size

from ..config import RuntimeConfig

MAX_REASON_CHARS = 1024
MAX_ENV_VARS = 1024
MAX_ENV_BYTES = leaserules.MAX_ENV_BYTES
MAX_ARGS = 4096
MAX_GPUS = leaserules.MAX_GPUS_PER_LEASE
MAX_BYTES = 2**62  # Docker takes int64; anything near it is garbage too
LEASE_ID_RE = leaserules.LEASE_ID_RE
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The NVIDIA container runtime reads these from the environment: a lease that
# sets NVIDIA_VISIBLE_DEVICES=all would see every GPU on the host.
RESERVED_ENV_PREFIXES = ("NVIDIA_",)
RESERVED_ENV_NAMES = frozenset({"CUDA_VISIBLE_DEVICES"})
# Paths whose mount would hand the container the Docker (or containerd) socket.
SOCKET_PARENTS = frozenset({"/", "/var", "/var/run", "/run", "/run/containerd"})


class RejectCode(StrEnum):
    INVALID_LEASE_ID = "invalid_lease_id"
    INVALID_SPEC = "invalid_spec"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_ENV = "invalid_env"
    RESERVED_ENV = "reserved_env"
    INVALID_IMAGE = "invalid_image"
    REGISTRY_DENIED = "registry_denied"
    PRIVILEGED = "privileged"
    HOST_NAMESPACE = "host_namespace"
    HOST_PATH = "host_path"
    DOCKER_SOCKET = "docker_socket"
    DEVICES = "devices"
    CAPABILITY = "capability"
    EXCEEDS_HOST_LIMIT = "exceeds_host_limit"
    INSUFFICIENT_GPUS = "insufficient_gpus"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    INSUFFICIENT_CPUS = "insufficient_cpus"
    GPU_CONFLICT = "gpu_conflict"
    INSUFFICIENT_DISK = "insufficient_disk"
    TOOLKIT_VULNERABLE = "toolkit_vulnerable"


@dataclass(frozen=True)
class Rejection:
    code: RejectCode
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class LeaseRejected(Exception):
    """The agent refuses the lease; ``rejection`` is what the buyer is told."""

    def __init__(self, code: RejectCode, message: str) -> None:
        if len(message) > MAX_REASON_CHARS:
            message = message[: MAX_REASON_CHARS - 3] + "..."
        self.rejection = Rejection(code, message)
        super().__init__(str(self.rejection))


class _Wire(BaseModel):
    # Frozen so a validated spec cannot be changed on its way to Docker.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


class PortSpec(_Wire):
    container_port: int = Field(ge=1, le=65535)
    # Checked by the shared rules (leaserules.check_ports), so the refusal names the key
    # as the scheduler does.
    protocol: str = Field(default="tcp", max_length=64)
    name: str = Field(default="", max_length=64, description="'' = the port number")

    @field_validator("protocol", mode="before")
    @classmethod
    def _default_protocol(cls, value: object) -> object:
        # proto3 sends "" for an unset string.
        return "tcp" if value in ("", None) else value

    @model_validator(mode="after")
    def _default_name(self) -> PortSpec:
        if not self.name:
            object.__setattr__(self, "name", str(self.container_port))
        return self

    def rule(self) -> leaserules.Port:
        return leaserules.Port(self.name, self.container_port, self.protocol)


class HealthSpec(_Wire):
    """The HTTP health check; 0 / "" = the default (``leaserules.HEALTH_DEFAULTS``)."""

    path: str = Field(default="", max_length=leaserules.MAX_HEALTH_PATH)
    port: str = Field(default="", max_length=64)
    initial_delay: float = 0.0
    period: float = 0.0
    timeout: float = 0.0
    failure_threshold: int = Field(default=0, ge=0, le=2**32 - 1)
    startup_grace: float = 0.0

    def rule(self) -> leaserules.Health:
        return leaserules.Health(**self.model_dump())


class RegistryAuth(_Wire):
    username: str = Field(default="", max_length=1024)
    password: SecretStr = Field(default=SecretStr(""), max_length=16384)
    server: str = Field(default="", max_length=1024)


class VolumeMount(_Wire):
    """Modelled only to be rejected: leases get a scratch dir, never host paths."""

    host_path: str = Field(default="", max_length=4096)
    container_path: str = Field(default="", max_length=4096)
    read_only: bool = False


class DeviceMapping(_Wire):
    """Modelled only to be rejected: GPUs come from the allocator, nothing else."""

    host_path: str = Field(default="", max_length=4096)
    container_path: str = Field(default="", max_length=4096)


class LeaseSpec(_Wire):
    image: str = Field(min_length=1, max_length=1024)
    command: list[str] = Field(default_factory=list, max_length=MAX_ARGS)
    args: list[str] = Field(default_factory=list, max_length=MAX_ARGS)
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    gpu_count: int = Field(default=0, ge=0, le=MAX_GPUS)
    gpu_model: str = Field(default="", max_length=256)
    gpu_min_memory_bytes: ByteSize = Field(default=0, le=MAX_BYTES)
    cpus: float = Field(default=0.0, ge=0, le=1_000_000, description="0 = runtime.default_cpus")
    memory_bytes: ByteSize = Field(default=0, le=MAX_BYTES, description="0 = default_memory")
    shm_bytes: ByteSize = Field(default=0, le=MAX_BYTES, description="0 = Docker's 64MiB")
    scratch_bytes: ByteSize = Field(default=0, le=MAX_BYTES)
    ports: list[PortSpec] = Field(default_factory=list, max_length=leaserules.MAX_PORTS * 4)
    restart: str = Field(default="", max_length=64, description="'' = never")
    max_restarts: int = Field(default=0, ge=0, le=2**32 - 1, description="0 = the default")
    health: HealthSpec | None = None
    max_duration_seconds: int = Field(default=0, ge=0, le=10 * 365 * 86400, description="0 = none")
    price_micro_per_gpu_hour: int = Field(default=0, ge=0, le=2**63 - 1)
    registry_auth: RegistryAuth | None = None
    # Services: the relay asks no endpoint token (the agent serves such ports the same).
    public: bool = False
    # Batch outputs (PROTOCOL.md "Lease outputs"): checked by leaserules.check_outputs.
    outputs: list[str] = Field(default_factory=list, max_length=leaserules.MAX_OUTPUTS * 4)
    output_max_bytes: ByteSize = Field(default=0, le=MAX_BYTES, description="0 = outputs.max_bytes")
    output_retention_seconds: int = Field(default=0, ge=0, le=2**63 - 1, description="0 = default")
    outputs_required: bool = False
    # Hostile fields: accepted by the schema so they can be refused by name.
    privileged: bool = False
    host_network: bool = False
    network_mode: str = Field(default="", max_length=256)
    pid_mode: str = Field(default="", max_length=256)
    ipc_mode: str = Field(default="", max_length=256)
    uts_mode: str = Field(default="", max_length=256)
    userns_mode: str = Field(default="", max_length=256)
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=64)
    devices: list[DeviceMapping] = Field(default_factory=list, max_length=64)
    cap_add: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("image")
    @classmethod
    def _image_text(cls, value: str) -> str:
        return _no_nul(value, "image")

    @field_validator("command", "args")
    @classmethod
    def _argv(cls, values: list[str]) -> list[str]:
        for i, value in enumerate(values):
            _no_nul(value, f"item {i}")
        return values

    @model_validator(mode="after")
    def _argv_size(self) -> LeaseSpec:
        total = leaserules.argv_bytes(self.command, self.args)
        if total > leaserules.MAX_ARGV_BYTES:
            raise ValueError(
                f"command and args are {total} bytes, over the {leaserules.MAX_ARGV_BYTES} allowed"
            )
        return self

    @model_validator(mode="after")
    def _service(self) -> LeaseSpec:
        # The shared rules (gpuagent.leaserules), as the scheduler applies them at submit.
        ports = [p.rule() for p in self.ports]
        leaserules.check_ports(ports)
        leaserules.check_restart(self.restart, self.max_restarts)
        if self.health is not None:
            leaserules.check_health(self.health.rule(), ports)
        self.output_patterns()
        return self

    def output_patterns(self) -> list[str]:
        """The declared outputs relative to /scratch (``leaserules.check_outputs``)."""
        return leaserules.check_outputs(
            self.outputs,
            self.output_max_bytes,
            self.output_retention_seconds,
            self.outputs_required,
        )

    def service_ports(self) -> list[leaserules.Port]:
        return [p.rule() for p in self.ports]

    def restart_policy(self) -> tuple[str, int]:
        """The restart policy and its budget of consecutive restarts, defaults filled."""
        return leaserules.check_restart(self.restart, self.max_restarts)

    def health_check(self) -> leaserules.Health | None:
        """The health check with defaults filled, or None when the spec has none."""
        if self.health is None:
            return None
        return leaserules.check_health(self.health.rule(), self.service_ports())

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        total = 0
        for name, value in env.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(
                    f"environment variable name {name[:64]!r} is not a plain name "
                    "(letters, digits, underscore; not starting with a digit)"
                )
            _no_nul(value, f"environment variable {name} value")
            total += len(name) + len(value) + 2
        if total > MAX_ENV_BYTES:
            raise ValueError(f"environment is {total} bytes, over the {MAX_ENV_BYTES} allowed")
        return env

    @field_validator("cpus")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("cpus must be a finite number")
        return value

    @field_validator("registry_auth", mode="before")
    @classmethod
    def _empty_auth(cls, value: object) -> object:
        # proto3 sends an all-empty message when the field is unset.
        if isinstance(value, Mapping) and not any(value.values()):
            return None
        return value

    def stored(self) -> dict[str, Any]:
        """The spec as JSON-safe data for the state DB: registry credentials left out."""
        data: dict[str, Any] = self.model_dump(mode="json", exclude={"registry_auth"})
        return data


@dataclass(frozen=True)
class ImageRef:
    registry: str  # "docker.io" for unqualified names, as Docker resolves them
    repository: str  # as Docker wants it for a pull: with the registry host when explicit
    tag: str | None
    digest: str | None

    @property
    def pull_tag(self) -> str:
        """What to pass as ``tag`` to the pull API: the digest wins over the tag."""
        return self.digest or self.tag or "latest"


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(
    rf"^(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
_DOMAIN_RE = re.compile(
    r"^(?:localhost|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]{1,5})?$"
)


def parse_image(reference: str) -> ImageRef:
    """Split an image reference the way Docker does; ValueError says what is wrong."""
    domain: str | None = None
    rest = reference
    first, sep, remainder = reference.partition("/")
    # Docker's rule: the first component names a registry only if it looks like a host.
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN_RE.match(first):
            raise ValueError(f"registry host {first!r} is not a valid host[:port]")
        domain, rest = first, remainder
    match = _PATH_RE.match(rest)
    if not match:
        raise ValueError(
            f"{reference[:200]!r} is not an image reference "
            "(expected [registry/]name[:tag][@sha256:<64 hex>], lower-case name)"
        )
    path = match["path"]
    return ImageRef(
        registry=(domain or "docker.io").lower(),
        repository=f"{domain}/{path}" if domain else path,
        tag=match["tag"],
        digest=match["digest"],
    )


def _registry_matches(registry: str, patterns: Sequence[str]) -> bool:
    """Exact host match, or ``*.example.com`` for its subdomains."""
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == registry:
            return True
        if pattern.startswith("*.") and registry.endswith(pattern[1:]):
            return True
    return False


def validate_lease_id(lease_id: object) -> str:
    # The id names the container and the scratch dir, so it must be path-safe.
    if not isinstance(lease_id, str) or not LEASE_ID_RE.match(lease_id):
        shown = repr(lease_id)[:80]
        raise LeaseRejected(
            RejectCode.INVALID_LEASE_ID,
            f"lease id {shown} must be {leaserules.LEASE_ID_RULE}",
        )
    return lease_id


def parse_spec(raw: Mapping[str, Any] | LeaseSpec) -> LeaseSpec:
    """Schema checks only; raises ``LeaseRejected`` naming every bad field."""
    if isinstance(raw, LeaseSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise LeaseRejected(
            RejectCode.INVALID_SPEC, f"spec must be a mapping, got {type(raw).__name__}"
        )
    try:
        return LeaseSpec.model_validate(dict(raw))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # The shared rules name their own key ("health.path: ..."), not "(top level)".
        problems = [
            p.removeprefix("(top level): ") for p in format_validation_error(LeaseSpec, exc)
        ]
        if all(e["type"] == "extra_forbidden" for e in errors):
            code = RejectCode.UNKNOWN_FIELD
        elif any(e["loc"] and e["loc"][0] == "env" for e in errors):
            code = RejectCode.INVALID_ENV
        else:
            code = RejectCode.INVALID_SPEC
        raise LeaseRejected(code, "; ".join(problems)) from None


@dataclass(frozen=True)
class GpuDescription:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class FreeCapacity:
    """What this host can still give: the manager computes it at assignment time."""

    gpus: Sequence[str]  # healthy, uncordoned, unallocated UUIDs, in preference order
    memory_bytes: int
    cpus: float
    gpu_details: Mapping[str, GpuDescription] | None = None


def matching_gpus(spec: LeaseSpec, free: FreeCapacity) -> list[str]:
    """Free GPUs that meet the spec's model and memory constraints, in order."""
    if not spec.gpu_model and not spec.gpu_min_memory_bytes:
        return list(free.gpus)
    details = free.gpu_details or {}
    result = []
    for uuid in free.gpus:
        info = details.get(uuid)
        if info is None:
            continue  # unknown GPUs cannot be shown to meet a constraint
        if spec.gpu_model and spec.gpu_model.lower() not in info.name.lower():
            continue
        if info.memory_bytes < spec.gpu_min_memory_bytes:
            continue
        result.append(uuid)
    return result


def effective_memory(spec: LeaseSpec, policy: RuntimeConfig) -> int:
    return spec.memory_bytes or policy.default_memory


def effective_cpus(spec: LeaseSpec, policy: RuntimeConfig) -> float:
    return spec.cpus or policy.default_cpus


def effective_scratch(spec: LeaseSpec, policy: RuntimeConfig) -> int:
    return spec.scratch_bytes or policy.default_scratch


def _check_isolation(spec: LeaseSpec, policy: RuntimeConfig) -> None:
    if spec.privileged:
        raise LeaseRejected(
            RejectCode.PRIVILEGED, "privileged containers are never run on this host"
        )
    if spec.host_network or spec.network_mode.lower() == "host":
        raise LeaseRejected(
            RejectCode.HOST_NAMESPACE, "the host network namespace is not available to leases"
        )
    if spec.network_mode not in leaserules.NAMESPACE_MODES["network_mode"]:
        raise LeaseRejected(
            RejectCode.HOST_NAMESPACE,
            f"network_mode {spec.network_mode[:64]!r} is not allowed (only bridge or none)",
        )
    if spec.network_mode == "none" and spec.ports:
        raise LeaseRejected(
            RejectCode.INVALID_SPEC,
            leaserules.PORTS_WITHOUT_NETWORK,
        )
    for field, allowed in leaserules.NAMESPACE_MODES.items():
        if field == "network_mode":
            continue  # checked above, with its own messages
        value: str = getattr(spec, field)
        if value not in allowed:
            raise LeaseRejected(
                RejectCode.HOST_NAMESPACE,
                f"{field} {value[:64]!r} is not allowed: leases get their own namespaces",
            )
    for i, volume in enumerate(spec.volumes):
        path = posixpath.normpath(volume.host_path or "/")
        if path in SOCKET_PARENTS or path.endswith(".sock") or "docker" in path.split("/"):
            raise LeaseRejected(
                RejectCode.DOCKER_SOCKET,
                f"volumes[{i}]: mounting {volume.host_path[:200]!r} would expose the "
                "container runtime's socket; never allowed",
            )
        raise LeaseRejected(
            RejectCode.HOST_PATH,
            f"volumes[{i}]: host path {volume.host_path[:200]!r} cannot be mounted; "
            "leases get a private scratch dir at /scratch instead",
        )
    if spec.devices:
        raise LeaseRejected(
            RejectCode.DEVICES,
            f"devices[0]: {spec.devices[0].host_path[:200]!r}: host devices are not passed "
            "through; GPUs are assigned by the agent",
        )
    allowed_caps = set(policy.allowed_capabilities)
    for cap in spec.cap_add:
        name = cap.upper().removeprefix("CAP_")
        if name == "ALL" or name not in allowed_caps:
            shown = ", ".join(sorted(allowed_caps)) or "none"
            raise LeaseRejected(
                RejectCode.CAPABILITY,
                f"capability {cap[:64]!r} is not allowed on this host (allowed: {shown})",
            )


def _check_env(spec: LeaseSpec) -> None:
    for name in spec.env:
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise LeaseRejected(
                RejectCode.RESERVED_ENV,
                f"environment variable {name} is set by the agent to the lease's GPUs "
                "and cannot be overridden",
            )


def _check_image(spec: LeaseSpec, policy: RuntimeConfig) -> ImageRef:
    try:
        ref = parse_image(spec.image)
    except ValueError as exc:
        raise LeaseRejected(RejectCode.INVALID_IMAGE, str(exc)) from None
    if _registry_matches(ref.registry, policy.denied_registries):
        raise LeaseRejected(
            RejectCode.REGISTRY_DENIED, f"registry {ref.registry} is denied on this host"
        )
    if policy.allowed_registries and not _registry_matches(ref.registry, policy.allowed_registries):
        raise LeaseRejected(
            RejectCode.REGISTRY_DENIED,
            f"registry {ref.registry} is not allowed on this host "
            f"(allowed: {', '.join(policy.allowed_registries)})",
        )
    return ref


def _check_limits(spec: LeaseSpec, policy: RuntimeConfig) -> None:
    memory = effective_memory(spec, policy)
    cpus = effective_cpus(spec, policy)
    checks: tuple[tuple[str, float, float, str, str], ...] = (
        (
            "gpu_count",
            spec.gpu_count,
            policy.max_gpus_per_lease,
            str(spec.gpu_count),
            str(policy.max_gpus_per_lease),
        ),
        (
            "memory_bytes",
            memory,
            policy.max_memory,
            format_size(memory),
            format_size(policy.max_memory),
        ),
        ("cpus", cpus, policy.max_cpus, f"{cpus:g}", f"{policy.max_cpus:g}"),
        (
            "shm_bytes",
            spec.shm_bytes,
            policy.max_shm,
            format_size(spec.shm_bytes),
            format_size(policy.max_shm),
        ),
        (
            "scratch_bytes",
            spec.scratch_bytes,
            policy.max_scratch,
            format_size(spec.scratch_bytes),
            format_size(policy.max_scratch),
        ),
    )
    for field, asked, limit, asked_text, limit_text in checks:
        if asked > limit:
            raise LeaseRejected(
                RejectCode.EXCEEDS_HOST_LIMIT,
                f"{field} {asked_text} is over this host's per-lease limit of {limit_text}",
            )
    if spec.shm_bytes and spec.shm_bytes > memory:
        raise LeaseRejected(
            RejectCode.INVALID_SPEC, "shm_bytes must not exceed memory_bytes (shm counts as memory)"
        )


def check_spec(spec: LeaseSpec, policy: RuntimeConfig, free: FreeCapacity) -> ImageRef:
    """Policy checks, in the order a buyer would fix them; returns the parsed image."""
    _check_isolation(spec, policy)
    _check_env(spec)
    ref = _check_image(spec, policy)
    _check_limits(spec, policy)
    candidates = matching_gpus(spec, free)
    if spec.gpu_count > len(candidates):
        constraint = ""
        if spec.gpu_model:
            constraint += f" of model {spec.gpu_model!r}"
        if spec.gpu_min_memory_bytes:
            constraint += f" with at least {format_size(spec.gpu_min_memory_bytes)}"
        raise LeaseRejected(
            RejectCode.INSUFFICIENT_GPUS,
            f"lease needs {spec.gpu_count} GPU(s){constraint}; {len(candidates)} free "
            "and healthy on this host",
        )
    memory = effective_memory(spec, policy)
    if memory > free.memory_bytes:
        raise LeaseRejected(
            RejectCode.INSUFFICIENT_MEMORY,
            f"lease needs {format_size(memory)} of memory; "
            f"{format_size(max(free.memory_bytes, 0))} free on this host",
        )
    cpus = effective_cpus(spec, policy)
    if cpus > free.cpus + 1e-9:
        raise LeaseRejected(
            RejectCode.INSUFFICIENT_CPUS,
            f"lease needs {cpus:g} CPUs; {max(free.cpus, 0):g} free on this host",
        )
    return ref
