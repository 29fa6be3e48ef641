"""Preflight checks for tenant isolation: what the egress policy and the engine need.

Part of ``gpu-agent doctor`` and the daemon's preflight. Blocking (subprocess-free,
but reads files and asks Docker): call from a worker thread.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import docker

from ..checks import CheckResult, Severity
from ..config import AgentConfig
from ..hostinfo import parse_version
from ..leases.scratch import ScratchError, resolve_mode, root_flags_missing

DAEMON_JSON = Path("/etc/docker/daemon.json")
IF_INET6 = Path("/proc/net/if_inet6")
PROC_STATUS = Path("/proc/self/status")
CAP_NET_ADMIN = 12
# Docker Engine fixes that isolation depends on.
ENGINE_FIREWALL_FIX = (28, 3, 3)  # rules lost on a firewalld reload (moby #50566)
ENGINE_RUNC_FIX = (28, 5, 2)  # runc CVE-2025-31133, CVE-2025-52565, CVE-2025-52881


def has_net_admin(status: Path = PROC_STATUS) -> bool:
    """Whether this process may change iptables rules (CAP_NET_ADMIN effective)."""
    try:
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_firewall_tools(
    policy_on: bool,
    which: Callable[[str], str | None] = shutil.which,
    net_admin: Callable[[], bool] = has_net_admin,
) -> CheckResult:
    if not policy_on:
        return CheckResult(
            "egress_policy",
            Severity.WARNING,
            "isolation.egress_policy is off: leases can reach the LAN, the host and "
            "169.254.169.254",
            "set isolation.egress_policy: true (the default)",
        )
    missing = [t for t in ("iptables-save", "iptables-restore") if which(t) is None]
    if missing:
        return CheckResult(
            "egress_policy",
            Severity.FATAL,
            f"{', '.join(missing)} not found: the egress policy cannot be installed, so "
            "every lease would be refused",
            "apt-get install iptables (the nft-backed iptables Docker also uses)",
        )
    if not net_admin():
        return CheckResult(
            "egress_policy",
            Severity.WARNING,
            "the agent lacks CAP_NET_ADMIN: the egress policy cannot be installed, so "
            "every lease will fail to start",
            "run it as root or with CAP_NET_ADMIN and CAP_NET_RAW (the shipped systemd "
            "unit grants both), or set isolation.egress_policy: false",
        )
    return CheckResult("egress_policy", Severity.OK, "iptables present for the egress policy")


def check_ipv6_filter(
    which: Callable[[str], str | None] = shutil.which, if_inet6: Path = IF_INET6
) -> CheckResult:
    try:
        ipv6_on = bool(if_inet6.read_text(encoding="ascii").strip())
    except OSError:
        ipv6_on = False
    if not ipv6_on:
        return CheckResult("ipv6_filter", Severity.OK, "IPv6 off on this host: nothing to filter")
    if which("ip6tables-save") is None or which("ip6tables-restore") is None:
        return CheckResult(
            "ipv6_filter",
            Severity.WARNING,
            "IPv6 is on but ip6tables is missing: IPv6 from lease networks is not filtered",
            "apt-get install iptables (ships ip6tables)",
        )
    return CheckResult("ipv6_filter", Severity.OK, "IPv6 filtered with ip6tables")


def check_userland_proxy(daemon_json: Path = DAEMON_JSON) -> CheckResult:
    try:
        settings: Any = json.loads(daemon_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = {}
    if isinstance(settings, dict) and settings.get("userland-proxy") is False:
        return CheckResult(
            "userland_proxy",
            Severity.WARNING,
            "Docker's userland proxy is off: ports published on 127.0.0.1 are then served "
            "through NAT with route_localnet=1, which machines on the LAN can reach on "
            "engines before 28.0",
            f'remove "userland-proxy": false from {daemon_json} (or run Docker >= 28)',
        )
    return CheckResult("userland_proxy", Severity.OK, "Docker's userland proxy is on")


def check_engine_isolation(version: str | None) -> CheckResult:
    parsed = parse_version(version or "")
    if parsed is None:
        return CheckResult("engine_isolation", Severity.INFO, "Docker Engine version unknown")
    if parsed < ENGINE_FIREWALL_FIX:
        return CheckResult(
            "engine_isolation",
            Severity.WARNING,
            f"Docker Engine {version} loses its firewall rules on a firewalld reload (fixed "
            "in 28.3.3) and lacks the runc container-escape fixes of 28.5.2; the agent "
            "restores its own rules (isolation.recheck_interval) but not Docker's",
            "upgrade Docker Engine to 28.5.2 or newer",
        )
    if parsed < ENGINE_RUNC_FIX:
        return CheckResult(
            "engine_isolation",
            Severity.WARNING,
            f"Docker Engine {version} ships a runc vulnerable to CVE-2025-31133, "
            "CVE-2025-52565 and CVE-2025-52881 (container escapes; fixed in 28.5.2)",
            "upgrade Docker Engine to 28.5.2 or newer",
        )
    return CheckResult("engine_isolation", Severity.OK, f"Docker Engine {version}")


def check_userns(security_options: Sequence[str] | None) -> CheckResult:
    if security_options is None:
        return CheckResult("userns_remap", Severity.INFO, "Docker security options unknown")
    # "name=userns" on current API versions, "userns" on the pinned 1.24.
    if any("userns" in option for option in security_options):
        return CheckResult(
            "userns_remap", Severity.OK, "userns-remap on: container root is not host root"
        )
    return CheckResult(
        "userns_remap",
        Severity.INFO,
        "userns-remap off: root in a lease is root on the host if it escapes",
        'recommended: "userns-remap": "default" in /etc/docker/daemon.json, then restart '
        "Docker (GPU leases need the NVIDIA runtime's userns support)",
    )


def check_scratch(setting: Literal["auto", "loop", "measured"], root: Path) -> CheckResult:
    try:
        mode, why = resolve_mode(setting)
    except ScratchError as exc:
        return CheckResult(
            "scratch",
            Severity.FATAL,
            str(exc),
            "run the agent as root in the host's mount namespace, or set "
            "runtime.scratch_mode: auto",
        )
    if mode == "loop":
        return CheckResult("scratch", Severity.OK, f"scratch mode loop: {why}")
    missing = root_flags_missing(root)
    quota = (
        f"scratch mode measured: {why}; a lease over its quota is stopped (scratch_quota_exceeded)"
    )
    if not missing:
        return CheckResult("scratch", Severity.INFO, f"{quota}; {root} is mounted nosuid,nodev")
    return CheckResult(
        "scratch",
        Severity.WARNING,
        f"{quota}; {root} is not mounted {','.join(missing)}",
        "run `gpu-agent scratch-mount` as root before the agent starts (the shipped "
        'systemd unit does), or run the agent as root for loop mode (docs/leases.md "Scratch")',
    )


def check_writable_layer(info: dict[str, Any], size: int | None) -> CheckResult:
    driver = str(info.get("Driver", ""))
    status = {str(k): str(v) for k, v in info.get("DriverStatus") or []}
    backing = status.get("Backing Filesystem", "")
    if size is None:
        return CheckResult(
            "writable_layer", Severity.INFO, "runtime.writable_layer_size is null: unbounded"
        )
    if driver == "overlay2" and backing == "xfs":
        return CheckResult(
            "writable_layer",
            Severity.OK,
            f"writable layer bounded to {size} bytes (overlay2 on xfs; needs pquota, "
            "checked at the first lease)",
        )
    return CheckResult(
        "writable_layer",
        Severity.WARNING,
        f"writable layer unbounded: storage driver {driver or 'unknown'}"
        + (f" on {backing}" if backing else "")
        + " cannot take storage-opt size; a lease can fill Docker's disk",
        "put /var/lib/docker on xfs mounted with pquota and use the overlay2 driver",
    )


def engine_facts(docker_host: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """``docker info``, or None when the engine is unreachable."""
    if docker_host.startswith("unix://") and not Path(docker_host[7:]).exists():
        return None  # the SDK leaks its socket when connect() finds no file
    try:
        # Pinned, as in hostinfo.docker_version: "auto" connects in the constructor.
        client = docker.APIClient(
            base_url=docker_host, timeout=max(int(timeout), 1), version="1.24"
        )
    except Exception:  # the docker SDK raises several unrelated types here
        return None
    try:
        info: dict[str, Any] = client.info()
    except Exception:  # check_docker reports the engine being unreachable
        return None
    finally:
        client.close()
    return info


def isolation_checks(config: AgentConfig) -> list[CheckResult]:
    info = engine_facts(config.runtime.docker_host)
    results = [check_firewall_tools(config.isolation.egress_policy)]
    if config.isolation.egress_policy:
        results.append(check_ipv6_filter())
    results.append(check_userland_proxy())
    results.append(check_scratch(config.runtime.scratch_mode, config.scratch_root()))
    if info is not None:
        results += [
            check_engine_isolation(str(info.get("ServerVersion") or "") or None),
            check_userns(list(info.get("SecurityOptions") or [])),
            check_writable_layer(info, config.runtime.writable_layer_size),
        ]
    return results
