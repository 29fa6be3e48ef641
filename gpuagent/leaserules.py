"""Lease-spec and lease-update limits both sides enforce (one home for each rule).

The scheduler refuses a spec past these at submit, naming the field; the agent
refuses it again on assign (a coordinator is untrusted input too). Integer
maxima keep every value an SQLite/PostgreSQL ``BIGINT`` and every derived amount
(price x GPUs x duration) below 2^63, so no arithmetic downstream overflows.
"""

from __future__ import annotations

import re
import unicodedata

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
