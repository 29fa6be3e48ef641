"""Lease-spec and lease-update limits both sides enforce (one home for each rule).

The scheduler refuses a spec past these at submit, naming the field; the agent
refuses it again on assign (a coordinator is untrusted input too). Integer
maxima keep every value an SQLite/PostgreSQL ``BIGINT`` and every derived amount
(price x GPUs x duration) below 2^63, so no arithmetic downstream overflows.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

# Lease ids name the agent's container and scratch dir: path-safe.
LEASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LEASE_ID_RULE = (
    "1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
)
# Above any real host (an 8-GPU board is the common maximum); a larger count is
# garbage, not a big ask, and is refused by both sides as such.
MAX_GPUS_PER_LEASE = 64
# LeaseSpec fields every agent refuses whatever its configuration (PROTOCOL.md
# "Hostile specs"): the scheduler refuses them at submit so the buyer learns at once.
REFUSED_FIELDS = ("privileged", "host_network", "volumes", "devices")
# Capabilities are granted only where an agent's runtime.allowed_capabilities lists
# them; the reference scheduler does not place by capability, so it refuses them too.
SCHEDULER_REFUSED_FIELDS = (*REFUSED_FIELDS, "cap_add")
# Namespace modes a lease may ask for (the agent's spec format; the wire spec has
# host_network and network_mode, see BUYER_NETWORK_MODES): anything else would
# share a host namespace.
NAMESPACE_MODES: dict[str, tuple[str, ...]] = {
    "network_mode": ("", "bridge", "default", "none"),
    "pid_mode": ("",),
    "ipc_mode": ("", "private", "none"),
    "uts_mode": ("",),
    "userns_mode": ("",),
}

MAX_ARGV_BYTES = 64 * 1024  # command + args together, UTF-8
MAX_ENV_BYTES = 256 * 1024  # names + values + separators
MAX_SIZE_BYTES = 2**50  # 1 PiB: memory, shm, scratch, GPU memory asks
MAX_DURATION_S = 366 * 86400 * 10  # ten years
MAX_PRICE_MICROS = 10**12  # a million units per GPU-hour
MAX_REASON_CHARS = 1024  # LeaseUpdate.reason as sent
UINT64_FIELDS: dict[str, int] = {
    "gpu_min_memory_bytes": MAX_SIZE_BYTES,
    "memory_bytes": MAX_SIZE_BYTES,
    "shm_bytes": MAX_SIZE_BYTES,
    "scratch_bytes": MAX_SIZE_BYTES,
    "max_duration_seconds": MAX_DURATION_S,
    "price_micro_per_gpu_hour": MAX_PRICE_MICROS,
}


# What a buyer may ask for in LeaseSpec.network_mode: "" (the lease's own network:
# bridge, ICC off, egress policy) or "none" (loopback only). The agent also takes
# "bridge"/"default" as spellings of "" from older coordinators; nothing else.
BUYER_NETWORK_MODES = ("", "none")
PORTS_WITHOUT_NETWORK = (
    "ports cannot be published by a lease with network_mode none (it has no network)"
)


def argv_bytes(command: list[str] | tuple[str, ...], args: list[str] | tuple[str, ...]) -> int:
    return sum(len(part.encode("utf-8", errors="replace")) + 1 for part in (*command, *args))


def control_char(text: str) -> int | None:
    """Index of the first control character (newline, escape, NUL...) in ``text``."""
    for index, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cf"):
            return index
    return None


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked as cut."""
    return text if len(text) <= limit else text[: limit - 15] + " ...[truncated]"


# -- service leases: ports, restart policy, health check (issue #16) ----------------
#
# One set of rules for the agent (agent/leases/spec.py, on assign) and the scheduler
# (scheduler/leases_service.py, at submit). Each refusal is a ``RuleError`` whose key
# names the spec field (``ports[1].name``, ``health.period``), so both sides say the
# same thing in the same words.

