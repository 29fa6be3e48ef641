"""Tiny local test images: no registry is reachable, so tests build their own.

``busybox``: ``FROM scratch`` plus Debian's static busybox (package
``busybox-static``), with the applet links made at build time so ``sh``, ``sleep``
and friends exist. Built once per machine; rebuilt when the recipe changes.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import docker

BUSYBOX_IMAGE = "gpu-agent-test/busybox:latest"
BUSYBOX_BINARY = Path("/bin/busybox")
RECIPE_LABEL = "gpu-agent.test-recipe"

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
# Applet links need a shell, and the only shell is busybox itself.
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
LABEL {label}={recipe}
CMD ["/bin/sh"]
"""


def _recipe() -> str:
    digest = hashlib.sha256(DOCKERFILE.encode())
    digest.update(BUSYBOX_BINARY.read_bytes())
    return digest.hexdigest()[:16]


def build_busybox(client: docker.DockerClient | None = None) -> str:
    """Build the image if missing or stale; returns its tag."""
    if not BUSYBOX_BINARY.exists():
        raise RuntimeError(
            f"{BUSYBOX_BINARY} not found: install Debian's busybox-static "
            "(apt-get install -y busybox-static; `make test` does it)"
        )
    client = client or docker.from_env()
    recipe = _recipe()
    try:
        image = client.images.get(BUSYBOX_IMAGE)
        if image.labels.get(RECIPE_LABEL) == recipe:
            return BUSYBOX_IMAGE
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy2(BUSYBOX_BINARY, Path(ctx) / "busybox")
        (Path(ctx) / "Dockerfile").write_text(DOCKERFILE.format(label=RECIPE_LABEL, recipe=recipe))
        client.images.build(path=ctx, tag=BUSYBOX_IMAGE, rm=True, forcerm=True)
    return BUSYBOX_IMAGE
