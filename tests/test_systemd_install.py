"""The provider install under a real systemd (``make test-systemd``).

A Debian system booted with systemd as PID 1 in the local Docker Engine
(tests/systemd_host.py), the host's Docker socket and a wheelhouse mounted, no
network. As a provider would: ``install.sh --with-scheduler`` from a clean copy
of the checkout, then simulated GPUs, then the checks below, in order; each test
continues from the state the previous one left.

The first install is left on ``gpu.backend: nvml``, which cannot work here: that
is the fatal preflight error the test provokes (exit 2, not retried, at error
priority in the journal), and the proof that a failed agent start no longer
stops the scheduler from being installed and started.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import systemd_host as sh
from tests.conftest import IN_CI
from tests.images import BUSYBOX_IMAGE

pytestmark = [pytest.mark.systemd, pytest.mark.docker, pytest.mark.timeout(900)]

VENV_BIN = "/opt/gpu-agent/venv/bin"
AGENT = "gpu-agent.service"
SCHEDULER = "gpu-scheduler.service"
BUYER = "systemd-test-buyer"
INSTALL = (
    "/root/gpu-agent/deploy/systemd/install.sh --with-scheduler"
    " --pip-arg=--no-index --pip-arg=--find-links=/srv/wheels"
)
# Production watches for 30 s; the mechanism is the same at 8 s and the test
# spends a minute less waiting for it.
WATCHDOG_SEC = 8


@dataclass
class Provider:
    system: sh.BootedSystem
    first_install: sh.Result
    before_install: set[str]
    node_id: str = ""
    lease_id: str = ""
    lease_network: bool = False


ADMIN_TOKEN = "/root/.config/gpu-scheduler/token"  # the CLI's default token file
ENROLLMENT_TOKEN = "/etc/gpu-agent/enrollment.token"
PROVIDER_ACCOUNT = "acme-gpus"


def scheduler_cli(system: sh.BootedSystem, *args: str, check: bool = True) -> sh.Result:
    """The scheduler's CLI as an operator on the host runs it (root, its config, the
    generated CA it finds beside the database, the admin token from its default file
    once `acl bootstrap` wrote it there)."""
    command = [f"{VENV_BIN}/gpu-scheduler", "-c", "/etc/gpu-scheduler/config.yaml", *args]
    return system.sh("HOME=/root " + shlex.join(command), check=check)


def scheduler_json(system: sh.BootedSystem, *args: str) -> object:
    return json.loads(scheduler_cli(system, *args, "--json").stdout)


# Deep-merges a YAML patch into a config file, with the venv's PyYAML (the
# system's own python3 has none).
EDIT_CONFIG = """
import sys, yaml
path, patch = sys.argv[1], yaml.safe_load(sys.argv[2])
with open(path) as f:
    config = yaml.safe_load(f) or {}
