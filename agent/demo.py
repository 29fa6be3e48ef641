"""``make run``: the whole main job on one machine, on embedded defaults.

Starts the reference scheduler (SQLite, TLS with its self-generated CA) and the
agent (NVML if the library loads, else simulated GPUs, announced loudly) as real
processes, submits a demo lease that runs in Docker, follows it to the end, shows
its usage, and keeps both running until Ctrl-C, which stops them cleanly.

Everything lives under ``.run/`` in the working directory, so a second run reuses
the node identity and the scheduler's database, as a real deployment would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

RUN_DIR = Path(".run")
BIN = Path(sys.executable).parent
DEMO_IMAGE = "gpu-agent-test/busybox:latest"
DEMO_BUYER = "demo-buyer"

# The demo lease: a few seconds of visible work, then success.
DEMO_LEASE: dict[str, Any] = {
    "image": DEMO_IMAGE,
    "command": [
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8; do echo step $i of 8; sleep 1; done; "
        "mkdir -p /scratch/results && echo answer=42 > /scratch/results/answer.txt && "
        "seq 1 1000 > /scratch/results/numbers.txt && echo done",
    ],
    # The results the buyer fetches afterwards (gpu-scheduler output), signed by the node.
    "outputs": ["results"],
    "output_retention": "1h",
    "gpus": 1,
    "cpus": 0.5,
    "memory": "64MiB",
    "max_duration": "5m",
    "price_max": 2_000_000,  # micro-units per GPU-hour: 2 units, above the node's 1.5 ask
    # Where it may go (docs/leases-buyer.md): the demo node is in eu-west, Germany.
    "constraints": {"region": "eu-west", "countries": ["DE", "FR"]},
}
# The service lease: a tiny HTTP "model" (busybox httpd + CGI, tests/images/model.py)
# that buyers reach through the relay with the lease's endpoint token.
MODEL_IMAGE = "gpu-agent-test/model:latest"
SERVICE_LEASE: dict[str, Any] = {
    "image": MODEL_IMAGE,
    "gpus": 1,
    "cpus": 0.25,
    "memory": "32MiB",
    "max_duration": "1h",
    "price_max": 2_000_000,
    "ports": [{"container_port": 8080, "protocol": "http"}],
}
PROMPT = "What is the capital of France?"
DEMO_PROVIDER = "demo-provider"
TOKENS_DIR = RUN_DIR / "tokens"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)  # noqa: T201 - the demo talks to a person


def banner(text: str) -> None:
    line = "!" * 78
    print(f"\033[1;33m{line}\n!! {text}\n{line}\033[0m", flush=True)  # noqa: T201


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # any failure to load or init NVML means "no GPU here"
        return False
    return True


def _pump(prefix: str, stream: IO[str]) -> None:
    for line in stream:
        print(f"{prefix} {line.rstrip()}", flush=True)  # noqa: T201


def start(name: str, argv: list[str], log_path: Path) -> subprocess.Popen[str]:
    """Start a child in its own process group (Ctrl-C reaches us, and we stop it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    log_file = log_path.open("a", encoding="utf-8")

    def tee() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if os.environ.get("DEMO_VERBOSE"):
                print(f"[{name}] {line.rstrip()}", flush=True)  # noqa: T201

    threading.Thread(target=tee, daemon=True, name=f"{name}-log").start()
    return proc


def stop(proc: subprocess.Popen[str], name: str, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within {timeout:.0f}s; killing it")
        proc.kill()
        proc.wait()


def cli(program: str, config: Path, *args: str, check: bool = True, as_account: str = "") -> str:
    """Run a CLI with the token of ``as_account`` (.run/tokens/NAME); none when empty."""
    env = dict(os.environ)
    env.pop("GPU_SCHEDULER_TOKEN", None)
    if as_account:
        env["GPU_SCHEDULER_TOKEN"] = (TOKENS_DIR / as_account).read_text(encoding="utf-8").strip()
    result = subprocess.run(
        [str(BIN / program), "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{program} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def wait_for(what: str, predicate: Any, timeout: float, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a process exited early (code {proc.returncode}) while {what}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s {what}")


class Terminated(BaseException):
    """SIGTERM or SIGHUP (`kill`, a closed terminal): stop the children like Ctrl-C.

    A BaseException, like KeyboardInterrupt: the demo's ``suppress(Exception)`` polls
    must not swallow it."""


def _terminate(signum: int, _frame: object) -> None:
    # Once: a second signal must not interrupt the children's shutdown below.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def running(procs: dict[str, subprocess.Popen[str]]) -> Iterator[None]:
    # The children run in sessions of their own (Ctrl-C reaches only us), so Python's
    # default SIGTERM, which exits without unwinding, would leave them as orphans.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        yield
    finally:
        for name in reversed(list(procs)):
            stop(procs[name], name)


def ensure_demo_image() -> None:
    try:
        from tests.images import build_busybox
    except ImportError:
        say("run from the repository root so the demo image recipe (tests/images) is found")
        raise
    from tests.images import build_model

    say("building the local demo images (FROM scratch + static busybox; no registry needed)")
    build_busybox()
    build_model()


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    sched_dir = (RUN_DIR / "scheduler").resolve()
    agent_dir = (RUN_DIR / "agent").resolve()
    sched_dir.mkdir(exist_ok=True)
    agent_dir.mkdir(exist_ok=True, mode=0o700)
    grpc_port, metrics_port, status_port = free_port(), free_port(), free_port()
    relay_port = free_port()

    use_nvml = nvml_available()
    if not use_nvml:
        banner("NVML not available: the agent runs on SIMULATED GPUs (2 x H100 SXM 80GB)")

    sched_cfg = RUN_DIR / "scheduler.yaml"
    sched_cfg.write_text(
        yaml.safe_dump(
            {
                "log": {"level": "info", "format": "text"},
                "server": {"listen": f"127.0.0.1:{grpc_port}"},
                "database": {"path": str(sched_dir / "scheduler.db")},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                # Service leases: buyers reach https://<lease>-<port>.relay.localhost:<port>/
                # (TLS with a wildcard certificate from the scheduler's CA).
                "relay": {"listen": f"127.0.0.1:{relay_port}", "domain": "relay.localhost"},
                # Simulated GPUs are checked for exact results, not datasheet speed.
                "attestation": {"accept_simulated": not use_nvml},
            }
        )
    )
    # The egress policy is iptables rules: root only. A demo run as a user shows the
    # rest and says plainly that this part is off.
    as_root = os.geteuid() == 0
    if not as_root:
        banner("not root: the egress policy (iptables) is OFF for this demo; run as root for it")
    agent_cfg = RUN_DIR / "agent.yaml"
    agent_cfg.write_text(
        yaml.safe_dump(
            {
                "log": {"level": "info", "format": "text"},
                "node": {
                    "name": "demo-node",
                    "state_dir": str(agent_dir),
                    # The ask per GPU-hour for every model ("*"), and where the node
                    # is: the market shows both (docs/market.md).
                    "pricing": {"*": 1_500_000},
                    "location": {"region": "eu-west", "country": "DE", "zone": "demo-1"},
                },
                "coordinator": {
                    "address": f"127.0.0.1:{grpc_port}",
                    "ca_file": str(sched_dir / "tls" / "ca.pem"),
                    # Issued to demo-provider by `gpu-scheduler nodes enroll` below.
                    "enrollment_token_file": str((RUN_DIR / "enrollment.token").resolve()),
                },
                "gpu": {
                    "backend": "nvml" if use_nvml else "simulated",
                    "simulated": {"profile": "h100-sxm-80gb", "count": 2},
                },
                "metering": {"sample_interval": "1s", "record_interval": "5s"},
                "status": {"listen": f"127.0.0.1:{status_port}"},
                "isolation": {
                    "egress_policy": as_root,
                    # The local image: nothing is pulled (the agent never pulls it).
                    "self_test_image": DEMO_IMAGE,
                },
            }
        )
    )
    ensure_demo_image()

    bootstrap_admin(sched_cfg)
    procs: dict[str, subprocess.Popen[str]] = {}
    with running(procs):
        say(f"starting gpu-scheduler on 127.0.0.1:{grpc_port} (TLS, SQLite in {sched_dir})")
        procs["scheduler"] = start(
            "scheduler",
            [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), "serve"],
            RUN_DIR / "scheduler.log",
        )
        wait_for(
            "waiting for the scheduler's CA",
            lambda: (sched_dir / "tls" / "ca.pem").exists() and port_open(grpc_port),
            30,
            list(procs.values()),
        )
        make_accounts(sched_cfg)
        say(f"starting gpu-agent (state in {agent_dir}, status on 127.0.0.1:{status_port})")
        procs["agent"] = start(
            "agent",
            [str(BIN / "gpu-agent"), "-c", str(agent_cfg), "run"],
            RUN_DIR / "agent.log",
        )

        def node_online() -> bool:
            nodes = json.loads(
                cli("gpu-scheduler", sched_cfg, "nodes", "--json", as_account=DEMO_PROVIDER)
            )
            return any(n.get("liveness") == "LIVENESS_ONLINE" for n in nodes)

        wait_for("waiting for the node to come online", node_online, 60, list(procs.values()))
        say("the fleet as its provider (demo-provider) sees it")
        print(cli("gpu-scheduler", sched_cfg, "nodes", as_account=DEMO_PROVIDER), flush=True)  # noqa: T201
        show_isolation(sched_cfg)

        run_lease(sched_cfg, agent_cfg)
        service_id = run_service(sched_cfg, sched_dir / "tls" / "ca.pem", list(procs.values()))
        show_refusals(sched_cfg)
        say("tokens are in .run/tokens (0600); to go on by hand:")
        print(  # noqa: T201
            f"  export GPU_SCHEDULER_TOKEN=$(cat {TOKENS_DIR}/{DEMO_BUYER})\n"
            f"  {BIN / 'gpu-scheduler'} -c {sched_cfg} leases\n"
            f"  (admin: {TOKENS_DIR}/admin, provider: {TOKENS_DIR}/{DEMO_PROVIDER})",
            flush=True,
        )

        say("scheduler and agent keep running; Ctrl-C stops them (logs in .run/*.log)")
        try:
            while all(p.poll() is None for p in procs.values()):
                time.sleep(1)
            say("a process exited on its own; stopping the demo")
            return 1
        except KeyboardInterrupt:
            print(flush=True)  # noqa: T201
            stop_service(sched_cfg, service_id)
            say("Ctrl-C: stopping agent and scheduler")
    say("stopped cleanly")
    return 0


def show_isolation(sched_cfg: Path) -> None:
    """The node's isolation self-test result, as the coordinator has it."""
    nodes = json.loads(cli("gpu-scheduler", sched_cfg, "nodes", "--json", as_account=DEMO_PROVIDER))
    for node in nodes:
        shown = cli(
            "gpu-scheduler",
            sched_cfg,
            "nodes",
            "show",
            node["nodeId"],
            check=False,
            as_account=DEMO_PROVIDER,
        )
        for line in shown.splitlines():
            if line.startswith("isolation:"):
                say(f"node {node.get('name', node['nodeId'])} " + " ".join(line.split()))


def run_lease(sched_cfg: Path, agent_cfg: Path) -> None:
    lease_file = RUN_DIR / "demo-lease.yaml"
    lease_file.write_text(yaml.safe_dump(DEMO_LEASE, sort_keys=False))
    say(f"admin credits {DEMO_BUYER} with 100 units (the stand-in for a payment rail)")
    cli("gpu-scheduler", sched_cfg, "deposit", DEMO_BUYER, "100", check=False, as_account="admin")
    say(f"the market as {DEMO_BUYER} sees it: gpu-scheduler offers --nodes")
    print(  # noqa: T201
        cli("gpu-scheduler", sched_cfg, "offers", "--nodes", check=False, as_account=DEMO_BUYER),
        flush=True,
    )
    say("the quote: gpu-scheduler submit --dry-run (reserves nothing)")
    quote = subprocess.run(
        [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), "submit", str(lease_file), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **os.environ,
            "GPU_SCHEDULER_TOKEN": (TOKENS_DIR / DEMO_BUYER).read_text(encoding="utf-8").strip(),
        },
    )
    print((quote.stdout + quote.stderr).rstrip(), flush=True)  # noqa: T201
    say(f"submitting the demo lease as {DEMO_BUYER} and following it")
    buyer_token = (TOKENS_DIR / DEMO_BUYER).read_text(encoding="utf-8").strip()
    proc = subprocess.Popen(
        [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), "submit", str(lease_file), "--wait"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "GPU_SCHEDULER_TOKEN": buyer_token},
    )
    assert proc.stdout is not None
    lease_id = ""
    for line in proc.stdout:
        print(line.rstrip(), flush=True)  # noqa: T201
        if not lease_id and line.strip():
            lease_id = line.split()[0]
    if proc.wait(timeout=300) != 0:
        say(f"lease did not succeed (exit {proc.returncode}); see .run/agent.log")
    if lease_id:
        say("the lease's output (kept by the scheduler)")
        print(  # noqa: T201
            cli("gpu-scheduler", sched_cfg, "logs", lease_id, check=False, as_account=DEMO_BUYER),
            flush=True,
        )
        fetch_results(sched_cfg, lease_id)
    say("leases on the agent (local view)")
    print(cli("gpu-agent", agent_cfg, "leases", "--all", check=False), flush=True)  # noqa: T201
    say("usage billed at the scheduler")
    print(cli("gpu-scheduler", sched_cfg, "usage", check=False, as_account=DEMO_BUYER), flush=True)  # noqa: T201
    balance = cli("gpu-scheduler", sched_cfg, "balance", check=False, as_account=DEMO_BUYER)
    print(balance, flush=True)  # noqa: T201


