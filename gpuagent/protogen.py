"""Regenerate the protocol's Python modules from ``gpuagent/v1/*.proto``.

``make proto`` runs this. The generated ``*_pb2.py``, ``*_pb2_grpc.py`` and
their ``.pyi`` stubs (mypy-protobuf) are committed beside the sources, and
``tests/test_proto_fresh.py`` regenerates into a temp dir to catch stale output.
Protos are compiled with ``-I <repo root>`` so modules import as
``gpuagent.v1.x_pb2`` from both the agent and the scheduler.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import sysconfig
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("gpuagent") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class ProtogenError(Exception):
    """protoc or a plugin failed; the message holds protoc's complaint."""


def proto_files(root: Path = ROOT) -> list[Path]:
    """The .proto sources, relative to ``root``, in a stable order."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def _plugin(name: str) -> str:
    # The mypy-protobuf plugins are console scripts installed beside this interpreter.
    candidates = [Path(sys.executable).parent / name, Path(sysconfig.get_path("scripts")) / name]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ProtogenError(f"{name} not found: install the dev extras (mypy-protobuf)")
    return found


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Compile every proto under ``root`` into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev-only, so imported here

    well_known = str(resources.files("grpc_tools") / "_proto")
    sources = [str(p) for p in proto_files(root)]
    out = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(root / s) for s in sources),
    ]
    code = protoc.main(args)
    if code != 0:
        raise ProtogenError(f"protoc exited with {code}; see its messages above")
    return sorted(
        p.relative_to(out_dir)
        for p in (out_dir / PROTO_DIR).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    try:
        written = generate(args.out)
    except ProtogenError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    for path in written:
        print(path)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
