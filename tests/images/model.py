"""``gpu-agent-test/model``: the demo's tiny HTTP "model", busybox httpd with a CGI script.

Built FROM the local busybox image (tests/images/busybox.py), so nothing is pulled.
``POST /cgi-bin/generate`` with a prompt answers a JSON "completion" (the prompt's
words counted and echoed back); ``GET /`` answers "ready" (a health check path).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import docker

from tests.images.busybox import BUSYBOX_IMAGE, RECIPE_LABEL, build_busybox

MODEL_IMAGE = "gpu-agent-test/model:latest"

GENERATE = """\
#!/bin/sh
# A stand-in for an inference server: reads the prompt, answers JSON.
prompt=$(head -c "${CONTENT_LENGTH:-0}" | tr -d '"\\\\' | tr '\\n' ' ')
words=$(echo "$prompt" | wc -w)
echo "Content-Type: application/json"
echo
printf '{"model": "tiny-demo", "prompt_words": %s, "completion": "you said: %s"}\\n' \\
  "$words" "$prompt"
"""

DOCKERFILE = """\
FROM {base}
COPY www /www
RUN ["/bin/chmod", "755", "/www/cgi-bin/generate"]
LABEL {label}={recipe}
CMD ["/bin/httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
"""


def build_model(client: docker.DockerClient | None = None) -> str:
    """Build the image if missing or stale; returns its tag."""
    client = client or docker.from_env()
    base = build_busybox(client)
    base_id = client.images.get(BUSYBOX_IMAGE).id or ""
    recipe = hashlib.sha256((DOCKERFILE + GENERATE + base_id).encode()).hexdigest()[:16]
    try:
        if client.images.get(MODEL_IMAGE).labels.get(RECIPE_LABEL) == recipe:
            return MODEL_IMAGE
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory() as ctx:
        www = Path(ctx) / "www"
        (www / "cgi-bin").mkdir(parents=True)
        (www / "index.html").write_text("ready\n")
        (www / "cgi-bin" / "generate").write_text(GENERATE)
        (Path(ctx) / "Dockerfile").write_text(
            DOCKERFILE.format(base=base, label=RECIPE_LABEL, recipe=recipe)
        )
        client.images.build(path=ctx, tag=MODEL_IMAGE, rm=True, forcerm=True)
    return MODEL_IMAGE