def fetch_results(sched_cfg: Path, lease_id: str) -> None:
    """The batch lease's declared outputs: fetched from the provider through the relay
    and verified against the node's signed commitment (docs/leases-buyer.md "Outputs")."""
    target = (RUN_DIR / "results.tar").resolve()
    target.unlink(missing_ok=True)
    say(f"fetching its results: gpu-scheduler output {lease_id} -o {target}")
    try:
        answer = cli(
            "gpu-scheduler", sched_cfg, "output", lease_id, "-o", str(target),
            as_account=DEMO_BUYER,
        )  # fmt: skip
    except RuntimeError as exc:
        print(f"  {exc}", flush=True)  # noqa: T201
        return
    print(answer.rstrip(), flush=True)  # noqa: T201
    if target.exists():
        with tarfile.open(target) as tar:
            member = tar.extractfile("results/answer.txt")
            if member is not None:
                print(f"  results/answer.txt: {member.read().decode().strip()}", flush=True)  # noqa: T201


def _curl(url: str, ca_file: Path, token: str, body: str = "") -> tuple[int, str, list[str]]:
    """(status, body, argv) of curl against the relay; curl resolves *.localhost to
    loopback itself (RFC 6761), so the URL works as printed."""
    argv = ["curl", "-sS", "--cacert", str(ca_file)]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if body:
        argv += ["--data", body]
    argv.append(url)
    result = subprocess.run(
        [*argv, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=30, check=False
    )
    text, _, code = result.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), text, argv


