"""Redundant runs end to end: a real `gpu-scheduler serve`, three real `gpu-agent run`
processes of three provider accounts, each on its own host name (its own UTS namespace),
real Docker. One of them is tests/cheat_agent.py: the real agent with its packer
altering the outputs before signing. `verify: {replicas: 3}` then pays the two honest
nodes, flags and slashes the cheat; `replicas: 2` with the cheat among the first two
places the tie-break on the third provider and decides by it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from agent.config import IsolationConfig
from agent.identity import load_or_create
from agent.leases.leftovers import remove_node_leftovers
from benchmarks import schedauth
from benchmarks.agent_stack import BIN, IMAGE, ensure_image, free_port, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(420)]

PROVIDERS = ("acme", "globex", "initech")  # initech runs the cheating agent
BUYER = "buyer"
SCRIPT = "mkdir -p /scratch/out && printf 'answer=42\\n' > /scratch/out/result.txt"


@dataclass
class AgentProc:
    provider: str
    workdir: Path
    config: Path
    isolation: IsolationConfig
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""


@dataclass
class Fleet:
    workdir: Path
    sched_cfg: Path
    tokens: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agents: list[AgentProc] = field(default_factory=list)

    def cli(self, account: str, *argv: str, check: bool = True) -> str:
        env = {**os.environ, "GPU_SCHEDULER_TOKEN": self.tokens[account]}
        done = subprocess.run(
            [str(BIN / "gpu-scheduler"), "-c", str(self.sched_cfg), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def show(self, lease_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(self.cli(BUYER, "lease", "show", lease_id, "--json"))
        return shown

    def submit(self, name: str, replicas: int) -> str:
        lease = self.workdir / f"{name}.yaml"
        lease.write_text(
            yaml.safe_dump(
                {
                    "image": IMAGE,
                    "command": ["sh", "-c", SCRIPT],
                    "gpus": 1,
                    "cpus": 0.1,
                    "memory": "32MiB",
                    "max_duration": "10m",
                    "outputs": ["out"],
                    "output_retention": "1h",
                    "verify": {"replicas": replicas},
                }
            )
        )
        out = self.cli(BUYER, "submit", str(lease), "--json")
        lease_id: str = json.loads(out)["leaseId"]
        return lease_id


def _scheduler_config(workdir: Path, port: int, relay_port: int) -> Path:
    path = workdir / "scheduler.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "log": {"level": "info", "format": "text"},
                "server": {"listen": f"127.0.0.1:{port}"},
                "database": {"path": str(workdir / "scheduler" / "scheduler.db")},
                "metrics": {"listen": None},
                "relay": {"listen": f"127.0.0.1:{relay_port}", "insecure_http": True},
                "attestation": {"enabled": False, "required": False},
                "placement": {"retry_interval": 0.2},
                "ledger": {"escrow": True, "slash_verify_micros": 5_000_000},
                "auth": {"registration": "token"},
            }
        )
    )
    return path


def _start_agent(fleet: Fleet, provider: str, grpc_port: int, cheat: bool) -> AgentProc:
    workdir = fleet.workdir / f"agent-{provider}"
    (workdir / "state").mkdir(parents=True, mode=0o700)
    enrol = fleet.cli(provider, "nodes", "enroll").strip()
    tag = uuid.uuid4().hex[:5]
    isolation = IsolationConfig(firewall_chain=f"GAV{tag.upper()}", bridge_prefix=f"v{tag}-")
    config = workdir / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "log": {"level": "info", "format": "text"},
                "node": {"name": f"node-of-{provider}", "state_dir": str(workdir / "state")},
                "coordinator": {
                    "address": f"127.0.0.1:{grpc_port}",
                    "ca_file": str(fleet.workdir / "scheduler" / "tls" / "ca.pem"),
                    "enrollment_token": enrol,
                },
                "gpu": {"backend": "simulated", "simulated": {"profile": "h100-sxm-80gb"}},
                "status": {"listen": f"127.0.0.1:{free_port()}"},
                "isolation": isolation.model_dump(mode="json"),
            }
        )
    )
    program = [sys.executable, "-m", "tests.cheat_agent"] if cheat else [str(BIN / "gpu-agent")]
    # Its own UTS namespace: a host name of its own, as three machines would have
    # (replicas never share a host); network, Docker and loopback stay shared.
    argv = [
        "unshare",
        "--uts",
        "sh",
        "-c",
        f'hostname "host-{provider}" && exec "$@"',
        "sh",
        *program,
        "-c",
        str(config),
        "run",
    ]
    with (workdir / "agent.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    return AgentProc(provider, workdir, config, isolation, proc)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ensure_image()
    with tempfile.TemporaryDirectory(prefix="verify-e2e-") as tmp:
        workdir = Path(tmp)
        port, relay_port = free_port(), free_port()
        sched_cfg = _scheduler_config(workdir, port, relay_port)
        fleet = Fleet(workdir, sched_cfg)
        fleet.tokens["admin"] = schedauth.bootstrap_admin(sched_cfg, workdir / "admin.token")
        with (workdir / "scheduler.log").open("ab") as log:
            fleet.procs.append(
                subprocess.Popen(
                    [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), "serve"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        try:
            wait_until(
                "for the scheduler's CA", (workdir / "scheduler" / "tls" / "ca.pem").exists, 30
            )
            for name, role in ((BUYER, "buyer"), *((p, "provider") for p in PROVIDERS)):
                wait_until(
                    "for the scheduler to answer",
                    lambda: (
                        subprocess.run(
                            [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), "whoami"],
                            env={**os.environ, "GPU_SCHEDULER_TOKEN": fleet.tokens["admin"]},
                            capture_output=True,
                            check=False,
                        ).returncode
                        == 0
                    ),
                    30,
                )
                fleet.cli("admin", "accounts", "create", name, "--role", role)
                fleet.tokens[name] = fleet.cli("admin", "tokens", "create", name).strip()
            fleet.cli("admin", "deposit", BUYER, "1000")
            for provider in PROVIDERS:
                fleet.agents.append(_start_agent(fleet, provider, port, provider == "initech"))

            def all_online() -> bool:
                nodes = json.loads(fleet.cli("admin", "nodes", "list", "--json"))
                online = [n for n in nodes if n.get("connected")]
                return len(online) == len(PROVIDERS)

            wait_until("for the three agents to come online", all_online, 120)
            for node in json.loads(fleet.cli("admin", "nodes", "list", "--json")):
                for agent in fleet.agents:
                    if node.get("name") == f"node-of-{agent.provider}":
                        agent.node_id = node["nodeId"]
                fleet.cli("admin", "stake", node["nodeId"], "100")
            yield fleet
        except BaseException:
            for path in sorted(workdir.glob("**/*.log")):
                print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
            raise
        finally:
            for proc in [*(a.proc for a in fleet.agents if a.proc), *fleet.procs]:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
            client = docker.from_env()
            try:
                for agent in fleet.agents:
                    # The id from the agent's own key, so an agent that never came online
                    # (a failed setup) leaves nothing behind either.
                    agent.node_id = agent.node_id or load_or_create(agent.workdir / "state").node_id
                    if agent.node_id:
                        remove_node_leftovers(
                            client,
                            agent.node_id,
                            agent.workdir / "state" / "scratch",
                            agent.isolation,
                        )
            finally:
                client.close()


def _decided(fleet: Fleet, lease_id: str) -> dict[str, Any]:
    def done() -> bool:
        return fleet.show(lease_id).get("state") in {
            "LEASE_STATE_SUCCEEDED",
            "LEASE_STATE_FAILED",
        }

    wait_until(f"for {lease_id} to be decided", done, 180)
    return fleet.show(lease_id)


def test_three_copies_pay_the_honest_two_and_flag_the_cheat(fleet: Fleet) -> None:
    """One copy per provider and host; the cheat's digest differs, the majority wins:
    the parent succeeds, the honest copies are paid, the cheat's is flagged, its node
    shows the flag and its stake lost slash_verify_micros."""
    cheat = next(a for a in fleet.agents if a.provider == "initech")
    parent_id = fleet.submit("three", 3)
    shown = _decided(fleet, parent_id)
    assert shown["state"] == "LEASE_STATE_SUCCEEDED", shown
    copies = shown["copies"]
    assert len(copies) == 3
    assert sorted(c["provider"] for c in copies) == sorted(PROVIDERS)
    outcome = {c["nodeId"]: c["outcome"] for c in copies}
    assert outcome.pop(cheat.node_id) == "flagged"
    assert sorted(outcome.values()) == ["paid", "paid"]
    digests = {c["nodeId"]: c["digest"] for c in copies}
    honest = {d for n, d in digests.items() if n != cheat.node_id}
    assert len(honest) == 1 and digests[cheat.node_id] not in honest
    node = fleet.cli("admin", "nodes", "show", cheat.node_id)
    assert "flagged:" in node and "slashed 5" in node
    # Each honest copy's signed commitment names its own node (nobody can reuse another's).
    for copy in copies:
        lease = fleet.show(copy["leaseId"])
        assert lease["outputs"]["nodeId"] == copy["nodeId"]
    # The buyer fetches the parent: the agreed result, from an honest copy's node.
    target = fleet.workdir / "three.tar"
    fetched = json.loads(fleet.cli(BUYER, "output", parent_id, "-o", str(target), "--json"))
    assert fetched["ok"] is True and fetched["commitment"]["node_id"] != cheat.node_id
    assert fetched["lease_id"] in {c["leaseId"] for c in copies if c["outcome"] == "paid"}
    with tarfile.open(target) as tar:
        member = tar.extractfile("out/result.txt")
        assert member is not None and member.read() == b"answer=42\n"


def test_two_copies_with_a_cheat_place_a_tie_break_that_decides(fleet: Fleet) -> None:
    """replicas 2 with acme drained runs on globex and the cheat: the digests differ,
    so one tie-break copy is placed, and it waits (no third provider is eligible) until
    acme's drain is lifted; it then agrees with globex, which two are paid, and the
    cheat's copy is flagged."""
    cheat = next(a for a in fleet.agents if a.provider == "initech")
    acme = next(a for a in fleet.agents if a.provider == "acme")
    fleet.cli("admin", "nodes", "drain", acme.node_id, "--reason", "tie-break test")
    try:
        parent_id = fleet.submit("two", 2)

        def tie_break_waits() -> bool:
            shown = fleet.show(parent_id)
            roles = [c.get("role") for c in shown.get("copies", [])]
            return "tiebreak" in roles and "waiting" in shown.get("reason", "")

        wait_until("for the tie-break copy to wait for a third provider", tie_break_waits, 180)
        first = fleet.show(parent_id)
        assert first["state"] not in {"LEASE_STATE_SUCCEEDED", "LEASE_STATE_FAILED"}
        assert {c["nodeId"] for c in first["copies"] if c.get("role") == "copy"} == {
            cheat.node_id,
            next(a.node_id for a in fleet.agents if a.provider == "globex"),
        }
    finally:
        fleet.cli("admin", "nodes", "drain", acme.node_id, "--off")
    shown = _decided(fleet, parent_id)
    assert shown["state"] == "LEASE_STATE_SUCCEEDED", shown
    copies = shown["copies"]
    assert sorted(c.get("role", "") for c in copies) == ["copy", "copy", "tiebreak"]
    tie_break = next(c for c in copies if c.get("role") == "tiebreak")
    assert tie_break["nodeId"] == acme.node_id
    outcome = {c["nodeId"]: c["outcome"] for c in copies}
    assert outcome.pop(cheat.node_id) == "flagged"
    assert sorted(outcome.values()) == ["paid", "paid"]