MAX_PORTS = 16
# Port names end up in host names (``<lease-id>-<name>.<relay domain>``): a DNS label
# piece, short enough that a 36-character lease id plus the name stays under 63.
MAX_PORT_NAME = 15
PORT_PROTOCOLS = ("http", "tcp", "udp")  # udp is published on the host only, never relayed
RESTART_POLICIES = ("never", "on-failure", "always")
DEFAULT_MAX_RESTARTS = 5
MAX_RESTARTS = 1000
# Restart backoff: BACKOFF_BASE_S x 2^(n-1) before the n-th consecutive restart, at most
# BACKOFF_MAX_S. A container that ran STABLE_AFTER_S before it died starts a new streak:
# max_restarts bounds a crash loop, not the restarts of a service that runs for weeks.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
STABLE_AFTER_S = 600.0
MAX_HEALTH_PATH = 1024
HEALTH_DEFAULTS = {
    "initial_delay": 0.0,
    "period": 10.0,
    "timeout": 5.0,
    "failure_threshold": 3,
    "startup_grace": 300.0,
}
# (minimum, maximum) for each health value the buyer sets; 0 means "the default".
HEALTH_BOUNDS: dict[str, tuple[float, float]] = {
    "initial_delay": (0.0, 86400.0),
    "period": (0.2, 3600.0),
    "timeout": (0.1, 600.0),
    "failure_threshold": (1, 1000),
    "startup_grace": (1.0, 7 * 86400.0),
}