def stop_service(sched_cfg: Path, lease_id: str) -> None:
    """Cancel the service lease, so no model container outlives the demo (a plain stop
    would leave it running for the next agent start to re-adopt)."""
    say(f"cancelling the service lease {lease_id}")
    cli("gpu-scheduler", sched_cfg, "cancel", lease_id, check=False, as_account=DEMO_BUYER)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = cli(
            "gpu-scheduler", sched_cfg, "lease", "show", lease_id, check=False,
            as_account=DEMO_BUYER,
        )  # fmt: skip
        if "state:       cancelled" in shown:
            return
        time.sleep(0.5)


def run_service(sched_cfg: Path, ca_file: Path, procs: list[subprocess.Popen[str]]) -> str:
    """A service lease: the tiny model behind the relay, with and without its token;
    returns its id."""
    lease_file = RUN_DIR / "service-lease.yaml"
    lease_file.write_text(yaml.safe_dump(SERVICE_LEASE, sort_keys=False))
    say(f"submitting a service lease as {DEMO_BUYER}: a tiny HTTP model on port 8080")
    out = cli("gpu-scheduler", sched_cfg, "submit", str(lease_file), as_account=DEMO_BUYER)
    print(out.rstrip(), flush=True)  # noqa: T201
    lease_id = out.split()[0]
    token = ""
    for line in out.splitlines():
        if line.startswith("endpoint token:"):
            token = line.split()[2]
    url = cli("gpu-scheduler", sched_cfg, "lease", "url", lease_id, as_account=DEMO_BUYER).strip()
    generate = url + "cgi-bin/generate"
    say(f"waiting until {url} answers through the relay")
    wait_for(
        "waiting for the service to answer through the relay",
        lambda: _curl(url, ca_file, token)[0] == 200,
        90,
        procs,
    )
    say("the buyer's request, through relay and tunnel (the provider opened no port):")
    status, answer, argv = _curl(generate, ca_file, token, PROMPT)
    print(f"  {shlex.join(argv)}\n  -> {status} {answer.strip()}", flush=True)  # noqa: T201
    say("the same request without the token gets 401 and never reaches the provider:")
    status, answer, argv = _curl(generate, ca_file, "", PROMPT)
    print(f"  {shlex.join(argv)}\n  -> {status} {answer.strip()[:100]}", flush=True)  # noqa: T201
    return lease_id


