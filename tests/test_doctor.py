"""Preflight checks: each problem has a severity and a fix; fatal ones stop the daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import grpc
import pynvml
import pytest
import trustme

from agent.config import AgentConfig, CoordinatorConfig
from agent.doctor import (
    Severity,
    check_clock,
    check_coordinator,
    check_disk,
    check_driver,
    check_nvml,
    check_toolkit,
    fatal_results,
    run_preflight,
)
from agent.gpu.fakenvml import FakeNvml
from agent.isolation.host_checks import (
    check_engine_isolation,
    check_firewall_tools,
    check_ipv6_filter,
    check_scratch,
    check_userland_proxy,
    check_userns,
    check_writable_layer,
    has_net_admin,
)
from agent.isolation.toolkit import judge, read_features
from agent.leases import scratch


def test_vulnerable_toolkit_is_fatal_with_real_gpus() -> None:
    """Toolkit below 1.17.8 (CVE-2025-23266 "NVIDIAScape", CVE-2025-23267) is fatal on a
    GPU host, with the upgrade as the fix; 1.17.8 and later pass."""
    for old in ("1.16.2", "1.17.3", "1.17.7"):
        bad = check_toolkit(old, real_gpus=True)
        assert bad.severity == Severity.FATAL and "CVE-2025-23266" in bad.message, old
        assert bad.fix is not None and "1.17.8" in bad.fix
    assert "CVE-2025-23359" in check_toolkit("1.17.3", real_gpus=True).message
    assert check_toolkit("1.17.8", real_gpus=True).severity == Severity.OK
    assert check_toolkit("1.18.0", real_gpus=True).severity == Severity.OK


def test_toolkit_workaround_is_honoured_only_from_1_17_4() -> None:
    """features.disable-cuda-compat-lib-hook (NVIDIA's workaround) lets 1.17.4-1.17.7 run
    GPU leases with a warning; below 1.17.4 it does not help, and the fix names it."""
    workaround = {"disable-cuda-compat-lib-hook": True}
    assert check_toolkit("1.17.7", real_gpus=True, features=workaround).severity == (
        Severity.WARNING
    )
    assert check_toolkit("1.17.3", real_gpus=True, features=workaround).severity == (Severity.FATAL)
    fix = check_toolkit("1.17.5", real_gpus=True).fix
    assert fix is not None and "disable-cuda-compat-lib-hook" in fix


def test_toolkit_features_that_reopen_the_escapes_are_problems() -> None:
    """allow-ldconfig-from-container / allow-cuda-compat-libs-from-container on is fatal
    with real GPUs, whatever the version; the fix says which key to remove."""
    for key in ("allow-ldconfig-from-container", "allow-cuda-compat-libs-from-container"):
        result = check_toolkit("1.18.0", real_gpus=True, features={key: True})
        assert result.severity == Severity.FATAL and key in result.message
        assert result.fix is not None and key in result.fix
    assert judge("1.18.0", {"allow-ldconfig-from-container": False}).gpu_leases


def test_features_are_read_from_the_toolkit_config(tmp_path: Path) -> None:
    """The [features] table of config.toml is read; a missing or broken file is empty."""
    config = tmp_path / "config.toml"
    config.write_text("[features]\ndisable-cuda-compat-lib-hook = true\n")
    assert read_features(config) == {"disable-cuda-compat-lib-hook": True}
    config.write_text("[features\n")
    assert read_features(config) == {}
    assert read_features(tmp_path / "absent.toml") == {}


def test_engine_versions_with_isolation_bugs_are_flagged() -> None:
    """Docker < 28.3.3 (firewall rules lost on reload) and < 28.5.2 (runc escapes) warn."""
    old = check_engine_isolation("20.10.24+dfsg1")
    assert old.severity == Severity.WARNING and "28.3.3" in old.message
    runc = check_engine_isolation("28.4.0")
    assert runc.severity == Severity.WARNING and "CVE-2025-31133" in runc.message
    assert check_engine_isolation("28.5.2").severity == Severity.OK


def test_isolation_host_checks_say_what_to_fix(tmp_path: Path) -> None:
    """Missing iptables is fatal with the policy on; IPv6 without ip6tables, the userland
    proxy off, userns-remap off are reported; userns-remap on is ok."""
    assert check_firewall_tools(True, which=lambda _: None).severity == Severity.FATAL
    ok = check_firewall_tools(True, which=lambda t: t, net_admin=lambda: True)
    assert ok.severity == Severity.OK
    no_cap = check_firewall_tools(True, which=lambda t: t, net_admin=lambda: False)
    assert no_cap.severity == Severity.WARNING and "CAP_NET_ADMIN" in no_cap.message
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_net_admin(status)
    status.write_text("CapEff:\t0000000000000000\n")
    assert not has_net_admin(status)
    assert check_firewall_tools(False).severity == Severity.WARNING
    if_inet6 = tmp_path / "if_inet6"
    if_inet6.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    assert check_ipv6_filter(lambda _: None, if_inet6).severity == Severity.WARNING
    assert check_ipv6_filter(lambda t: t, if_inet6).severity == Severity.OK
    if_inet6.write_text("")
    assert check_ipv6_filter(lambda _: None, if_inet6).severity == Severity.OK
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text('{"userland-proxy": false}')
    assert check_userland_proxy(daemon_json).severity == Severity.WARNING
    assert check_userland_proxy(tmp_path / "absent.json").severity == Severity.OK
    assert check_userns(["name=seccomp,profile=default"]).fix is not None
    assert check_userns(["name=userns"]).severity == Severity.OK


def test_missing_toolkit_fatal_only_with_real_gpus() -> None:
    """No toolkit is fatal with real GPUs and informational with simulated ones."""
    assert check_toolkit(None, real_gpus=True).severity == Severity.FATAL
    assert check_toolkit(None, real_gpus=False).severity == Severity.INFO


def test_driver_missing_is_fatal_unless_simulated(tmp_path: Path) -> None:
    """A missing /proc/driver/nvidia/version is fatal with NVML, informational when simulated."""
    missing = tmp_path / "version"
    assert check_driver(False, missing).severity == Severity.FATAL
    assert check_driver(True, missing).severity == Severity.INFO
    missing.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07\n")
    ok = check_driver(False, missing)
    assert ok.severity == Severity.OK and "550.90.07" in ok.message


def test_nvml_check_maps_init_failure_to_fix() -> None:
    """NVML that fails to load is fatal for backend nvml, a warning for auto."""
    broken = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    result, real = check_nvml(AgentConfig.model_validate({"gpu": {"backend": "nvml"}}), broken)
    assert result.severity == Severity.FATAL and not real
    assert result.fix is not None and "modprobe" in result.fix
    result, _ = check_nvml(AgentConfig.model_validate({"gpu": {"backend": "auto"}}), broken)
    assert result.severity == Severity.WARNING


def test_nvml_check_counts_gpus() -> None:
    """Working NVML reports the GPU count and driver."""
    result, real = check_nvml(AgentConfig(), FakeNvml(["rtx-4090"] * 2))
    assert result.severity == Severity.OK and real
    assert "2 GPU(s)" in result.message and "550.90.07" in result.message


def test_disk_thresholds(tmp_path: Path) -> None:
    """Under 1 GiB free is fatal, under 10 GiB a warning."""
    assert check_disk(tmp_path, free=512 * 1024**2).severity == Severity.FATAL
    assert check_disk(tmp_path, free=5 * 1024**3).severity == Severity.WARNING
    assert check_disk(tmp_path, free=50 * 1024**3).severity == Severity.OK


def test_unsynchronised_clock_warns_with_fix() -> None:
    """adjtimex TIME_ERROR is a warning that says how to enable NTP."""
    result = check_clock(lambda: 5)
    assert result.severity == Severity.WARNING and result.fix and "NTP" in result.fix
    assert check_clock(lambda: 0).severity == Severity.OK


def test_preflight_simulated_has_no_gpu_fatals(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """With simulated GPUs and a reachable Docker, nothing is fatal."""
    config = AgentConfig.model_validate(
        {"node": {"state_dir": str(tmp_path)}, "gpu": {"backend": "simulated"}}
    )
    results = run_preflight(config)
    by_name = {r.name: r for r in results}
    assert by_name["docker"].severity == Severity.OK
    assert by_name["nvml"].severity == Severity.INFO
    assert fatal_results(results) == []


def test_preflight_unreachable_docker_is_fatal(tmp_path: Path) -> None:
    """An unreachable Docker Engine is fatal, with how to fix it."""
    config = AgentConfig.model_validate(
        {
            "node": {"state_dir": str(tmp_path)},
            "gpu": {"backend": "simulated"},
            "runtime": {"docker_host": "unix:///nonexistent/docker.sock"},
        }
    )
    fatal = fatal_results(run_preflight(config))
    assert [r.name for r in fatal] == ["docker"]
    assert fatal[0].fix is not None and "systemctl start docker" in fatal[0].fix


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real gRPC server with a certificate for localhost from a test CA; (port, CA file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield port, ca_file
    finally:
        server.stop(None)


def _coordinator(address: str, **kwargs: object) -> CoordinatorConfig:
    return CoordinatorConfig.model_validate({"address": address, **kwargs})


def test_coordinator_reached_over_verified_tls(tls_server: tuple[int, Path]) -> None:
    """With the coordinator's CA the handshake completes and doctor says so."""
    port, ca_file = tls_server
    result = check_coordinator(_coordinator(f"localhost:{port}", ca_file=str(ca_file)))
    assert result.severity == Severity.OK, result
    assert "certificate verified" in result.message


def test_coordinator_with_the_wrong_ca_is_a_tls_problem(
    tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    """TCP connects but the certificate does not verify: the fix points at ca_file."""
    port, _ = tls_server
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    config = _coordinator(f"localhost:{port}", ca_file=str(other))
    result = check_coordinator(config, timeout=2)
    assert result.severity == Severity.WARNING, result
    assert "accepts TCP" in result.message
    assert result.fix is not None and "ca_file" in result.fix


def test_unreachable_coordinator_and_unreadable_ca(tmp_path: Path) -> None:
    """Nothing listening is a reachability warning; a CA the agent cannot read is fatal
    with the ownership the service needs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = check_coordinator(_coordinator(f"127.0.0.1:{port}"), timeout=2)
    assert result.severity == Severity.WARNING and "cannot reach" in result.message, result
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = _coordinator(f"127.0.0.1:{port}", ca_file=str(tmp_path / "missing.pem"))
        result = check_coordinator(config, timeout=2)
    assert result.severity == Severity.FATAL, result
    assert "coordinator.ca_file" in result.message
    assert result.fix is not None and "0640" in result.fix


def test_doctor_cli_includes_the_coordinator(tmp_path: Path) -> None:
    """`gpu-agent doctor` lists the coordinator check (the README promises it)."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "gpu:\n  backend: simulated\nnode:\n  state_dir: " + str(tmp_path) + "\n"
        "coordinator:\n  address: 127.0.0.1:1\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "doctor", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    names = [r["name"] for r in json.loads(proc.stdout)]
    assert "coordinator" in names, proc.stderr


def test_scratch_and_writable_layer_modes_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """doctor says which scratch mode the host gets (measured when it cannot mount, fatal
    when loop is demanded there), whether measured scratch sits on a nosuid,nodev mount
    (a warning naming `gpu-agent scratch-mount` when not), and whether the writable
    layer can be bounded."""
    monkeypatch.setattr(scratch, "loop_supported", lambda: "the agent is not root")
    plain = check_scratch("auto", tmp_path)
    assert plain.severity == Severity.WARNING
    assert "measured" in plain.message and "is not mounted nosuid,nodev" in plain.message
    assert "gpu-agent scratch-mount" in plain.fix
    if os.geteuid() == 0:  # the real mount `gpu-agent scratch-mount` makes
        root = tmp_path / "scratch"
        assert scratch.mount_root_nosuid(root)
        try:
            mounted = check_scratch("auto", root)
        finally:
            subprocess.run(["umount", "-l", str(root)], check=True)
        assert mounted.severity == Severity.INFO, mounted
        assert "is mounted nosuid,nodev" in mounted.message
    assert check_scratch("loop", tmp_path).severity == Severity.FATAL
    monkeypatch.setattr(scratch, "loop_supported", lambda: None)
    assert check_scratch("auto", tmp_path).severity == Severity.OK
    assert "loop" in check_scratch("auto", tmp_path).message
    xfs = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "xfs"]]}
    assert check_writable_layer(xfs, 10**9).severity == Severity.OK
    ext4 = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"]]}
    assert check_writable_layer(ext4, 10**9).severity == Severity.WARNING
    assert check_writable_layer(ext4, None).severity == Severity.INFO
