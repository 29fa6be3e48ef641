"""``gpu-agent-test/pyservice``: the host's python3 and its stdlib in a FROM scratch image,
running tests/images/service/server.py (HTTP, SSE, WebSocket echo) on port 8080.

No registry is reachable, so the interpreter comes from the host (Debian's python3),
with the shared libraries ``ldd`` names. Built once per machine; rebuilt when the
recipe (server script, interpreter) changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker

PYSERVICE_IMAGE = "gpu-agent-test/pyservice:latest"
PYTHON = Path("/usr/bin/python3")
SERVER = Path(__file__).parent / "service" / "server.py"
RECIPE_LABEL = "gpu-agent.test-recipe"
_SKIP = ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo", "__pycache__")

DOCKERFILE = """\
FROM scratch
COPY root/ /
LABEL {label}={recipe}
ENTRYPOINT ["/usr/bin/python3", "-S", "-B", "/srv/server.py"]
CMD ["8080"]
"""


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            found.append(Path(path))
    return found


def _recipe(python: Path) -> str:
    digest = hashlib.sha256(DOCKERFILE.encode())
    digest.update(SERVER.read_bytes())
    digest.update(python.read_bytes())
    return digest.hexdigest()[:16]


def build_pyservice(client: docker.DockerClient | None = None) -> str:
    """Build the image if missing or stale; returns its tag."""
    python = PYTHON.resolve()
    if not python.exists():
        raise RuntimeError(f"{PYTHON} not found: install Debian's python3")
    client = client or docker.from_env()
    recipe = _recipe(python)
    try:
        if client.images.get(PYSERVICE_IMAGE).labels.get(RECIPE_LABEL) == recipe:
            return PYSERVICE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    version = python.name.removeprefix("python")  # "3.11"
    with tempfile.TemporaryDirectory() as ctx:
        root = Path(ctx) / "root"
        (root / "usr/bin").mkdir(parents=True)
        shutil.copy2(python, root / "usr/bin/python3")
        for lib in _libraries(python):
            target = root / lib.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), target)
        stdlib = Path(f"/usr/lib/python{version}")
        shutil.copytree(
            stdlib,
            root / stdlib.relative_to("/"),
            ignore=shutil.ignore_patterns(*_SKIP, "site-packages", "dist-packages"),
            symlinks=False,
        )
        (root / "srv").mkdir()
        shutil.copy2(SERVER, root / "srv/server.py")
        (Path(ctx) / "Dockerfile").write_text(DOCKERFILE.format(label=RECIPE_LABEL, recipe=recipe))
        client.images.build(path=ctx, tag=PYSERVICE_IMAGE, rm=True, forcerm=True)
    return PYSERVICE_IMAGE