def merge(into, new):
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
merge(config, patch)
with open(path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
"""


def edit_config(system: sh.BootedSystem, path: str, patch: dict[str, object]) -> None:
    system.sh(shlex.join([f"{VENV_BIN}/python", "-c", EDIT_CONFIG, path, json.dumps(patch)]))


def filesystem(system: sh.BootedSystem) -> set[str]:
    """Every path a provider's install could leave behind (not the volatile ones)."""
    script = (
        "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp"
        " -o -path /var/log/journal -o -path /var/cache -o -path /root/gpu-agent"
        " -o -path /srv -o -path /var/lib/systemd \\) -prune -o -print"
    )
    return set(system.sh(script).stdout.splitlines())


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    try:
        sh.run(["docker", "version"])
        dist = sh.distribution()
        image = sh.ensure_image(dist)
        wheelhouse = sh.ensure_wheelhouse(image)
        sh.run(["docker", "image", "inspect", BUSYBOX_IMAGE])
    except (sh.Unavailable, RuntimeError) as exc:
        if IN_CI:
            pytest.fail(f"systemd test cannot run: {exc} (CI=true: it must)")
        pytest.skip(f"systemd test cannot run here: {exc}")
    source = sh.source_tarball(tmp_path_factory.mktemp("src") / "gpu-agent.tar")
    with sh.booted(image, wheelhouse, source) as system:
        sock_gid = Path("/var/run/docker.sock").stat().st_gid
        # What a provider has before installing: Docker (its group, owning the socket).
        system.sh(
            f"groupadd --system -g {sock_gid} docker"
            " && mkdir /root/gpu-agent && tar -C /root/gpu-agent -xf /srv/gpu-agent.tar"
        )
        before = filesystem(system)
        sh.log("install.sh --with-scheduler (first install)")
        first = system.sh(INSTALL, check=False, timeout=600)
        state = Provider(system, first, before)
        try:
            yield state
        finally:
            if state.node_id:
                sh.remove_lease_containers(state.node_id)


def test_first_install_starts_the_scheduler_even_when_the_agent_cannot_start(
    provider: Provider,
) -> None:
    """On a fresh host the scheduler is started first and its CA copied for the agent
    (root:gpu-agent 0640); the agent, still on NVML here, fails its preflight, and
    the installer says so with exit 1 instead of aborting before the scheduler."""
    system, first = provider.system, provider.first_install
    assert first.rc == 1, first
    assert "gpu-agent.service did not start" in first.stderr, first
    assert "started gpu-scheduler.service" in first.stdout, first
    assert first.stdout.index("started gpu-scheduler.service") < first.stdout.index(
        "installed /etc/gpu-agent/coordinator-ca.pem"
    ), first
    assert system.show(SCHEDULER, "ActiveState")["ActiveState"] == "active"
    ca = system.sh("stat -c '%U:%G %a' /etc/gpu-agent/coordinator-ca.pem").stdout.split()
    assert ca == ["root:gpu-agent", "640"]
    system.sh("cmp /etc/gpu-agent/coordinator-ca.pem /var/lib/gpu-scheduler/tls/ca.pem")
    config = system.sh("cat /etc/gpu-agent/config.yaml").stdout
    assert "ca_file: /etc/gpu-agent/coordinator-ca.pem" in config


def test_fatal_preflight_error_is_not_retried_and_is_an_error_in_the_journal(
    provider: Provider,
) -> None:
    """Exit 2 (a fatal preflight error) fails the unit at once (RestartPreventExitStatus=2)
    and `journalctl -p err` finds the agent's own message."""
    system = provider.system
    props = system.show(AGENT, "ActiveState", "Result", "NRestarts", "ExecMainStatus")
    assert props["ActiveState"] == "failed", props
    assert props["ExecMainStatus"] == "2", props
    assert props["NRestarts"] == "0", props
    errors = system.journal(AGENT, "-p", "err")
    assert "error: " in errors and "nvml" in errors.lower(), errors


def test_configured_for_simulated_gpus_both_units_reach_ready(provider: Provider) -> None:
    """After the provider's edits (simulated GPUs; the scheduler told to accept them
    for a trial) both Type=notify units are active, which systemd only reports
    after READY=1, and the agent's status line says it is connected."""
    system = provider.system
    scratch = str(system.scratch)
    edit_config(
        system,
        "/etc/gpu-agent/config.yaml",
        {
            "node": {"name": "provider", "price_micros_per_gpu_hour": 1_500_000},
            "gpu": {"backend": "simulated", "simulated": {"profile": "rtx-4090", "count": 2}},
            "metering": {"sample_interval": "1s", "record_interval": "5s"},
            "runtime": {"scratch_dir": scratch},
            # The test system has a network namespace of its own (--network none):
            # rules the agent installed there would not reach the Docker host's lease
            # bridges. The policy itself is tested on the host (test_isolation_docker).
            "isolation": {"egress_policy": False, "self_test": False},
            # Written below by `nodes enroll`, as deploy/systemd/README.md tells providers.
            "coordinator": {"enrollment_token_file": ENROLLMENT_TOKEN},
        },
    )
    edit_config(
        system, "/etc/gpu-scheduler/config.yaml", {"attestation": {"accept_simulated": True}}
    )
    # The scratch dir is outside the agent's only writable place: allowed in a drop-in,
    # as deploy/systemd/README.md tells providers.
    system.sh(
        f"chown gpu-agent:gpu-agent {scratch} && chmod 0700 {scratch}"
        " && mkdir -p /etc/systemd/system/gpu-agent.service.d"
        " && printf '[Service]\\nReadWritePaths=%s\\nWatchdogSec=%ss\\n' "
        f"{scratch} {WATCHDOG_SEC} > /etc/systemd/system/gpu-agent.service.d/test.conf"
        " && systemctl daemon-reload && systemctl restart gpu-scheduler",
        timeout=180,
    )
    # The provider's first steps with the ACL: the admin token (on the database file,
    # as root: the files must stay the scheduler's), a provider account, and an
    # enrolment token for the agent, readable by its group only.
    scheduler_cli(system, "acl", "bootstrap", "--token-file", ADMIN_TOKEN)
    assert system.sh("stat -c %U /var/lib/gpu-scheduler/scheduler.db").stdout.strip() == (
        "gpu-scheduler"
    )
    scheduler_cli(system, "accounts", "create", PROVIDER_ACCOUNT, "--role", "provider")
    enrolled = scheduler_cli(system, "nodes", "enroll", "--account", PROVIDER_ACCOUNT)
    system.sh(
        f"umask 077 && printf '%s\\n' {shlex.quote(enrolled.stdout.strip())} > {ENROLLMENT_TOKEN}"
        f" && chown root:gpu-agent {ENROLLMENT_TOKEN} && chmod 0640 {ENROLLMENT_TOKEN}"
        " && systemctl reset-failed gpu-agent && systemctl start gpu-agent",
        timeout=180,
    )
    for unit in (SCHEDULER, AGENT):
        props = system.show(unit, "ActiveState", "SubState", "StatusText")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), (unit, props)
    status = system.show(AGENT, "StatusText")["StatusText"]
    assert "degraded" not in status, status
    nodes = scheduler_json(system, "nodes")
    assert isinstance(nodes, list) and len(nodes) == 1, nodes
    assert nodes[0].get("owner") == PROVIDER_ACCOUNT, nodes
    provider.node_id = str(nodes[0]["nodeId"])


