"""Preflight checks: what must hold before this host can serve leases, and how to fix it.

``gpu-agent doctor`` prints them; the daemon calls ``run_preflight`` at start
and refuses to start when ``fatal_results`` is not empty. With the simulated
backend the driver, NVML and toolkit checks are informational: there is no
GPU to protect. Blocking (NVML, Docker, subprocess): call from a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from .checks import CheckResult, Severity
from .config import AgentConfig, CoordinatorConfig, GpuConfig
from .gpu import NvmlUnavailable, open_backend
from .hostinfo import docker_version, free_bytes_under, toolkit_version
from .isolation import toolkit
from .isolation.host_checks import isolation_checks
from .link.channel import ChannelConfigError, channel_options, credentials

__all__ = ["CheckResult", "Severity", "fatal_results", "run_preflight"]

log = logging.getLogger(__name__)

MIN_TOOLKIT = toolkit.MIN_TOOLKIT  # the rule itself lives in isolation.toolkit
DISK_FATAL_BYTES = 1024**3
DISK_WARN_BYTES = 10 * 1024**3
NVIDIA_DRIVER_PROC = Path("/proc/driver/nvidia/version")
AMDGPU_INITSTATE = Path("/sys/module/amdgpu/initstate")
KFD_DEVICE = Path("/dev/kfd")
DRI_DIR = Path("/dev/dri")
CGROUP2_MARKER = Path("/sys/fs/cgroup/cgroup.controllers")
_TIME_ERROR = 5  # adjtimex(2): the kernel clock is not synchronised


def fatal_results(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.severity == Severity.FATAL]


def check_driver(simulated: bool, proc_file: Path = NVIDIA_DRIVER_PROC) -> CheckResult:
    if simulated:
        return CheckResult("driver", Severity.INFO, "simulated GPUs: NVIDIA driver not needed")
    try:
        first = proc_file.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return CheckResult(
            "driver",
            Severity.FATAL,
            f"NVIDIA kernel driver not loaded ({proc_file} missing)",
            "install the NVIDIA driver and load it (`modprobe nvidia`), then check `nvidia-smi`",
        )
    return CheckResult("driver", Severity.OK, first.strip())


def check_nvml(config: AgentConfig, nvml_module: Any = None) -> tuple[CheckResult, bool]:
    """The NVML result and whether the host has real GPUs behind it."""
    gpu = config.gpu
    if gpu.backend == "simulated":
        sim = gpu.simulated
        return (
            CheckResult("nvml", Severity.INFO, f"simulated backend: {sim.count} x {sim.profile}"),
            False,
        )
    try:
        backend = open_backend(gpu.model_copy(update={"backend": "nvml"}), nvml_module=nvml_module)
    except NvmlUnavailable as exc:
        severity = Severity.FATAL if gpu.backend == "nvml" else Severity.WARNING
        suffix = "" if gpu.backend == "nvml" else " (backend auto: falling back to simulated GPUs)"
        return CheckResult("nvml", severity, exc.cause + suffix, exc.fix), False
    try:
        count = backend.device_count()
        driver, cuda = backend.driver_versions()
    finally:
        backend.close()
    return (
        CheckResult("nvml", Severity.OK, f"{count} GPU(s), driver {driver}, CUDA {cuda}"),
        True,
    )


def check_rocm_driver(initstate: Path = AMDGPU_INITSTATE) -> CheckResult:
    """The amdgpu kernel module is loaded and initialised (what ROCm runs on)."""
    try:
        state = initstate.read_text(encoding="utf-8").strip()
    except OSError:
        return CheckResult(
            "driver",
            Severity.FATAL,
            f"amdgpu kernel driver not loaded ({initstate} missing)",
            "install the ROCm driver (amdgpu-dkms) and load it (`modprobe amdgpu`), "
            "then check `amd-smi list`",
        )
    if state != "live":
        return CheckResult(
            "driver", Severity.FATAL, f"amdgpu kernel driver is {state!r}, not live",
            "check `dmesg | grep amdgpu` for the firmware or init error, then reload the module",
        )  # fmt: skip
    return CheckResult("driver", Severity.OK, "amdgpu kernel driver loaded")


def check_amdsmi(amdsmi_module: Any = None) -> tuple[CheckResult, bool]:
    """amdsmi opens and sees GPUs; the result and whether real GPUs are behind it."""
    try:
        backend = open_backend(GpuConfig(backend="amd"), amdsmi_module=amdsmi_module)
    except NvmlUnavailable as exc:
        return CheckResult("amdsmi", Severity.FATAL, exc.cause, exc.fix), False
    try:
        count = backend.device_count()
        driver, rocm = backend.driver_versions()
    finally:
        backend.close()
    if count == 0:
        return CheckResult("amdsmi", Severity.FATAL, "amdsmi sees no AMD GPU",
                           "check `amd-smi list` and the kernel log"), False  # fmt: skip
    return CheckResult("amdsmi", Severity.OK, f"{count} GPU(s), driver {driver}, ROCm {rocm}"), True


def check_kfd(
    kfd: Path = KFD_DEVICE,
    dri: Path = DRI_DIR,
    access: Callable[[Path, int], bool] = lambda p, m: os.access(p, m),
) -> CheckResult:
    """The agent can open /dev/kfd and the render nodes (amdsmi and leases need both)."""
    fix = (
        "add the agent's user to the render and video groups (install the systemd drop-in "
        "deploy/systemd/gpu-agent-amd.conf) and check the udev rules for /dev/kfd"
    )
    if not kfd.exists():
        return CheckResult("kfd", Severity.FATAL, f"{kfd} missing: no ROCm compute driver", fix)
    wanted = os.R_OK | os.W_OK
    denied = [p for p in (kfd, *sorted(dri.glob("renderD*"))) if not access(p, wanted)]
    if denied:
        names = ", ".join(str(p) for p in denied)
        return CheckResult("kfd", Severity.FATAL, f"permission denied on {names}", fix)
    return CheckResult("kfd", Severity.OK, f"{kfd} and the render nodes are readable and writable")


def check_docker(docker_host: str, timeout: float = 3.0) -> CheckResult:
    try:
        version = docker_version(docker_host, timeout)
    except Exception as exc:  # the docker SDK raises several unrelated types here
        return CheckResult(
            "docker",
            Severity.FATAL,
            f"Docker Engine unreachable at {docker_host}: {exc}",
            "start it (`systemctl start docker`), check runtime.docker_host, and make sure "
            "the agent's user may open the socket",
        )
    return CheckResult("docker", Severity.OK, f"Docker Engine {version} at {docker_host}")


def check_toolkit(
    version: str | None, real_gpus: bool, features: dict[str, Any] | None = None
) -> CheckResult:
    verdict = toolkit.judge(version, features or {})
    if version is None and not real_gpus:
        return CheckResult(
            "container_toolkit",
            Severity.INFO,
            "NVIDIA Container Toolkit not found (not needed without real GPUs)",
        )
    if not verdict.gpu_leases:
        return CheckResult(
            "container_toolkit",
            Severity.FATAL if real_gpus else Severity.WARNING,
            verdict.problem,
            verdict.fix,
        )
    if verdict.warning:
        return CheckResult("container_toolkit", Severity.WARNING, verdict.warning, verdict.fix)
    return CheckResult("container_toolkit", Severity.OK, f"NVIDIA Container Toolkit {version}")


def check_cgroup_v2(marker: Path = CGROUP2_MARKER) -> CheckResult:
    if marker.exists():
        return CheckResult("cgroup_v2", Severity.OK, "unified cgroup hierarchy (v2)")
    return CheckResult(
        "cgroup_v2",
        Severity.WARNING,
        "cgroup v2 not mounted at /sys/fs/cgroup: per-lease CPU and memory metering "
        "is less precise",
        "boot with systemd.unified_cgroup_hierarchy=1 (the default on current distributions)",
    )


def check_disk(state_dir: Path, free: int | None = None) -> CheckResult:
    free = free_bytes_under(state_dir) if free is None else free
    if free is None:
        return CheckResult("disk", Severity.WARNING, f"cannot read free space under {state_dir}")
    gib = free / 1024**3
    fix = f"free space on the filesystem holding {state_dir} or move node.state_dir"
    if free < DISK_FATAL_BYTES:
        return CheckResult(
            "disk", Severity.FATAL, f"only {gib:.2f} GiB free under {state_dir}", fix
        )
    if free < DISK_WARN_BYTES:
        return CheckResult("disk", Severity.WARNING, f"{gib:.1f} GiB free under {state_dir}", fix)
    return CheckResult("disk", Severity.OK, f"{gib:.0f} GiB free under {state_dir}")


def kernel_clock_state() -> int | None:
    """adjtimex(2) with no changes requested: the kernel's clock state, or None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        # struct timex is ~208 bytes; zeroed means modes=0, a read-only query.
        buf = ctypes.create_string_buffer(512)
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    return state if state >= 0 else None


