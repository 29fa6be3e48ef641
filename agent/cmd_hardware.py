"""``gpu-agent detect | doctor | cordon | uncordon``: hardware commands for operators."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .cli import UsageError, load_config_from_args
from .config import AgentConfig
from .doctor import Severity, fatal_results, run_preflight
from .gpu import GpuBackend, NvmlUnavailable, open_backend
from .gpu.cordons import CordonFileError, CordonStore
from .gpu.detect import build_report, find_gpu, render_table
from .hostinfo import collect_host_info

_UUID_LENGTH = len("GPU-00000000-0000-0000-0000-000000000000")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    detect = sub.add_parser("detect", help="show the host's hardware, GPUs and their health")
    detect.add_argument(
        "--json", action="store_true", help="machine-readable output (agent/gpu/detect.schema.json)"
    )
    detect.set_defaults(handler=_detect)

    doctor = sub.add_parser(
        "doctor",
        help="preflight checks (driver, NVML, Docker, toolkit, cgroups, disk, clock, coordinator)",
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=_doctor)

    cordon = sub.add_parser("cordon", help="stop placing new leases on a GPU")
    cordon.add_argument("gpu", help="GPU index or UUID")
    cordon.add_argument("--reason", default="cordoned by operator", help="shown to the coordinator")
    cordon.set_defaults(handler=_cordon)

    uncordon = sub.add_parser(
        "uncordon", help="return a cordoned GPU to service (works while the daemon runs)"
    )
    uncordon.add_argument("gpu", help="GPU index or UUID")
    uncordon.set_defaults(handler=_uncordon)


def _backend(config: AgentConfig) -> GpuBackend:
    try:
        return open_backend(config.gpu)
    except NvmlUnavailable as exc:
        raise UsageError(
            f"{exc.cause}.\n  fix: {exc.fix}\n  (or set gpu.backend: simulated / auto)"
        ) from None


def _detect(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    backend = _backend(config)
    try:
        host = collect_host_info(config.node.state_dir, config.runtime.docker_host)
        report = build_report(backend, host, CordonStore(config.node.state_dir))
    finally:
        backend.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(report))  # noqa: T201
    return 0


def _doctor(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    results = run_preflight(config, log_problems=False, coordinator=True)
    if args.json:
        json.dump(
            [dataclasses.asdict(r) | {"severity": r.severity.value} for r in results],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        marks = {
            Severity.OK: " ok  ",
            Severity.INFO: "info ",
            Severity.WARNING: "WARN ",
            Severity.FATAL: "FATAL",
        }
        for r in results:
            print(f"[{marks[r.severity]}] {r.name}: {r.message}")  # noqa: T201
            if r.fix and r.severity in (Severity.WARNING, Severity.FATAL):
                print(f"        fix: {r.fix}")  # noqa: T201
        fatal = fatal_results(results)
        verdict = (
            f"{len(fatal)} fatal problem(s): the agent will refuse to start"
            if fatal
            else "no fatal problems"
        )
        print(f"\n{verdict}")  # noqa: T201
    return 1 if fatal_results(results) else 0


def _resolve(config: AgentConfig, ident: str) -> tuple[str, int | None]:
    """UUID and index for a GPU named by index or UUID."""
    if ident.startswith("GPU-") and len(ident) == _UUID_LENGTH:
        # A full UUID needs no NVML: cordons work even while the driver is broken.
        return ident, None
    backend = _backend(config)
    try:
        inventory = backend.inventory()
    finally:
        backend.close()
    gpu = find_gpu(inventory, ident)
    if gpu is None or gpu.uuid is None:
        known = ", ".join(f"{g.index}={g.uuid}" for g in inventory) or "none"
        raise UsageError(f"no GPU {ident!r} on this host (GPUs: {known})")
    return gpu.uuid, gpu.index


def _cordon(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    uuid, index = _resolve(config, args.gpu)
    store = CordonStore(config.node.state_dir)
    try:
        store.load()
        existing = store.get(uuid)
        entry = store.cordon(uuid, args.reason, "operator", index)
    except CordonFileError as exc:
        raise UsageError(str(exc)) from None
    if existing is not None:
        print(f"{uuid} was already cordoned: {existing.reason}")  # noqa: T201
    else:
        print(f"cordoned {uuid}: {entry.reason}")  # noqa: T201
    return 0


def _uncordon(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    uuid, _ = _resolve(config, args.gpu)
    store = CordonStore(config.node.state_dir)
    try:
        removed = store.uncordon(uuid)
    except CordonFileError as exc:
        raise UsageError(str(exc)) from None
    if removed is None:
        print(f"{uuid} was not cordoned")  # noqa: T201
    else:
        print(  # noqa: T201
            f"uncordoned {uuid} (was: {removed.reason}); the daemon re-cordons it "
            "if the fault is still present"
        )
    return 0