def test_doctor_as_the_service_user_reaches_the_coordinator(provider: Provider) -> None:
    """`gpu-agent doctor` with the service's identity (as the README has providers run
    it) verifies the scheduler's TLS with the copied CA, and finds no fatal problem."""
    doctor = provider.system.sh(
        f"runuser -u gpu-agent -- {VENV_BIN}/gpu-agent --config /etc/gpu-agent/config.yaml"
        " doctor --json",
        check=False,
    )
    results = {r["name"]: r for r in json.loads(doctor.stdout)}
    assert results["coordinator"]["severity"] == "ok", results["coordinator"]
    assert "certificate verified" in results["coordinator"]["message"]
    # The unit's privileged pre-start (`gpu-agent scratch-mount`) made the scratch root
    # a nosuid,nodev mount although the agent itself cannot mount (measured mode).
    scratch = provider.system.scratch
    options = provider.system.sh(f"findmnt -n -o OPTIONS --mountpoint {scratch}").stdout
    pre_start = provider.system.sh(
        "journalctl --no-pager -o cat -u gpu-agent | grep -i -e scratch -e ExecStartPre | tail -20",
        check=False,
    ).stdout
    assert {"nosuid", "nodev"} <= set(options.strip().split(",")), f"{options}\n{pre_start}"
    assert results["scratch"]["severity"] == "info", results["scratch"]
    assert f"{scratch} is mounted nosuid,nodev" in results["scratch"]["message"]
    assert doctor.rc == 0, doctor


def _lease_state(provider: Provider) -> str:
    lease = scheduler_json(provider.system, "lease", "show", provider.lease_id)
    assert isinstance(lease, dict)
    return str(lease.get("state", ""))


