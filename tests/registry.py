"""A minimal Docker Registry (HTTP API v2) on loopback, serving one image it builds.

No registry is reachable from the test machines, yet pulls are a real part of a
lease's start: this serves the few endpoints ``docker pull`` uses (``/v2/``,
manifests, blobs) for a freshly made image, so the engine really downloads it.
The engine treats 127.0.0.0/8 registries as insecure (plain HTTP) by default.

The image: one gzipped layer holding Debian's static busybox, the ``sh`` link
and a random file, so no layer of it is on the host already and every byte is
downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer() -> bytes:
    """An uncompressed layer tar: /bin/busybox, /bin/sh -> busybox, a random file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
        noise = os.urandom(64 * 1024)
        info = tarfile.TarInfo("noise")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
    return out.getvalue()


@dataclass
class Registry:
    """What the server serves, and what it was asked for."""

    repository: str
    tag: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifest: bytes = b""
    layer_bytes: int = 0  # the compressed layer: what a pull downloads
    blob_requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def image(self) -> str:
        return f"127.0.0.1:{self.port}/{self.repository}:{self.tag}"

    @classmethod
    def build(cls) -> Registry:
        registry = cls(repository="test/pulled", tag=uuid.uuid4().hex[:12])
        tar = _layer()
        layer = gzip.compress(tar, mtime=0)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]},
            }
        ).encode()
        registry.blobs = {_digest(layer): layer, _digest(config): config}
        registry.layer_bytes = len(layer)
        registry.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {
                    "mediaType": CONFIG_TYPE,
                    "size": len(config),
                    "digest": _digest(config),
                },
                "layers": [{"mediaType": LAYER_TYPE, "size": len(layer), "digest": _digest(layer)}],
            }
        ).encode()
        return registry


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    prefix = f"/v2/{registry.repository}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _send(self, status: int, body: bytes, content_type: str, digest: str = "") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            manifests = {f"{prefix}/manifests/{registry.tag}"}
            manifests.add(f"{prefix}/manifests/{_digest(registry.manifest)}")
            if path in ("/v2/", "/v2"):
                self._send(200, b"{}", "application/json")
            elif path in (
                f"{prefix}/manifests/{registry.tag}",
                f"{prefix}/manifests/{_digest(registry.manifest)}",
            ):
                self._send(200, registry.manifest, MANIFEST_TYPE, _digest(registry.manifest))
            elif path.startswith(f"{prefix}/blobs/") and path.rsplit("/", 1)[1] in registry.blobs:
                digest = path.rsplit("/", 1)[1]
                registry.blob_requests.append(digest)
                self._send(200, registry.blobs[digest], "application/octet-stream", digest)
            else:
                self._send(404, b'{"errors": [{"code": "NAME_UNKNOWN"}]}', "application/json")

        do_HEAD = do_GET

    return Handler


@contextmanager
def serving() -> Iterator[Registry]:
    """Serve a new image on a free loopback port for the duration of the block."""
    registry = Registry.build()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    registry.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="test-registry", daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
