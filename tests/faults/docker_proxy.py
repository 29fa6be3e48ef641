"""A unix-socket HTTP proxy in front of the Docker Engine that injects faults.

The agent's ``runtime.docker_host`` points here. Each request's line is read; if a
rule matches its method and path, the proxy answers ``500`` itself, or holds the
connection for a while and drops it without an answer (a hung engine, bounded so
the test stays short). Everything else is forwarded to ``/var/run/docker.sock``
with ``Connection: close`` forced, so each connection carries one request and the
proxy never has to find where a keep-alive response ends.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from .pipes import pipe

DOCKER_SOCK = "/var/run/docker.sock"


@dataclass(frozen=True)
class Rule:
    method: str
    path: re.Pattern[str]
    action: str  # "error" | "hang"
    hang_seconds: float = 3.0


class DockerFaultProxy:
    def __init__(self, path: Path, upstream: str = DOCKER_SOCK) -> None:
        self.path = path
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.injected: list[str] = []  # "METHOD /path" of every request it faulted
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(64)
        threading.Thread(target=self._accept, name="docker-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def fail(self, method: str, path_regex: str) -> None:
        """Answer matching requests with HTTP 500."""
        with self._lock:
            self.rules.append(Rule(method, re.compile(path_regex), "error"))

    def hang(self, method: str, path_regex: str, seconds: float) -> None:
        """Hold matching requests ``seconds``, then drop the connection unanswered."""
        with self._lock:
            self.rules.append(Rule(method, re.compile(path_regex), "hang", seconds))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _match(self, method: str, path: str) -> Rule | None:
        # The SDK prefixes a version (/v1.45/containers/create); rules match the rest.
        bare = re.sub(r"^/v\d+\.\d+", "", path.split("?", 1)[0])
        with self._lock:
            for rule in self.rules:
                if rule.method == method and rule.path.fullmatch(bare):
                    return rule
        return None

    def _handle(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _version = lines[0].split(" ", 2)
            rule = self._match(method, path)
            if rule is not None:
                with self._lock:
                    self.injected.append(f"{method} {path}")
                if rule.action == "hang":
                    self._closed.wait(rule.hang_seconds)
                    return
                body = b'{"message":"injected fault: engine error"}'
                client.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n".encode()
                    + b"Connection: close\r\n\r\n"
                    + body
                )
                return
            upgrade = any(line.lower().startswith("upgrade:") for line in lines[1:])
            if not upgrade:
                lines = [ln for ln in lines if not ln.lower().startswith("connection:")]
                lines.append("Connection: close")
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with upstream:
                upstream.connect(self.upstream)
                upstream.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + rest)
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join()
