"""A network namespace standing in for the provider's LAN (and a bit of internet).

``ip netns add`` plus a veth pair: the host end gets ``10.251.N.1/30`` (a host
address on the "LAN"), ``10.251.N.5/30`` and ``198.51.100.M.1/30``; the namespace end
``.2``, ``.6`` and the TEST-NET-2 address, each with a TCP listener that accepts and
closes. TEST-NET-2 is not in any blocked range, so it stands for "the internet"
without any packet leaving the machine. Everything is removed on ``close``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

LISTENER = """
import socket, sys, threading
def serve(addr, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(64)
    ready.release()
    while True:
        c, _ = s.accept(); c.close()
ready = threading.Semaphore(0)
targets = sys.argv[1:]
for t in targets:
    a, p = t.rsplit(":", 1)
    threading.Thread(target=serve, args=(a, int(p)), daemon=True).start()
for _ in targets:
    ready.acquire()
print("ready", flush=True)
sys.stdin.read()
"""

PORT = 9000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Lan:
    name: str
    host_ip: str  # a host address on the LAN side (the INPUT path)
    lan_ip: str  # a LAN machine (the FORWARD path), blocked
    allowed_ip: str  # a LAN machine the tests put on the allow-list
    internet_ip: str  # stands for a public address
    _listener: subprocess.Popen[str] | None = field(default=None, repr=False)

    def run(self, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def connects(self, address: str, port: int) -> bool:
        """From inside the LAN namespace: does a TCP connect to address:port succeed?"""
        script = (
            "import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()\n"
            "except OSError: sys.exit(1)\n"
        )
        return self.run(sys.executable, "-c", script, address, str(port)).returncode == 0

    def close(self) -> None:
        if self._listener is not None:
            self._listener.kill()
            self._listener.communicate()  # closes its pipes
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "delete", self.name)  # takes the veth pair with it


def make_lan() -> Lan:
    tag = uuid.uuid4().hex[:6]
    third = secrets.randbelow(256)
    fourth = secrets.randbelow(64) * 4
    name = f"gat-lan-{tag}"
    host_if, ns_if = f"vh{tag}", f"vn{tag}"
    ip("netns", "add", name)
    lan = Lan(
        name,
        host_ip=f"10.251.{third}.1",
        lan_ip=f"10.251.{third}.2",
        allowed_ip=f"10.251.{third}.6",
        internet_ip=str(ipaddress.ip_address(f"198.51.100.{fourth}") + 2),
    )
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        net_host = str(ipaddress.ip_address(f"198.51.100.{fourth}") + 1)
        for address in (f"10.251.{third}.1/30", f"10.251.{third}.5/30", f"{net_host}/30"):
            ip("addr", "add", address, "dev", host_if)
        for address in (f"{lan.lan_ip}/30", f"{lan.allowed_ip}/30", f"{lan.internet_ip}/30"):
            ip("-n", name, "addr", "add", address, "dev", ns_if)
        ip("link", "set", host_if, "up")
        ip("-n", name, "link", "set", ns_if, "up")
        ip("-n", name, "link", "set", "lo", "up")
        lan._listener = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                LISTENER,
                *(f"{a}:{PORT}" for a in (lan.lan_ip, lan.allowed_ip, lan.internet_ip)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert lan._listener.stdout is not None
        if lan._listener.stdout.readline().strip() != "ready":
            raise RuntimeError("LAN namespace listener did not start")
    except BaseException:
        lan.close()
        raise
    return lan