def check_clock(state: Callable[[], int | None] = kernel_clock_state) -> CheckResult:
    value = state()
    if value is None:
        return CheckResult("clock", Severity.INFO, "clock synchronisation state unknown")
    if value == _TIME_ERROR:
        return CheckResult(
            "clock",
            Severity.WARNING,
            "system clock not synchronised: usage records and lease deadlines rely on it",
            "enable NTP (`timedatectl set-ntp true`, or install chrony)",
        )
    return CheckResult("clock", Severity.OK, "system clock synchronised")


def _gpu_checks(config: AgentConfig, nvml_module: Any, amdsmi_module: Any) -> list[CheckResult]:
    if config.gpu.backend == "amd":
        # ROCm needs no container toolkit: leases get /dev/kfd and their render nodes.
        amdsmi_result, _ = check_amdsmi(amdsmi_module)
        return [check_rocm_driver(), amdsmi_result, check_kfd()]
    simulated = config.gpu.backend == "simulated"
    nvml_result, real_gpus = check_nvml(config, nvml_module)
    if config.gpu.backend == "auto" and not real_gpus:
        # auto takes AMD GPUs next (open_backend); check what it would run on.
        amdsmi_result, amd_gpus = check_amdsmi(amdsmi_module)
        if amd_gpus:
            return [check_rocm_driver(), amdsmi_result, check_kfd()]
    driver = check_driver(simulated or (config.gpu.backend == "auto" and not real_gpus))
    return [
        driver,
        nvml_result,
        check_toolkit(toolkit_version(), real_gpus, toolkit.read_features()),
    ]


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as (host, port); None when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def check_coordinator(config: CoordinatorConfig, timeout: float = 5.0) -> CheckResult:
    """Can this host reach the coordinator and complete its TLS handshake?

    TCP first, so "nothing listens" and "TLS refused" get different fixes. Not
    fatal: the daemon starts without its coordinator (degraded) and keeps dialing.
    Several replicas: each is checked; the first that fails is the result.
    """
    if isinstance(config.address, tuple):
        results = [
            check_coordinator(config.model_copy(update={"address": one}), timeout)
            for one in config.address
        ]
        failed = [r for r in results if r.severity is not Severity.OK]
        return failed[0] if failed else results[0]
    target = split_address(config.address)
    if target is None:
        return CheckResult(
            "coordinator",
            Severity.FATAL,
            f"coordinator.address {config.address!r} is not host:port",
            "set coordinator.address, e.g. coordinator.example.net:7443",
        )
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        return CheckResult(
            "coordinator",
            Severity.WARNING,
            f"cannot reach {config.address}: {exc.strerror or exc}",
            "check coordinator.address, that the coordinator runs, and firewalls between",
        )
    if config.insecure:
        channel = grpc.insecure_channel(config.address, options=channel_options(config))
        how = "plaintext (coordinator.insecure: true)"
    else:
        try:
            creds = credentials(config)
        except ChannelConfigError as exc:  # names the key and the file
            return CheckResult(
                "coordinator",
                Severity.FATAL,
                str(exc),
                "make the file readable by the service: root:gpu-agent, mode 0640",
            )
        channel = grpc.secure_channel(config.address, creds, options=channel_options(config))
        how = "TLS, certificate verified" + (
            f" with {config.ca_file}" if config.ca_file else " with the system CAs"
        )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        if config.insecure:
            fix = "the coordinator may expect TLS: set coordinator.insecure: false"
        else:
            fix = (
                "set coordinator.ca_file to the coordinator's CA (for gpu-scheduler: a copy of "
                "/var/lib/gpu-scheduler/tls/ca.pem), and coordinator.server_name if the "
                "certificate names another host"
            )
        return CheckResult(
            "coordinator",
            Severity.WARNING,
            f"{config.address} accepts TCP but no gRPC connection came up within "
            f"{timeout:g}s ({how.split(',')[0]})",
            fix,
        )
    finally:
        channel.close()
    return CheckResult("coordinator", Severity.OK, f"reached {config.address} ({how})")


def run_preflight(
    config: AgentConfig,
    *,
    nvml_module: Any = None,
    amdsmi_module: Any = None,
    log_problems: bool = True,
    coordinator: bool = False,
) -> list[CheckResult]:
    """Every check, in the order an operator would fix them.

    The daemon logs warnings and fatal results (``log_problems``); ``doctor``
    prints them itself instead, and also checks the coordinator (``coordinator``),
    which the daemon's own link reports on as it dials.
    """
    driver, gpu_lib, device_access = _gpu_checks(config, nvml_module, amdsmi_module)
    results = [
        driver,
        gpu_lib,
        check_docker(config.runtime.docker_host),
        device_access,
        *isolation_checks(config),
        check_cgroup_v2(),
        check_disk(config.node.state_dir),
        check_clock(),
    ]
    if coordinator:
        results.append(check_coordinator(config.coordinator))
    for result in results if log_problems else ():
        if result.severity in (Severity.WARNING, Severity.FATAL):
            log.log(
                logging.ERROR if result.severity == Severity.FATAL else logging.WARNING,
                "preflight check: %s",
                result.message,
                extra={"check": result.name, "severity": result.severity.value, "fix": result.fix},
            )
    return results