class RuleError(ValueError):
    """A spec value no agent accepts; ``key`` names it as the spec spells it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Port:
    name: str  # "" = the port number
    container_port: int
    protocol: str  # "" = tcp


@dataclass(frozen=True)
class Health:
    """The health check as given (0 / "" = default) or, from ``check_health``, resolved."""

    path: str = ""
    port: str = ""
    initial_delay: float = 0.0
    period: float = 0.0
    timeout: float = 0.0
    failure_threshold: int = 0
    startup_grace: float = 0.0


def port_name(port: Port) -> str:
    return port.name or str(port.container_port)


def port_protocol(port: Port) -> str:
    return port.protocol or "tcp"


_PORT_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


def check_ports(ports: Sequence[Port]) -> None:
    if len(ports) > MAX_PORTS:
        raise RuleError("ports", f"at most {MAX_PORTS} per lease, got {len(ports)}")
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for index, port in enumerate(ports):
        key = f"ports[{index}]"
        if not 1 <= port.container_port <= 65535:
            raise RuleError(f"{key}.container_port", f"must be 1..65535, got {port.container_port}")
        if port_protocol(port) not in PORT_PROTOCOLS:
            raise RuleError(
                f"{key}.protocol",
                f"must be one of {', '.join(PORT_PROTOCOLS)}, got {port.protocol[:32]!r}",
            )
        name = port_name(port)
        if len(name) > MAX_PORT_NAME or not _PORT_NAME_RE.match(name):
            raise RuleError(
                f"{key}.name",
                f"{name[:64]!r} must be 1-{MAX_PORT_NAME} lower-case letters, digits or '-', "
                "not starting or ending with '-' (it becomes part of a host name)",
            )
        if name.isdigit() and int(name) != port.container_port:
            raise RuleError(
                f"{key}.name",
                f"a numeric name must be the port's own number ({port.container_port}), got {name}",
            )
        if name in names:
            raise RuleError(f"{key}.name", f"{name!r} is also the name of ports[{names[name]}]")
        if port.container_port in numbers:
            raise RuleError(
                f"{key}.container_port",
                f"{port.container_port} is also declared by ports[{numbers[port.container_port]}]",
            )
        names[name] = index
        numbers[port.container_port] = index


def check_restart(restart: str, max_restarts: int) -> tuple[str, int]:
    """The policy and its restart budget, resolved (``""`` = never; 0 = the default)."""
    policy = restart or "never"
    if policy not in RESTART_POLICIES:
        raise RuleError(
            "restart", f"must be one of {', '.join(RESTART_POLICIES)}, got {restart[:32]!r}"
        )
    if not 0 <= max_restarts <= MAX_RESTARTS:
        raise RuleError("max_restarts", f"must be 0..{MAX_RESTARTS}, got {max_restarts}")
    if policy == "never":
        if max_restarts:
            raise RuleError(
                "max_restarts", "set, but restart is never (set restart: on-failure or always)"
            )
        return policy, 0
    return policy, max_restarts or DEFAULT_MAX_RESTARTS


def find_port(ports: Sequence[Port], wanted: str) -> Port | None:
    """The declared port ``wanted`` names: by name, or by number."""
    for port in ports:
        if port_name(port) == wanted or str(port.container_port) == wanted:
            return port
    return None


def check_health(health: Health, ports: Sequence[Port]) -> Health:
    """Check the health check against the declared ports; returns it with defaults filled."""
    path = health.path or "/"
    if not path.startswith("/"):
        raise RuleError("health.path", f"must start with '/', got {path[:64]!r}")
    if len(path) > MAX_HEALTH_PATH:
        raise RuleError("health.path", f"at most {MAX_HEALTH_PATH} characters, got {len(path)}")
    bad = next((i for i, c in enumerate(path) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise RuleError(
            "health.path",
            f"character {bad} is not printable ASCII (spaces and controls are not allowed)",
        )
    http = [p for p in ports if port_protocol(p) == "http"]
    if health.port:
        port = find_port(ports, health.port)
        if port is None:
            raise RuleError("health.port", f"{health.port[:64]!r} is not a declared port")
        if port_protocol(port) != "http":
            raise RuleError(
                "health.port", f"{health.port!r} is a {port_protocol(port)} port; checks are HTTP"
            )
    elif len(http) == 1:
        port = http[0]
    else:
        why = (
            "no port is declared with protocol http" if not http else "several http ports: name one"
        )
        raise RuleError("health.port", why)
    values: dict[str, float] = {}
    for field, (low, high) in HEALTH_BOUNDS.items():
        given = getattr(health, field)
        if isinstance(given, float) and not math.isfinite(given):
            raise RuleError(f"health.{field}", "must be a finite number")
        if given == 0:
            values[field] = HEALTH_DEFAULTS[field]
            continue
        if not low <= given <= high:
            raise RuleError(
                f"health.{field}", f"must be {low:g}..{high:g} (0 = default), got {given:g}"
            )
        values[field] = given
    if not health.timeout:
        values["timeout"] = min(values["timeout"], values["period"])
    if values["timeout"] > values["period"]:
        raise RuleError(
            "health.timeout",
            f"{values['timeout']:g}s is longer than the period ({values['period']:g}s)",
        )
    return Health(
        path=path,
        port=port_name(port),
        initial_delay=values["initial_delay"],
        period=values["period"],
        timeout=values["timeout"],
        failure_threshold=int(values["failure_threshold"]),
        startup_grace=values["startup_grace"],
    )


def restart_backoff(streak: int) -> float:
    """Seconds to wait before the ``streak``-th consecutive restart (1-based)."""
    exponent: int = min(max(streak - 1, 0), 30)
    return float(min(BACKOFF_BASE_S * (1 << exponent), BACKOFF_MAX_S))


# Redundant runs (docs/verification.md): 0 or 1 = one run; 2 or 3 copies. More buys
# no stronger majority than 3 for N times the price, and a huge count would fan one
# submit out into that many leases.
MAX_VERIFY_REPLICAS = 3


def check_verify(replicas: int, outputs: Sequence[str], ports: int, restart: str) -> int:
    """The number of copies a ``verify`` asks for (1 = no verification), or RuleError.

    Copies are compared by their output digests, so a redundant run needs declared
    outputs; a service (ports, restart policies) has no single final result to compare.
    """
    if not 0 <= replicas <= MAX_VERIFY_REPLICAS:
        raise RuleError(
            "verify.replicas", f"must be 0..{MAX_VERIFY_REPLICAS} (2 or 3 copies), got {replicas}"
        )
    if replicas <= 1:
        return 1
    if not outputs:
        raise RuleError(
            "verify.replicas",
            "needs outputs: copies are compared by their output digests, and a lease "
            "without declared outputs has nothing to compare",
        )
    if ports:
        raise RuleError("verify.replicas", "not for services: a lease with ports has no result")
    if (restart or "never") != "never":
        raise RuleError(
            "verify.replicas", "not with a restart policy: a restarted run has no single result"
        )
    return replicas


# -- batch outputs (issue #22) -------------------------------------------------------
#
# What a lease declares it leaves behind in /scratch: paths or globs, relative to
# /scratch or absolute under it. One set of rules for the scheduler (at submit, on the
# wire spec) and the agent (on assign); each refusal names the key as ``outputs[2]``.

SCRATCH_PATH = "/scratch"
MAX_OUTPUTS = 64
MAX_OUTPUT_PATTERN = 1024  # characters of one declared path
MAX_OUTPUT_RETENTION_S = 366 * 86400  # a year: beyond it no provider promises anything
UINT64_FIELDS["output_max_bytes"] = MAX_SIZE_BYTES
UINT64_FIELDS["output_retention_seconds"] = MAX_OUTPUT_RETENTION_S
# The lease reasons an outputs failure ends with (the buyer matches on the first word).
OUTPUTS_OVER_LIMIT = "outputs_over_limit"
OUTPUTS_MISSING = "outputs_missing"
OUTPUTS_FAILED = "outputs_failed"


def check_outputs(
    patterns: Sequence[str],
    max_bytes: int = 0,
    retention_seconds: int = 0,
    required: bool = False,
    key: str = "outputs",
) -> list[str]:
    """The declared outputs, each made relative to /scratch (``/scratch/a/*.txt`` ->
    ``a/*.txt``); RuleError names the first bad entry. Never a way out of /scratch:
    no ``..``, no other absolute path, no NUL or control characters."""
    for name, value, limit in (
        ("output_max_bytes", max_bytes, MAX_SIZE_BYTES),
        ("output_retention_seconds", retention_seconds, MAX_OUTPUT_RETENTION_S),
    ):
        if not 0 <= value <= limit:
            raise RuleError(name, f"must be 0..{limit}, got {value}")
        if value and not patterns:
            raise RuleError(name, f"set, but no {key} are declared")
    if required and not patterns:
        raise RuleError("outputs_required", f"set, but no {key} are declared")
    if len(patterns) > MAX_OUTPUTS:
        raise RuleError(key, f"at most {MAX_OUTPUTS} paths, got {len(patterns)}")
    relative: list[str] = []
    for index, pattern in enumerate(patterns):
        where = f"{key}[{index}]"
        if not pattern.strip():
            raise RuleError(where, "empty; give a path under /scratch such as results/*.csv")
        if len(pattern) > MAX_OUTPUT_PATTERN:
            raise RuleError(where, f"at most {MAX_OUTPUT_PATTERN} characters, got {len(pattern)}")
        bad = control_char(pattern)
        if bad is not None:
            raise RuleError(where, f"control character at position {bad}")
        path = pattern
        if path.startswith("/"):
            if path != SCRATCH_PATH and not path.startswith(SCRATCH_PATH + "/"):
                raise RuleError(
                    where, f"{pattern[:64]!r} is outside /scratch (outputs are read from there)"
                )
            path = path[len(SCRATCH_PATH) :].lstrip("/")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise RuleError(where, f"{pattern[:64]!r}: '..' is not allowed (it leaves /scratch)")
        if any("**" in part and part != "**" for part in parts):
            raise RuleError(where, f"{pattern[:64]!r}: '**' must be a whole path component")
        relative.append("/".join(parts) or ".")
    return relative