def test_a_lease_from_the_scheduler_cli_runs(provider: Provider) -> None:
    """A lease submitted with the CLI is placed on the node (attested on its simulated
    GPUs) and its container runs in the host's Docker with a scratch dir that is
    the same path on both sides."""
    system = provider.system
    scheduler_cli(system, "deposit", BUYER, "100")
    lease = scheduler_json(
        system,
        "submit",
        "--image", BUSYBOX_IMAGE,
        "--gpus", "1",
        "--cmd", "sh -c 'until [ -e /scratch/finish ]; do sleep 0.2; done; echo finished'",
        "--buyer", BUYER,
        "--price-max", "2000000",
        "--max-duration", "10m",
    )  # fmt: skip
    assert isinstance(lease, dict)
    provider.lease_id = str(lease["leaseId"])
    try:
        sh.wait_until(
            "the lease to run", lambda: _lease_state(provider) == "LEASE_STATE_RUNNING", 120
        )
    except AssertionError:
        shown = scheduler_cli(system, "lease", "show", provider.lease_id, check=False).stdout
        journal = system.journal(AGENT)[-3000:]
        raise AssertionError(f"lease did not run:\n{shown}\n{journal}") from None
    container = _container(provider)
    assert container is not None
    # A per-lease network (io.gpuagent.lease-id on the network) makes the lease's
    # bytes measurable through its bridge; the default bridge leaves them unknown.
    inspected = json.loads(sh.run(["docker", "inspect", container]))[0]
    named = ((inspected.get("Config") or {}).get("Labels") or {}).get("io.gpuagent.network")
    networks = inspected["NetworkSettings"]
    for endpoint in (networks.get("Networks") or {}).values():
        info = json.loads(sh.run(["docker", "network", "inspect", endpoint["NetworkID"]]))[0]
        labels = info.get("Labels") or {}
        # Its own network: labelled with the lease, or the spare the container names.
        if labels.get("io.gpuagent.lease-id") == provider.lease_id or info.get("Name") == named:
            provider.lease_network = True


def _container(provider: Provider) -> str | None:
    ids = sh.run(
        ["docker", "ps", "-q", "--filter", f"label=io.gpuagent.lease-id={provider.lease_id}"]
    ).split()
    return ids[0] if ids else None


