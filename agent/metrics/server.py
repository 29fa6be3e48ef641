"""The agent's HTTP endpoint: /metrics, /healthz, /readyz, /status.

A small WSGI app served by wsgiref in a daemon thread (one thread per request),
so a slow scrape never stalls the event loop and the loop never stalls a
scrape. ``status.listen`` sets the address (default 127.0.0.1:9470).

- ``GET /metrics``  Prometheus exposition (prometheus_client's WSGI app:
  gzip and OpenMetrics negotiation included).
- ``GET /healthz``  200 while the process serves requests (liveness).
- ``GET /readyz``   JSON with each check's state; 503 when any check fails.
- ``GET /status``   the read-only JSON status document (``gpu-agent status``).
- ``POST /drain``, ``POST /uncordon``  operator actions; 501 until an action is
  registered. Accepted only from loopback, with ``Content-Type: application/json``
  and ``Authorization: Bearer <control token>`` (agent/control_token.py), and never
  from a browser (``Origin`` or ``Sec-Fetch-*`` headers): a web page the operator
  opens could otherwise post to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

from .readiness import Readiness

log = logging.getLogger(__name__)

# An operator action: parsed JSON body in, JSON-able result out.
Action = Callable[[Mapping[str, Any]], Any]

RESERVED_ACTIONS = ("drain", "uncordon")
MAX_BODY_BYTES = 64 * 1024


class ListenError(Exception):
    """The status address is malformed or cannot be bound; says which and why."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) -> (host, port)."""
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ListenError(f"status.listen {listen!r}: expected host:port, e.g. 127.0.0.1:9470")
    port = int(port_text)
    if port > 65535:
        raise ListenError(f"status.listen {listen!r}: port {port} is out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port  # noqa: S104 - ":port" asks for every interface


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request stuck in a collector must not block exit
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes arrive every few seconds: access lines go to debug, not stderr.
        log.debug("http %s", format % args, extra={"client": self.client_address[0]})


def _json(start: StartResponse, status: str, body: Any) -> list[bytes]:
    data = json.dumps(body, default=str, indent=1).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _text(
    start: StartResponse, status: str, body: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    data = body.encode()
    start(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            *headers,
        ],
    )
    return [data]


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class StatusApp:
    """The WSGI application; usable without a server (tests call it directly)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        readiness: Readiness | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        actions: Mapping[str, Action] | None = None,
        control_token: str | None = None,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._control = control_token
        self._readiness = readiness
        self._status = status
        self._actions = dict(actions or {})

    def __call__(self, environ: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
        try:
            return self._route(environ, start)
        except Exception as exc:
            log.exception("status endpoint failed", extra={"path": environ.get("PATH_INFO")})
            return _json(start, "500 Internal Server Error", {"error": f"{type(exc).__name__}"})

    def _route(self, environ: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        name = path.strip("/")
        if name in RESERVED_ACTIONS or name in self._actions:
            if method != "POST":
                return _text(start, "405 Method Not Allowed", "use POST\n", [("Allow", "POST")])
            return self._action(name, environ, start)
        if method not in ("GET", "HEAD"):
            return _text(start, "405 Method Not Allowed", "read-only\n", [("Allow", "GET, HEAD")])
        if path == "/metrics":
            metrics: Iterable[bytes] = self._metrics(environ, start)
            return metrics
        if path == "/healthz":
            return _text(start, "200 OK", "ok\n")
        if path == "/readyz":
            doc = (
                self._readiness.evaluate()
                if self._readiness is not None
                else {"ready": True, "checks": {}}
            )
            return _json(start, "200 OK" if doc["ready"] else "503 Service Unavailable", doc)
        if path == "/status":
            if self._status is None:
                return _json(start, "404 Not Found", {"error": "no status document configured"})
            return _json(start, "200 OK", self._status())
        if path == "/":
            return _text(start, "200 OK", "gpu-agent: /metrics /healthz /readyz /status\n")
        return _text(start, "404 Not Found", f"no such endpoint: {path}\n")

    def _action(self, name: str, environ: WSGIEnvironment, start: StartResponse) -> list[bytes]:
        if not _is_loopback(environ.get("REMOTE_ADDR", "")):
            return _json(
                start, "403 Forbidden", {"error": "actions are accepted from loopback only"}
            )
        if any(k in environ for k in ("HTTP_ORIGIN", "HTTP_SEC_FETCH_SITE", "HTTP_SEC_FETCH_MODE")):
            return _json(start, "403 Forbidden", {"error": "requests from a browser are refused"})
        content_type = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return _json(
                start,
                "415 Unsupported Media Type",
                {"error": "actions take Content-Type: application/json"},
            )
        if self._control is not None:
            given = str(environ.get("HTTP_AUTHORIZATION", ""))
            if not hmac.compare_digest(given.encode(), f"Bearer {self._control}".encode()):
                return _json(
                    start,
                    "401 Unauthorized",
                    {"error": "actions need the control token from the agent's state directory"},
                )
        action = self._actions.get(name)
        if action is None:
            return _json(start, "501 Not Implemented", {"error": f"{name} is not implemented yet"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _json(start, "400 Bad Request", {"error": "invalid Content-Length"})
        if length > MAX_BODY_BYTES:
            return _json(
                start, "413 Content Too Large", {"error": f"body over {MAX_BODY_BYTES} bytes"}
            )
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return _json(start, "400 Bad Request", {"error": f"body is not JSON: {exc}"})
        if not isinstance(body, dict):
            return _json(start, "400 Bad Request", {"error": "body must be a JSON object"})
        return _json(start, "200 OK", {"result": action(body)})


class StatusServer:
    """Serves a ``StatusApp`` on ``listen``; ``run(stop)`` is the agent component."""

    def __init__(self, listen: str, app: StatusApp) -> None:
        self._host, self._port = parse_listen(listen)
        self._listen = listen
        self._app = app
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when ``listen`` asked for port 0."""
        if self._server is None:
            return self._host, self._port
        addr = self._server.server_address
        return str(addr[0]), int(addr[1])

    def start(self) -> None:
        if self._server is not None:
            return
        cls = _Server6 if ":" in self._host else _Server
        try:
            server = make_server(
                self._host, self._port, self._app, server_class=cls, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ListenError(
                f"status.listen {self._listen}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self._server = server
        # A short poll interval so stop() returns promptly at shutdown.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="status-http", daemon=True
        )
        self._thread.start()
        log.info("status endpoint listening", extra={"address": "{}:{}".format(*self.address)})

    def stop(self) -> None:
        """Idempotent; returns once the server no longer accepts requests."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self.start)
        try:
            await stop.wait()
        finally:
            await asyncio.to_thread(self.stop)