def bootstrap_admin(sched_cfg: Path) -> None:
    """The first admin token, once per database (`acl bootstrap` on the file itself)."""
    TOKENS_DIR.mkdir(mode=0o700, exist_ok=True)
    if (TOKENS_DIR / "admin").exists():
        return
    say("bootstrapping the ACL: the first admin token (gpu-scheduler acl bootstrap)")
    cli("gpu-scheduler", sched_cfg, "acl", "bootstrap", "--token-file", str(TOKENS_DIR / "admin"))


def make_accounts(sched_cfg: Path) -> None:
    """demo-buyer and demo-provider with a token each, and the node's enrolment token."""
    for name, role in ((DEMO_BUYER, "buyer"), (DEMO_PROVIDER, "provider")):
        path = TOKENS_DIR / name
        if path.exists():
            continue
        say(f"creating account {name} ({role}) and its token")
        cli(
            "gpu-scheduler",
            sched_cfg,
            "accounts",
            "create",
            name,
            "--role",
            role,
            check=False,
            as_account="admin",
        )
        token = cli(
            "gpu-scheduler", sched_cfg, "tokens", "create", name, as_account="admin"
        ).strip()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
    enrollment = RUN_DIR / "enrollment.token"
    if not enrollment.exists():
        say(f"enrolling the node: a token for {DEMO_PROVIDER} from gpu-scheduler nodes enroll")
        token = cli("gpu-scheduler", sched_cfg, "nodes", "enroll", as_account=DEMO_PROVIDER).strip()
        fd = os.open(enrollment, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")


def show_refusals(sched_cfg: Path) -> None:
    """What a stranger and a buyer cannot do: each of these calls is refused."""
    say("tried as a hostile caller: each call below is refused")
    attempts: list[tuple[str, str, list[str]]] = [
        ("no token", "", ["leases"]),
        ("no token", "", ["deposit", DEMO_BUYER, "1000"]),
        (DEMO_BUYER, DEMO_BUYER, ["deposit", DEMO_BUYER, "1000"]),
        (DEMO_BUYER, DEMO_BUYER, ["balance", "admin"]),
        (DEMO_BUYER, DEMO_BUYER, ["audit"]),
    ]
    for who, token, args in attempts:
        env = {k: v for k, v in os.environ.items() if k != "GPU_SCHEDULER_TOKEN"}
        env["HOME"] = str(RUN_DIR.resolve())  # no ~/.config token file either
        if token:
            env["GPU_SCHEDULER_TOKEN"] = (TOKENS_DIR / token).read_text(encoding="utf-8").strip()
        result = subprocess.run(
            [str(BIN / "gpu-scheduler"), "-c", str(sched_cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
        verdict = "refused" if result.returncode != 0 else "ALLOWED (a bug!)"
        print(f"  [{who}] gpu-scheduler {' '.join(args)}: {verdict}: {first[:150]}", flush=True)  # noqa: T201


if __name__ == "__main__":
    if shutil.which("docker") is None:
        sys.exit("the demo needs the Docker Engine (docker not found on PATH)")
    if shutil.which("curl") is None:
        sys.exit("the demo shows a service through curl (apt-get install -y curl)")
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C before the demo settled: `running` has already stopped the children.
        say("interrupted; stopped cleanly")
        sys.exit(0)
    except Terminated as exc:
        say(f"{exc}: stopped agent and scheduler")
        sys.exit(143)
    except RuntimeError as exc:
        say(f"demo failed: {exc} (logs in .run/*.log)")
        sys.exit(1)