def test_watchdog_keeps_the_agent_up_and_restarts_it_when_frozen(provider: Provider) -> None:
    """Pings from the event loop keep the agent running across watchdog periods; a
    frozen agent (SIGSTOP) is killed with SIGABRT, leaves a Python traceback in the
    journal (faulthandler), and is started again."""
    system = provider.system
    before = system.show(AGENT, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == f"{WATCHDOG_SEC}s", before
    # Not synchronisation: the claim is about a stretch of time, two full watchdog
    # periods, which the agent must survive without a restart.
    system.sh(f"sleep {2 * WATCHDOG_SEC + 1}", timeout=60)
    alive = system.show(AGENT, "MainPID", "NRestarts")
    assert alive == {"MainPID": before["MainPID"], "NRestarts": before["NRestarts"]}
    system.sh(f"kill -STOP {before['MainPID']}")
    sh.wait_until(
        "the frozen agent to be restarted",
        lambda: (
            system.show(AGENT, "NRestarts", "ActiveState")
            == {"NRestarts": str(int(before["NRestarts"]) + 1), "ActiveState": "active"}
        ),
        WATCHDOG_SEC * 3 + 60,
    )
    journal = system.journal(AGENT, "-b")
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert "Fatal Python error: Aborted" in journal, journal[-3000:]
    assert 'File "' in journal.split("Fatal Python error: Aborted", 1)[1], journal[-3000:]
    assert _lease_state(provider) == "LEASE_STATE_RUNNING"


def test_stop_flushes_usage_and_leaves_the_lease_running(provider: Provider) -> None:
    """`systemctl stop` delivers the pending usage before exiting and does not touch
    the lease's container (it belongs to Docker)."""
    system = provider.system
    container = _container(provider)
    assert container is not None
    system.sh("systemctl stop gpu-agent", timeout=120)
    props = system.show(AGENT, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, props
    journal = system.journal(AGENT, "-b")
    assert "usage flushed" in journal.rsplit("Stopping", 1)[-1], journal[-3000:]
    assert sh.container_running(container)


def test_restart_re_adopts_the_running_lease(provider: Provider) -> None:
    """Started again, the agent re-adopts the container by its labels."""
    system = provider.system
    container = _container(provider)
    system.sh("systemctl start gpu-agent", timeout=180)
    sh.wait_until(
        "the lease to be re-adopted",
        lambda: "lease re-adopted" in system.journal(AGENT, "-b").rsplit("Starting", 1)[-1],
        60,
    )
    assert _container(provider) == container
    assert _lease_state(provider) == "LEASE_STATE_RUNNING"


def test_lease_succeeds_with_usage_metered(provider: Provider) -> None:
    """The lease ends on its own (exit 0) and the scheduler has its usage: GPU time,
    CPU time, and network bytes either measured or flagged unknown, never a silent 0."""
    system = provider.system
    container = _container(provider)
    assert container is not None
    scratch = sh.run(
        [
            "docker", "inspect", "-f",
            "{{range .Mounts}}{{if eq .Destination \"/scratch\"}}{{.Source}}{{end}}{{end}}",
            container,
        ]
    ).strip()  # fmt: skip
    assert scratch.startswith(str(system.scratch)), scratch
    Path(scratch, "finish").touch()
    sh.wait_until(
        "the lease to succeed", lambda: _lease_state(provider) == "LEASE_STATE_SUCCEEDED", 120
    )

    def final_usage() -> dict[str, object] | None:
        usage = scheduler_json(system, "usage", "--lease", provider.lease_id)
        assert isinstance(usage, dict)
        leases = usage.get("leases", [])
        return leases[0] if leases and leases[0].get("final_seen") else None

    sh.wait_until("the final usage record", final_usage, 60)
    usage = final_usage()
    assert usage is not None
    assert int(str(usage["gpu_ns"])) > 0, usage
    assert int(str(usage.get("cpu_usec", 0))) > 0, usage
    network_known = int(str(usage.get("net_rx_bytes", 0))) > 0
    network_unknown = bool(int(str(usage.get("unmeasured", 0))) & 32)
    assert network_known or network_unknown, usage
    if provider.lease_network:
        # Its bridge is readable under the sandbox: measured (perhaps 0 for a lease
        # that sent nothing), never unknown.
        assert not network_unknown, usage
    sh.log(f"lease network bytes: {'measured' if network_known else 'unknown'} ({usage})")


@pytest.mark.parametrize("unit", [AGENT, SCHEDULER])
def test_exposure_online_is_at_most_2_5(provider: Provider, unit: str) -> None:
    """`systemd-analyze security` on the running units (online: what systemd
    actually applied) scores at most 2.5."""
    out = provider.system.sh(f"systemd-analyze security --no-pager {unit}").stdout
    assert sh.exposure(out, unit) <= 2.5, out[-3000:]


def test_uninstall_and_purge_leave_nothing_behind(provider: Provider) -> None:
    """--uninstall --purge removes units, drop-ins, venv, config, state and users:
    the file system is as it was before the first install."""
    system = provider.system
    run = system.sh(INSTALL.split(" --", 1)[0] + " --uninstall --purge", timeout=120)
    assert "removed /etc/systemd/system/gpu-agent.service.d" in run.stdout, run
    for unit in (AGENT, SCHEDULER):
        assert system.show(unit, "LoadState")["LoadState"] == "not-found"
    for name in ("gpu-agent", "gpu-scheduler"):
        assert system.sh(f"getent passwd {name} || getent group {name}", check=False).rc != 0
    # The admin token in root's home is the operator's credential, not the install's:
    # the operator deletes it (it is useless without the purged database anyway).
    system.sh("rm -r /root/.config/gpu-scheduler && rmdir --ignore-fail-on-non-empty /root/.config")
    left = filesystem(system) - provider.before_install
    assert not left, "\n".join(sorted(left))
